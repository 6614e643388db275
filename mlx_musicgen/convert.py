"""Hugging Face MusicGen checkpoint -> MLX folder (safetensors + config + tokenizer), written atomically."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from . import atomic, loading
from .model import MusicGen, MusicGenConfig

STAGES = ("finding the checkpoint", "reading and mapping weights", "casting the decoder", "writing")
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}
TOKENIZER_FILES = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    read_bin: loading.BinReader | None = None,
) -> Path:
    """Convert a Hub id or Hub-layout folder. The decoder takes `dtype` (and optional quantization); T5 and
    EnCodec stay float32. Returns the output folder, which appears complete or not at all.
    `progress` is told each stage as it starts (see STAGES); `read_bin` reads torch .bin checkpoints (the
    convert.py script passes one that uses torch)."""
    report = progress or (lambda stage: None)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}.")
    if q_bits not in (None, 4, 8):
        raise ValueError(f"q_bits must be 4 or 8, got {q_bits}.")
    out = Path(mlx_path).expanduser()
    check_destination(out, overwrite)

    report(STAGES[0])
    folder = loading.resolve(hf_path)
    config = loading.read_config(folder)
    if loading.is_converted(config):
        raise loading.CheckpointError(f"{folder} is already converted; load it directly.")
    generation = loading.read_generation_config(folder)
    model = MusicGen(MusicGenConfig.from_dict(config, generation))
    report(STAGES[1])
    model.load_checked(MusicGen.sanitize(loading.load_hf_weights(folder, read_bin)), folder)
    report(STAGES[2])
    model.set_decoder_dtype(DTYPES[dtype])
    quantization = None
    if q_bits is not None:
        quantization = {"group_size": q_group_size, "bits": q_bits}
        model.quantize_decoder(**quantization)

    config[loading.CONVERTED_KEY] = {
        "format_version": loading.FORMAT_VERSION,
        "source": str(hf_path),
        "dtype": dtype,
        "quantization": quantization,
        "max_length": generation.get("max_length", 1500),
    }
    report(STAGES[3])
    write_atomically(out, model, config, folder)
    return out


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an output folder that is taken (without `overwrite`) or cannot be written."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty: choose another folder or pass --overwrite.")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:  # the folders convert would create
        parent = parent.parent
    if not parent.is_dir():
        raise NotADirectoryError(f"{parent} is not a folder: choose another --mlx-path.")
    try:
        Path(tempfile.mkdtemp(prefix=atomic.temp_prefix(out), suffix=".part", dir=parent)).rmdir()
    except OSError as e:
        raise PermissionError(f"cannot write in the folder {parent} ({e.strerror}): choose another --mlx-path.") from None


def write_atomically(out: Path, model: MusicGen, config: dict, source: Path) -> None:
    """Write everything into a temporary sibling folder, then swap it into place with renames (see atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(out)
    staging = atomic.temp_folder(out)
    try:
        mx.save_safetensors(str(staging / "model.safetensors"), dict(tree_flatten(model.parameters())))
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        atomic.replace_folder(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
