"""audiocraft's own checkpoint files (`state_dict.bin`, `compression_state_dict.bin`, as its utils/export.py
writes them) read without torch by mlx_musicgen.torch_bin: every tensor and the config as audiocraft's own
loader reads them."""

import shutil

import numpy as np
import yaml

import audiocraft_reference as acref
from mlx_musicgen import torch_bin


def test_an_exported_codec_reads_back_as_audiocraft_reads_it(tmp_path):
    cfg = acref.codec_config()
    model = acref.random_codec(cfg)
    path = acref.export(tmp_path / "compression_state_dict.bin", model.state_dict(), cfg)

    ac = acref.import_audiocraft()
    theirs = ac.loaders.load_compression_model(path)  # audiocraft rebuilds it from the file's own config
    package = torch_bin.read_torch_bin(path)
    assert package["exported"] is True and package["version"] == ac.version
    assert yaml.safe_load(package["xp.cfg"]) == ac.OmegaConf.to_container(cfg)
    state = theirs.state_dict()
    assert set(package["best_state"]) == set(state) and len(state) > 20
    for name, tensor in state.items():
        np.testing.assert_array_equal(package["best_state"][name], tensor.numpy(), err_msg=name)


def test_a_pointer_to_a_pretrained_codec_reads_back(tmp_path):
    path = acref.export_pointer(tmp_path / "compression_state_dict.bin", "facebook/encodec_32khz")
    package = torch_bin.read_torch_bin(path)
    assert package == {"pretrained": "facebook/encodec_32khz", "exported": True,
                       "version": acref.import_audiocraft().version}


def test_an_exported_lm_reads_back_as_audiocraft_reads_it(tiny, tmp_path):
    """A MusicGen LM with T5 cross-attention (the T5 is named in the config, not saved), built and exported as
    audiocraft does, then loaded by audiocraft's own loader and read by ours."""
    t5 = tmp_path / "t5"
    tiny.reference.text_encoder.save_pretrained(t5)
    shutil.copyfile(tiny.folder / "spiece.model", t5 / "spiece.model")
    cfg = acref.lm_config()
    ac = acref.import_audiocraft()
    with acref.LocalT5(t5, tiny.reference.text_encoder.config.d_model):
        model = acref.random_lm(cfg)
        path = acref.export(tmp_path / "state_dict.bin", model.state_dict(), cfg)
        theirs = ac.loaders.load_lm_model(path)
    package = torch_bin.read_torch_bin(path)
    assert yaml.safe_load(package["xp.cfg"]) == ac.OmegaConf.to_container(cfg)
    state = theirs.state_dict()
    assert set(package["best_state"]) == set(state)
    assert any(name.endswith("self_attn.in_proj_weight") for name in state)  # Q, K, V stacked, as released
    assert "condition_provider.conditioners.description.output_proj.weight" in state
    for name, tensor in state.items():
        np.testing.assert_array_equal(package["best_state"][name], tensor.numpy(), err_msg=name)
