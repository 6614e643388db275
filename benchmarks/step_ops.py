#!/usr/bin/env python
"""Primitive operations one decoding step evaluates: the graph of a step (guidance 3, top-k 250 sampling) as MLX
builds it, counted node by node, for the step as it runs (compiled) and the same step run op by op (eager, as
every step ran before the compiled step), on the portable model and on the CPU forms, and the CPU's numpy step
(whose MLX graph is guidance and sampling: the decoder runs in numpy). (The step op by op is the compiled step's
own body, uncompiled: the graph every step built before.)

    python benchmarks/step_ops.py .bench_cache/small-*/mlx-float32     # a converted or Hub-layout folder

On Metal and CUDA every primitive that computes is a kernel launch (views are not), so that count is the
device-neutral cost of a step beyond its bytes; on a CPU each primitive is a task of MLX's scheduler (a few
microseconds each). On a CPU, inside a compiled function, MLX's fast layer norm and attention are their
composite ops (a handful each), which on Metal and CUDA are one kernel each: the CPU's count is the larger.
"""

from __future__ import annotations

import argparse
import io
import json
import re

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
import mlx.core as mx

from mlx_musicgen import MusicGen, delay, generation
from mlx_musicgen.cpu.numpy_decoder import NumpyDecoder
from mlx_musicgen.settings import GenerationConfig

TEXT = "80s pop track with bassy drums and synth"


# primitives that only make a view of their input (no kernel on Metal or CUDA, no copy on a CPU)
VIEWS = {"Transpose", "Reshape", "Flatten", "Unflatten", "ExpandDims", "Squeeze", "Broadcast", "Slice", "AsStrided"}


def primitives(*outputs: mx.array) -> dict[str, int]:
    """The primitive nodes of the unevaluated graph behind `outputs`: all, and those that compute (not views)."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    names = re.findall(r'label ="([^"]+)", shape=rectangle', dot.getvalue())
    return {"all": len(names), "computing": sum(name not in VIEWS for name in names)}


def count(folder: str, portable: bool, compiled: bool, numpy_step: bool = False) -> dict[str, int]:
    """The primitives of the eleventh decoding step of a guided generation, compiled or op by op; `numpy_step`:
    the CPU's numpy step (cpu.numpy_decoder), whose MLX graph is guidance and sampling only."""
    musicgen = MusicGen.from_pretrained(folder, portable=portable)
    states, mask = musicgen.conditioning([TEXT], 1, guided=True)
    context = musicgen.model.decoder_context(states, mask, guided=True)
    decoder = NumpyDecoder(musicgen.decoder) if numpy_step else musicgen.decoder
    cache = decoder.make_cache(2, 64 + context.length)
    sampler = generation.make_sampler(GenerationConfig().for_model("musicgen"))
    step, op_by_op = (generation.decoding_step(decoder, context, 3.0, sampler, cache, compiled=compiled)
                      for compiled in (True, False))

    codes = mx.full((1, decoder.num_codebooks, 1), decoder.pad_token_id, dtype=mx.int32)
    forced = mx.full((1, decoder.num_codebooks), delay.UNSET, dtype=mx.int32)
    key = mx.random.key(0)
    for _ in range(10):
        column, key = step(codes, forced, key)
        mx.eval(column, key)
        codes = column[:, :, None]
    column, key = (step if compiled else op_by_op)(codes, forced, key)
    return primitives(column, key)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a converted or Hub-layout folder")
    args = p.parse_args()
    result = {}
    for form, portable in (("portable", True), ("cpu", False)):
        for mode, compiled in (("eager", False), ("compiled", True)):
            result[f"{form}_{mode}"] = count(args.folder, portable, compiled)
        result[f"{form}_ratio"] = {kind: result[f"{form}_compiled"][kind] / result[f"{form}_eager"][kind]
                                   for kind in ("all", "computing")}
    result["cpu_numpy_step"] = count(args.folder, False, False, numpy_step=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
