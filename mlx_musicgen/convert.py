"""Hugging Face MusicGen checkpoint -> MLX folder (safetensors + config + tokenizer), written atomically
(the `mlx_musicgen.convert` command; convert.py runs it too), and a fine-tune's adapters fused into such a
folder (`fuse`, for `mlx_musicgen.finetune --fuse`).

    mlx_musicgen.convert --hf-path facebook/musicgen-small --mlx-path mlx_model [--dtype float16] [-q --q-bits 4]
"""

from __future__ import annotations

import argparse
import errno
import json
import sys
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from . import atomic, loading, lora
from .cli import Bar, run_main
from .model import CONVERTED_KEY, DTYPES, MusicGenModel

STAGES = ("finding the checkpoint", "reading and mapping weights", "casting the decoder", "writing")
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
    if q_group_size not in (32, 64, 128):
        raise ValueError(f"q_group_size must be 32, 64 or 128, got {q_group_size}.")
    out = Path(mlx_path).expanduser()
    check_destination(out, overwrite)

    report(STAGES[0])
    folder = loading.resolve(hf_path)
    if loading.is_converted(loading.read_config(folder)):
        raise loading.CheckpointError(f"{folder} is already converted; load it directly.")
    report(STAGES[1])
    model, config = loading.build_model(folder, read_bin)
    report(STAGES[2])
    model.set_decoder_dtype(DTYPES[dtype])
    quantization = None
    if q_bits is not None:
        quantization = {"group_size": q_group_size, "bits": q_bits}
        model.quantize_decoder(**quantization)

    config[CONVERTED_KEY] = {
        "format_version": loading.FORMAT_VERSION,
        "source": str(hf_path),
        "dtype": dtype,
        "quantization": quantization,
        "max_length": model.config.max_length,
    }
    report(STAGES[3])
    write_atomically(out, model, config, folder)
    return out


def fuse(adapter_path: str | Path, mlx_path: str | Path, model_id: str | None = None,
         overwrite: bool = False) -> Path:
    """A converted folder of the base model (`model_id`, default the one the adapters record) with the adapters
    (or the full fine-tune) of `adapter_path` merged in; returns the folder."""
    adapter_path = Path(adapter_path).expanduser()
    lora.read_adapter_config(adapter_path)  # refuses a folder without (sound) adapters
    recorded = json.loads((adapter_path / lora.CONFIG_FILE).read_text()).get("model")
    model_id = model_id or recorded
    if model_id is None:
        raise ValueError(f"{adapter_path} does not say which model it adapts: give --model.")
    out = Path(mlx_path).expanduser()
    check_destination(out, overwrite)
    folder = loading.resolve(model_id)
    model, raw = loading.build_model(folder)
    lora.load_adapters(model, adapter_path)
    lora.fuse_lora(model)
    converted = raw.get(CONVERTED_KEY, {})
    raw[CONVERTED_KEY] = {
        "format_version": loading.FORMAT_VERSION, "source": str(model_id), "dtype": converted.get("dtype", "float32"),
        "quantization": None, "max_length": model.config.max_length, "adapters": str(adapter_path),
    }
    write_atomically(out, model, raw, folder)
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


def write_atomically(out: Path, model: MusicGenModel, config: dict, source: Path) -> None:
    """Write everything into a temporary sibling folder, then swap it into place with renames (see atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(out)
    weights = dict(tree_flatten(model.parameters()))
    needed = sum(w.nbytes for w in weights.values())
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"no space left on the device holding {out.parent}: the model needs "
                                    f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free; free some space "
                                    f"or choose another --mlx-path")
    staging = atomic.temp_folder(out)
    with atomic.removed_on_error(lambda: shutil.rmtree(staging, ignore_errors=True), out.parent):
        mx.save_safetensors(str(staging / "model.safetensors"), weights)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        atomic.give_normal_mode(staging)
        atomic.replace_folder(staging, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", default="facebook/musicgen-small", help="Hub id or Hub-layout folder")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default mlx_model)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="decoder precision; T5 and EnCodec stay float32 (default float32)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder (4 bits unless --q-bits)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], help="bits per decoder weight (implies -q)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --mlx-path")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace, read_bin: loading.BinReader | None = None) -> None:
    bits = args.q_bits or (4 if args.quantize else None)
    with Bar(total=len(STAGES), desc="converting", unit="stage", dynamic_ncols=True,
             bar_format="{desc}: {n}/{total} stages |{bar}| [{elapsed}{postfix}]") as bar:

        def stage(name: str) -> None:
            bar.update(STAGES.index(name) - bar.n)
            bar.set_postfix_str(name)

        out = convert(args.hf_path, args.mlx_path, dtype=args.dtype, q_bits=bits, q_group_size=args.q_group_size,
                      overwrite=args.overwrite, progress=stage, read_bin=read_bin)
        bar.update(len(STAGES) - bar.n)
        bar.set_postfix_str("done")
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None, read_bin: loading.BinReader | None = None) -> None:
    """The command. `read_bin` reads torch .bin checkpoints: the checkout's convert.py passes one that uses torch
    (never imported by the package); without it a .bin-only checkpoint is refused with what to run."""
    args = parse_args(argv)
    run_main(lambda: run(args, read_bin), args.debug)


if __name__ == "__main__":
    main()
