"""Hugging Face MusicGen checkpoint -> MLX folder (safetensors + config + tokenizer), written atomically
(the `mlx_musicgen.convert` command; convert.py runs it too), and a fine-tune's adapters fused into such a
folder or into one in the Hub's transformers layout, for transformers to load (`fuse`, for
`mlx_musicgen.finetune --fuse`; write_transformers_folder).

    mlx_musicgen.convert --hf-path facebook/musicgen-small --mlx-path mlx_model [--dtype float16] [-q --q-bits 4]
"""

from __future__ import annotations

import argparse
import errno
import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import mlx.core as mx
from mlx.utils import tree_flatten

from . import atomic, loading, lora
from .cli import Bar, add_checkpoint_options, run_main
from .model import AUDIOCRAFT_KEY, CONVERTED_KEY, DTYPES, MusicGenModel
from .names import compile_names, renamed

STAGES = ("finding the checkpoint", "reading and mapping weights", "casting the decoder", "writing")
TOKENIZER_ONLY = (
    "spiece.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",  # transformers 4's slow tokenizers, beside spiece.model
)
# what a checkpoint folder holds beside its weights; from a T5's own folder (audiocraft's models) only its
# tokenizer: its generation_config.json is T5's, not the model's
TOKENIZER_FILES = TOKENIZER_ONLY + ("preprocessor_config.json", "processor_config.json", "generation_config.json")


def convert(
    hf_path: str | Path,
    mlx_path: str | Path,
    *,
    dtype: str = "float32",
    q_bits: int | None = None,
    q_group_size: int = 64,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
    checkpoint_format: str = "auto",
    text_encoder: str | Path | None = None,
) -> Path:
    """Convert a Hub id or a folder in transformers' layout or audiocraft's (`checkpoint_format` and
    `text_encoder`: see loading.build_model). The decoder takes `dtype` (and optional quantization); T5 and
    EnCodec stay float32. Returns the output folder, which appears complete or not at all.
    `progress` is told each stage as it starts (see STAGES)."""
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
    folder = loading.resolve(hf_path, checkpoint_format)
    if loading.checkpoint_format_of(folder, checkpoint_format) == "transformers" and \
            loading.is_converted(loading.read_config(folder)):
        raise loading.CheckpointError(f"{folder} is already converted; load it directly.")
    report(STAGES[1])
    model, config, tokenizer = loading.build_model(folder, checkpoint_format=checkpoint_format,
                                                   text_encoder=text_encoder)
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
    write_atomically(out, model, config, tokenizer)
    return out


def fuse(adapter_path: str | Path, mlx_path: str | Path | None = None, model_id: str | None = None,
         overwrite: bool = False, *, hf_path: str | Path | None = None, checkpoint_format: str = "auto",
         text_encoder: str | Path | None = None) -> list[Path]:
    """The base model (`model_id`, default the one the adapters record) with the adapters (or the full fine-tune)
    of `adapter_path` merged in, written as a converted folder (`mlx_path`), as a folder in the Hub's transformers
    layout (`hf_path`, see write_transformers_folder), or both; returns the folders written."""
    adapter_path = Path(adapter_path).expanduser()
    lora.read_adapter_config(adapter_path)  # refuses a folder without (sound) adapters
    recorded = lora.recorded_model(adapter_path)  # ours, or PEFT's base_model_name_or_path
    model_id = model_id or recorded
    if model_id is None:
        raise ValueError(f"{adapter_path} does not say which model it adapts: give --model.")
    outs = [Path(p).expanduser() for p in (mlx_path, hf_path) if p is not None]
    if not outs:
        raise ValueError("fuse writes a converted folder, a transformers folder or both: give --mlx-path and/or "
                         "--hf-path.")
    if len(outs) == 2 and outs[0].resolve() == outs[1].resolve():
        raise ValueError(f"--mlx-path and --hf-path are the same folder {outs[0]}: give two folders.")
    for out in outs:
        check_destination(out, overwrite)
    model, raw, folder = loading.build_model(loading.resolve(model_id, checkpoint_format),
                                             checkpoint_format=checkpoint_format, text_encoder=text_encoder)
    if hf_path is not None:
        check_exportable(raw, folder)  # before the work of fusing
    lora.load_adapters(model, adapter_path, model_name=model_id)
    lora.fuse_lora(model)
    written = []
    if mlx_path is not None:
        converted = raw.get(CONVERTED_KEY, {})
        config = {**raw, CONVERTED_KEY: {
            "format_version": loading.FORMAT_VERSION, "source": str(model_id),
            "dtype": converted.get("dtype", "float32"), "quantization": None,
            "max_length": model.config.max_length, "adapters": str(adapter_path)}}
        write_atomically(Path(mlx_path).expanduser(), model, config, folder)
        written.append(Path(mlx_path).expanduser())
    if hf_path is not None:
        write_transformers_folder(Path(hf_path).expanduser(), model, raw, folder)
        written.append(Path(hf_path).expanduser())
    return written


# Ours -> transformers' names of T5's tensors: the inverse of t5.HF_NAMES (`text_encoder.` prefix stripped).
T5_HF_NAMES = compile_names((
    (r"embed_tokens\.weight", "shared.weight"),
    (r"relative_attention_bias\.weight", "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"),
    (r"layers\.(\d+)\.attention\.(q|k|v|o)\.weight", r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (r"layers\.(\d+)\.attention_norm\.weight", r"encoder.block.\1.layer.0.layer_norm.weight"),
    (r"layers\.(\d+)\.feed_forward\.(wi|wi_0|wi_1|wo)\.weight", r"encoder.block.\1.layer.1.DenseReluDense.\2.weight"),
    (r"layers\.(\d+)\.feed_forward_norm\.weight", r"encoder.block.\1.layer.1.layer_norm.weight"),
    (r"final_layer_norm\.weight", "encoder.final_layer_norm.weight"),
))


def t5_to_hf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our T5 tensors -> transformers' T5EncoderModel names (`shared.weight` holds the tied embedding)."""
    return renamed(weights, T5_HF_NAMES)


def decoder_to_hf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our decoder's tensors -> transformers' (`model.decoder.*`, the heads `lm_heads.*` as they are). The
    sinusoid table is left out: transformers 5 recomputes it (a buffer it neither saves nor expects)."""
    return {k if k.startswith("lm_heads.") else "model.decoder." + k: v for k, v in weights.items()}


def encodec_to_hf(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Our EnCodec tensors -> transformers' EncodecModel: the inverse of EncodecModel.sanitize. Convs go back to
    torch's layouts with weight norm as transformers 5 saves it (original0 = g = ||w|| over all dims but the
    first, original1 = v = w, so g * v / ||v|| gives w back to rounding); each LSTM layer's summed bias becomes
    bias_ih (bias_hh zero: the sum is what counts); each codebook gets the k-means state transformers keeps,
    consistent with its entries (trained, every cluster of size 1, embed_avg = embed), which inference ignores."""
    top_level = sorted(
        int(m.group(1)) for k in weights if (m := re.fullmatch(r"decoder\.layers\.(\d+)\.conv\.weight", k))
    )
    transposed = {f"decoder.layers.{i}.conv.weight" for i in top_level[1:-1]}  # as EncodecModel.sanitize finds them
    out = {}
    for key, value in weights.items():
        module, _, name = key.rpartition(".")
        if module.endswith(".conv") and name == "weight":
            # ours (out, kernel, in) -> torch ConvTranspose1d (in, out, kernel) or Conv1d (out, in, kernel)
            v = value.transpose(2, 0, 1) if key in transposed else value.transpose(0, 2, 1)
            out[module + ".parametrizations.weight.original0"] = mx.sqrt(v.square().sum(axis=(1, 2), keepdims=True))
            out[module + ".parametrizations.weight.original1"] = v
        elif m := re.fullmatch(r"(.*\.lstm)\.(\d+)\.(Wx|Wh|bias)", key):
            lstm, layer, kind = m.groups()
            if kind == "bias":
                out[f"{lstm}.bias_ih_l{layer}"], out[f"{lstm}.bias_hh_l{layer}"] = value, mx.zeros_like(value)
            else:
                out[f"{lstm}.weight_{'ih' if kind == 'Wx' else 'hh'}_l{layer}"] = value
        elif module.startswith("quantizer.layers.") and name == "embed":
            codebook = module + ".codebook"
            out.update({codebook + ".embed": value, codebook + ".embed_avg": value,
                        codebook + ".cluster_size": mx.ones((value.shape[0],)), codebook + ".inited": mx.ones((1,))})
        else:
            out[key] = value
    return out


def hf_weights(model: MusicGenModel) -> dict[str, mx.array]:
    """The model's tensors with transformers' names and layouts (the inverse of MusicGenModel.sanitize), all
    float32: a half-precision decoder is widened (exactly), as transformers' MusicGen runs in float32."""
    parts = {"text_encoder.": t5_to_hf, "decoder.": decoder_to_hf, "audio_encoder.": encodec_to_hf}
    weights = dict(tree_flatten(model.parameters()))
    out = {k: v for k, v in weights.items() if not k.startswith(tuple(parts))}  # the projections: same names
    for prefix, to_hf in parts.items():
        part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        out.update({prefix + k: v for k, v in to_hf(part).items()})
    return {k: v.astype(mx.float32) for k, v in out.items()}


def check_exportable(raw: dict, folder: Path) -> None:
    """transformers cannot read MLX's quantized weights, and dequantizing would not give the source's back:
    refuse a quantized base (float16 and bfloat16 ones are written as float32, see hf_weights)."""
    if AUDIOCRAFT_KEY in raw:
        raise loading.CheckpointError(
            f"{folder} was read from audiocraft's files, whose model computes as audiocraft does (it attends to text "
            f"padding), which transformers' MusicGen would not follow: fuse into a converted folder with "
            f"--mlx-path instead.")
    converted = raw.get(CONVERTED_KEY) or {}
    if converted.get("quantization"):
        raise loading.CheckpointError(
            f"{folder} is quantized, which transformers cannot load: fuse onto the float checkpoint it was converted "
            f"from ({converted.get('source', 'its Hub id')}) with --model.")


def transformers_config(raw: dict) -> dict:
    """The source's config.json as transformers wrote it: our section dropped, the weights' dtype float32."""
    config = {k: v for k, v in raw.items() if k != CONVERTED_KEY}
    for key in ("dtype", "torch_dtype"):  # transformers 5's name, and 4's
        if key in config:
            config[key] = "float32"
    return config


def write_transformers_folder(out: Path, model: MusicGenModel, raw: dict, source: Path) -> None:
    """A folder in the Hub's transformers layout that MusicgenForConditionalGeneration (or the melody class)
    .from_pretrained loads: model.safetensors with transformers' names, float32 (hf_weights), config.json and
    generation_config.json as the source has them, its tokenizer files, and for melody models its processor
    files (preprocessor_config.json or processor_config.json)."""
    check_exportable(raw, source)
    write_folder(out, hf_weights(model), transformers_config(raw), source, metadata={"format": "pt"})


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
    """A converted folder: our weights, `config` and the source's tokenizer and processor files (write_folder)."""
    write_folder(out, dict(tree_flatten(model.parameters())), config, source)


def write_folder(out: Path, weights: dict[str, mx.array], config: dict, source: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """Write model.safetensors (`weights`, with `metadata`), config.json and the files of TOKENIZER_FILES that
    `source` holds into a temporary sibling folder, then swap it into place with renames (see atomic)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic.clean_stale(out)
    needed = sum(w.nbytes for w in weights.values())
    free = shutil.disk_usage(out.parent).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"no space left on the device holding {out.parent}: the model needs "
                                    f"{needed / 2**30:.2f} GiB, {free / 2**30:.2f} GiB are free; free some space "
                                    f"or choose another folder")
    staging = atomic.temp_folder(out)
    with atomic.removed_on_error(lambda: shutil.rmtree(staging, ignore_errors=True), out.parent):
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata=metadata or {})
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for name in TOKENIZER_ONLY if AUDIOCRAFT_KEY in config else TOKENIZER_FILES:
            if (source / name).is_file():
                shutil.copyfile(source / name, staging / name)
        atomic.give_normal_mode(staging)
        atomic.replace_folder(staging, out)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", default="facebook/musicgen-small",
                   help="Hub id, or a folder in transformers' layout or with audiocraft's state_dict.bin and "
                        "compression_state_dict.bin")
    add_checkpoint_options(p)
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default mlx_model)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32",
                   help="decoder precision; T5 and EnCodec stay float32 (default float32)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder (4 bits unless --q-bits)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], help="bits per decoder weight (implies -q)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --mlx-path")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    bits = args.q_bits or (4 if args.quantize else None)
    with Bar(total=len(STAGES), desc="converting", unit="stage", dynamic_ncols=True,
             bar_format="{desc}: {n}/{total} stages |{bar}| [{elapsed}{postfix}]") as bar:

        def stage(name: str) -> None:
            bar.update(STAGES.index(name) - bar.n)
            bar.set_postfix_str(name)

        out = convert(args.hf_path, args.mlx_path, dtype=args.dtype, q_bits=bits, q_group_size=args.q_group_size,
                      overwrite=args.overwrite, progress=stage, checkpoint_format=args.checkpoint_format,
                      text_encoder=args.text_encoder)
        bar.update(len(STAGES) - bar.n)
        bar.set_postfix_str("done")
    print(f"wrote {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """The command."""
    args = parse_args(argv)
    run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    main()
