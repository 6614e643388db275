"""Conversion: Hub-layout folders (single file, shards, both weight-norm spellings, torch .bin) -> MLX folders
that load strictly and produce exactly what the in-memory path and the reference produce."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import reference
from mlx_musicgen import MusicGen
from mlx_musicgen.loading import CheckpointError

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["80s pop track with bassy drums and synth", "ambient pads"]
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                   "config.json", "generation_config.json")


def greedy(model):
    return model.generate(TEXTS, max_new_tokens=12, do_sample=False, return_tokens=True)


@pytest.fixture(scope="module")
def expected(tiny):
    """The reference's own greedy output, which every loading path must reproduce."""
    return reference.generate(tiny.reference, tiny.processor, TEXTS, do_sample=False, guidance_scale=3.0,
                              max_new_tokens=12)


def assert_matches(model, expected):
    audio, codes = greedy(model)
    np.testing.assert_array_equal(codes, expected[1])
    assert reference.relative_error(audio, expected[0]) < 1e-4


def copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copyfile(src / name, dst / name)
    return dst


def run_convert(*args):
    return subprocess.run([sys.executable, str(ROOT / "convert.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_round_trip_matches_in_memory_path(tiny, expected, tmp_path):
    out = tmp_path / "mlx"
    result = run_convert("--hf-path", tiny.folder, "--mlx-path", out)
    assert result.returncode == 0, result.stderr
    assert "converting: 4/4 stages" in result.stderr  # the progress bar
    config = json.loads((out / "config.json").read_text())
    assert config["mlx_musicgen"]["format_version"] == 2
    assert (out / "spiece.model").is_file() and not list(tmp_path.glob(".mlx*"))  # nothing left half-written
    converted = MusicGen.from_pretrained(out)
    in_memory = MusicGen.from_pretrained(tiny.folder)
    a, b = greedy(converted), greedy(in_memory)
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[0], b[0])
    assert_matches(converted, expected)


def test_older_weight_norm_spelling(tiny, expected, tmp_path):
    folder = copy_without_weights(tiny.folder, tmp_path / "old")
    renamed = {}
    for name, tensor in load_file(tiny.folder / "model.safetensors").items():
        name = name.replace("conv.parametrizations.weight.original0", "conv.weight_g")
        renamed[name.replace("conv.parametrizations.weight.original1", "conv.weight_v")] = tensor
    assert any(k.endswith("weight_g") for k in renamed)
    save_file(renamed, folder / "model.safetensors", metadata={"format": "pt"})
    assert_matches(MusicGen.from_pretrained(folder), expected)


def test_sharded_checkpoint(tiny, expected, tmp_path):
    folder = tmp_path / "sharded"
    tiny.reference.save_pretrained(folder, max_shard_size="2MB")
    copy_without_weights(tiny.folder, folder)
    assert (folder / "model.safetensors.index.json").is_file()
    assert_matches(MusicGen.from_pretrained(folder), expected)


def test_torch_bin_checkpoint_converts_without_torch(tiny, expected, tmp_path):
    """A pytorch_model.bin-only folder converts with torch unimportable (torch_bin reads it), and loads directly."""
    folder = copy_without_weights(tiny.folder, tmp_path / "bin")
    torch.save(load_file(tiny.folder / "model.safetensors"), folder / "pytorch_model.bin")
    out = tmp_path / "converted"
    code = ("import sys; sys.modules['torch'] = None; import mlx_musicgen; from mlx_musicgen.convert import main; "
            f"main(['--hf-path', {str(folder)!r}, '--mlx-path', {str(out)!r}]); assert 'torch' not in "
            "[name.split('.')[0] for name, module in sys.modules.items() if module is not None]")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    assert_matches(MusicGen.from_pretrained(out), expected)
    assert_matches(MusicGen.from_pretrained(folder), expected)


def test_half_precision_and_quantized_decoders(tiny, tmp_path):
    """The decoder takes the dtype (or quantization); T5 and EnCodec stay float32; logits drift a little."""
    ref = MusicGen.from_pretrained(tiny.folder)
    codes = mx.array(np.random.default_rng(0).integers(0, 2048, size=(2, 4, 6)))
    states, mask = ref.conditioning(TEXTS, 2, guided=False)

    def logits(model):
        return np.array(model.decoder(codes, model.decoder.text_context(states, mask)).astype(mx.float32))

    base = logits(ref)
    for args, tolerance in ((["--dtype", "float16"], 1e-2), (["--dtype", "bfloat16"], 5e-2), (["--q-bits", "8"], 5e-2)):
        out = tmp_path / "-".join(args)
        result = run_convert("--hf-path", tiny.folder, "--mlx-path", out, *args)
        assert result.returncode == 0, result.stderr
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = MusicGen.from_pretrained(out)
        # MLX's CPU has no BLAS path for these: loading says so, and how to get float32
        slow = [str(w.message) for w in caught if "slower than float32" in str(w.message)]
        assert len(slow) == (mx.default_device() == mx.cpu), slow
        assert model.text_encoder.final_layer_norm.weight.dtype == mx.float32
        drift = np.abs(logits(model) - base).max() / np.abs(base).max()
        assert drift < tolerance, (args, drift)


def test_strict_loading_names_extra_and_missing_tensors(tiny, tmp_path):
    weights = load_file(tiny.folder / "model.safetensors")
    extra = copy_without_weights(tiny.folder, tmp_path / "extra")
    save_file({**weights, "decoder.mystery.weight": torch.zeros(3)}, extra / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected.*decoder.mystery.weight"):
        MusicGen.from_pretrained(extra)
    missing = copy_without_weights(tiny.folder, tmp_path / "missing")
    save_file({k: v for k, v in weights.items() if "lm_heads.3" not in k}, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing.*decoder.lm_heads.3.weight"):
        MusicGen.from_pretrained(missing)


def test_convert_refuses_a_non_empty_folder(tiny, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = run_convert("--hf-path", tiny.folder, "--mlx-path", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr and "Traceback" not in result.stderr
    assert (out / "keep.txt").read_text() == "mine"
