#!/usr/bin/env python
"""Primitive operations one decoding step evaluates: the graph of a step (guidance 3, top-k 250 sampling) as MLX
builds it, counted node by node, for the step as it runs (compiled) and the same step run op by op (eager, as
every step ran before the compiled step), on the portable model and on the CPU forms, and the CPU's numpy step
(whose MLX graph is guidance and sampling: the decoder runs in numpy). (The step op by op is the compiled step's
own body, uncompiled: the graph every step built before.)

    python benchmarks/step_ops.py .bench_cache/small-*/mlx-float32     # a converted or Hub-layout folder

On Metal and CUDA every primitive that computes is a kernel launch (views are not), so that count is the
device-neutral cost of a step beyond its bytes; on a CPU each primitive is a task of MLX's scheduler (a few
microseconds each). On a CPU, MLX's fast layer norm and attention are composite ops (a layer norm 11 computing
primitives op by op and 5 compiled, an attention of one query 4, or 5 with a mask array), which on a GPU are one
kernel each: the layer norm on Metal and CUDA, the attention of one query on Metal, and on CUDA only without a
mask array (MLX 0.32's sources). On a CPU, "metal" and "cuda" are the computing count with those composites
taken as one kernel each: an estimate, for want of a GPU. Where MLX's default device is a GPU, "computing" is
that GPU's own count (and that device's estimate equals it), and the CPU forms and the numpy step are left out.
"""

from __future__ import annotations

import argparse
import io
import json
import re

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
import mlx.core as mx

from mlx_musicgen import MusicGen, delay, generation
from mlx_musicgen.decoder import Attention
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


def fast_calls(build) -> list[str]:
    """The fast ops that `build()` calls as it builds a graph: "layer_norm", "attention" (no mask array) or
    "masked attention"."""
    calls, layer_norm, attend = [], mx.fast.layer_norm, Attention.attend

    def recorded_layer_norm(*args, **kwargs):
        calls.append("layer_norm")
        return layer_norm(*args, **kwargs)

    def recorded_attend(*args, mask=None, **kwargs):
        calls.append("masked attention" if isinstance(mask, mx.array) else "attention")
        return attend(*args, mask=mask, **kwargs)

    mx.fast.layer_norm, Attention.attend = recorded_layer_norm, staticmethod(recorded_attend)
    try:
        build()
    finally:
        mx.fast.layer_norm, Attention.attend = layer_norm, staticmethod(attend)
    return calls


def composite_sizes(compiled: bool) -> dict[str, int]:
    """The computing primitives of each fast op of a step as a CPU builds it (compiled or op by op): a layer
    norm, and the attention of one query to 8 keys, with and without a mask."""
    x, weight, bias = mx.ones((2, 1, 64)), mx.ones((64,)), mx.zeros((64,))
    q, kv, mask = mx.ones((2, 4, 1, 64)), mx.ones((2, 4, 8, 64)), mx.ones((8,), dtype=mx.bool_)
    mx.eval(x, weight, bias, q, kv, mask)
    ops = {"layer_norm": (lambda x: mx.fast.layer_norm(x, weight, bias, 1e-5), (x,)),
           "attention": (lambda q, kv: mx.fast.scaled_dot_product_attention(q, kv, kv, scale=0.125), (q, kv)),
           "masked attention": (lambda q, kv, mask: mx.fast.scaled_dot_product_attention(
               q, kv, kv, scale=0.125, mask=mask), (q, kv, mask))}
    return {name: primitives((mx.compile(op) if compiled else op)(*inputs))["computing"]
            for name, (op, inputs) in ops.items()}


# the fast ops that are one kernel there (MLX 0.32's sources): CUDA's fused attention of one query takes no
# mask array (neither its vector kernel nor cuDNN's, which also wants float16 or bfloat16)
FUSED = {"metal": {"layer_norm", "attention", "masked attention"}, "cuda": {"layer_norm", "attention"}}


def gpu_estimates(computing: int, calls: list[str], compiled: bool) -> dict[str, int]:
    """The computing count with each fast op that is one kernel on Metal and on CUDA taken as one."""
    size = composite_sizes(compiled)
    return {device: computing - sum(size[call] - 1 for call in calls if call in fused)
            for device, fused in FUSED.items()}


def count(folder: str, portable: bool, compiled: bool, numpy_step: bool = False) -> dict[str, int]:
    """The primitives of the eleventh decoding step of a guided generation, compiled or op by op; `numpy_step`:
    the CPU's numpy step (cpu.numpy_decoder), whose MLX graph is guidance and sampling only."""
    musicgen = MusicGen.from_pretrained(folder, portable=portable)
    states, mask = musicgen.conditioning([TEXT], 1, guided=True)
    context = musicgen.model.decoder_context(states, mask, guided=True, skip_needless_mask=True)  # as generation
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
    counted = primitives(column, key)
    if portable and not numpy_step:  # the same step's fast ops, as a new one builds (or traces) its graph
        again = generation.decoding_step(decoder, context, 3.0, sampler, cache, compiled=compiled)
        calls = fast_calls(lambda: again(column[:, :, None], forced, key))
        counted.update(gpu_estimates(counted["computing"], calls, compiled))
    return counted


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="a converted or Hub-layout folder")
    args = p.parse_args()
    result = {"device": str(mx.default_device())}
    on_cpu = mx.default_device() == mx.cpu  # the CPU forms and the numpy step are a CPU's alone
    for form, portable in (("portable", True), ("cpu", False))[: 2 if on_cpu else 1]:
        for mode, compiled in (("eager", False), ("compiled", True)):
            result[f"{form}_{mode}"] = count(args.folder, portable, compiled)
        result[f"{form}_ratio"] = {kind: result[f"{form}_compiled"][kind] / result[f"{form}_eager"][kind]
                                   for kind in result[f"{form}_compiled"]}
    if on_cpu:
        result["cpu_numpy_step"] = count(args.folder, False, False, numpy_step=True)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
