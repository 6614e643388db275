#!/usr/bin/env python
"""Bytes of decoder weights one decoding step reads, from a checkpoint's tensor names, shapes and dtypes.

    python benchmarks/step_bytes.py .bench_cache/small-*/mlx-float32            # a converted or Hub-layout folder
    python benchmarks/step_bytes.py FOLDER --rows 2 --bandwidth 25               # + the floor at 25 GB/s
    python benchmarks/step_bytes.py FOLDER --drift-from FLOAT32_FOLDER           # logits of FOLDER vs float32's

Per step: every layer's weights except cross-attention's K/V projections (the text's keys and values are
projected once per generation, by both this port and the reference), the final norm, the LM heads, and one
embedding row per codebook table per batch row (guidance doubles the rows). Quantized layers count their packed
weights, scales and biases. Only the safetensors headers are read (no model is loaded), so the count does not
depend on which module classes run the model (the CPU path swaps them).
"""

from __future__ import annotations

import argparse
import json
import re
import struct
from pathlib import Path

ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1,
            "U8": 1, "BOOL": 1}
# decoder tensor names after "decoder." (the Hub layout's "decoder.model.decoder." is shortened to that first)
PARTS = [("cross_kv_once", r"layers\.\d+\.encoder_attn\.[kv]_proj\."), ("layers", r"layers\.\d+\."),
         ("norm", r"layer_norm\."), ("heads", r"lm_heads\.\d+\."), ("embeddings", r"embed_tokens\.\d+\.")]


def tensors(folder: Path) -> dict[str, tuple[str, list[int]]]:
    """name -> (dtype, shape) of every tensor in the folder's safetensors files (one file or shards)."""
    out = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        out.update((k, (v["dtype"], v["shape"])) for k, v in header.items() if k != "__metadata__")
    if not out:
        raise SystemExit(f"{folder}: no safetensors files")
    return out


def step_bytes(folder: str | Path, rows: int = 2) -> dict:
    """Bytes by part for a decoding step over `rows` rows (2 x prompts with guidance); 'per_step' is their sum
    (without 'cross_kv_once', read once per generation, and 'other', e.g. a stored sinusoid table)."""
    parts = dict.fromkeys([name for name, _ in PARTS] + ["other"], 0)
    for name, (dtype, shape) in tensors(folder).items():
        if not name.startswith("decoder."):
            continue
        name = name.replace("decoder.model.decoder.", "decoder.", 1)[len("decoder."):]
        nbytes = ITEMSIZE[dtype]
        for n in shape:
            nbytes *= n
        part = next((p for p, pattern in PARTS if re.match(pattern, name)), "other")
        if part == "embeddings":  # rows looked up, not the table
            nbytes = nbytes // shape[0] * min(rows, shape[0])
        parts[part] += nbytes
    parts["per_step"] = parts["layers"] + parts["norm"] + parts["heads"] + parts["embeddings"]
    return parts


def logits_drift(float32_folder: str | Path, folder: str | Path, texts: list[str], positions: int = 32) -> dict:
    """Teacher-forced decoder logits of `folder` (float16/bfloat16/quantized) against the float32 model's, on the
    same random codes and texts, guided rows included: max |x - x32| / max |x32|, and top-1 agreement of the
    guided (scale 3) logits. Uses model internals: decoder(codes, decoder.text_context(states, mask))."""
    import mlx_musicgen  # noqa: F401  (before mlx: loads the BLAS on Linux)
    import mlx.core as mx
    import numpy as np

    from mlx_musicgen import MusicGen

    def logits(path, codes):
        model = MusicGen.from_pretrained(path)
        states, mask = model.encode_text(texts)
        states, mask = mx.concatenate([states, 0 * states]), mx.concatenate([mask, 0 * mask])  # + unconditional
        out = model.decoder(mx.array(np.concatenate([codes, codes])), model.decoder.text_context(states, mask))
        return np.array(out.astype(mx.float32))

    c = json.loads((Path(folder) / "config.json").read_text())["decoder"]
    shape = (len(texts), c["num_codebooks"], positions)
    codes = np.random.default_rng(0).integers(0, c["vocab_size"], shape).astype(np.int32)
    codes[:, :, 0] = c["vocab_size"]  # the start id
    want, got = logits(float32_folder, codes), logits(folder, codes)
    guided = lambda x: x[len(texts):] + 3.0 * (x[: len(texts)] - x[len(texts):])  # noqa: E731
    return {"max_rel_err": float(np.abs(got - want).max() / np.abs(want).max()),
            "top1_agreement_guided": float(np.mean(guided(got).argmax(-1) == guided(want).argmax(-1))),
            "positions": positions}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path, help="a converted folder or a Hub-layout one (safetensors)")
    p.add_argument("--rows", type=int, default=2, help="decoder batch rows (2 x prompts with guidance)")
    p.add_argument("--bandwidth", type=float, default=None, help="GB/s: also print the floor in ms per step")
    p.add_argument("--drift-from", type=Path, default=None, help="the float32 folder to measure logits drift from")
    args = p.parse_args()
    parts = step_bytes(args.folder, args.rows)
    for name, value in parts.items():
        print(f"{name:>14}: {value / 1e6:12.3f} MB")
    if args.bandwidth:
        print(f"{'floor':>14}: {parts['per_step'] / (args.bandwidth * 1e6):12.3f} ms/step at {args.bandwidth} GB/s")
    if args.drift_from:
        print(json.dumps(logits_drift(args.drift_from, args.folder, ["80s pop track with bassy drums and synth"])))


if __name__ == "__main__":
    main()
