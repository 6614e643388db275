"""audiocraft's own checkpoint files (`state_dict.bin`, `compression_state_dict.bin`, as its utils/export.py
writes them) read without torch by mlx_musicgen.torch_bin: every tensor and the config as audiocraft's own
loader reads them."""

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
