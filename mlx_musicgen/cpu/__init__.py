"""The CPU's fast paths, beside the portable model: `optimize_for_cpu(model)` swaps modules of a loaded MusicGen
for ones with the same interface and the same outputs that run faster on a CPU (see docs/PERFORMANCE.md).

MusicGen.from_pretrained calls it when MLX's default device is the CPU, unless MLX_MUSICGEN_PORTABLE=1.
Nothing here changes the saved format: weights are re-laid in memory at load.
"""

from __future__ import annotations

import os
import warnings

import mlx.core as mx

from .. import _linux

_streams: dict[str, tuple[mx.Stream, mx.Stream]] = {}


def portable_requested() -> bool:
    """MLX_MUSICGEN_PORTABLE=1 (or any value but 0/empty): run the portable model as Metal and CUDA do."""
    return os.environ.get("MLX_MUSICGEN_PORTABLE", "") not in ("", "0")


def optimize_for_cpu(model) -> None:
    """Swap the decoder's and EnCodec's modules for their CPU forms, in place (a MusicGen, loaded)."""
    from .decoder import optimize_decoder
    from .encodec import optimize_encodec

    optimize_decoder(model.decoder)
    optimize_encodec(model.audio_encoder)


def warn_if_slow(model) -> None:
    """MLX's CPU has a BLAS path for float32 products only: half precision and quantized decoders run ~10x
    slower there (they are the fast paths on Metal and CUDA)."""
    if model.config.quantization:
        kind, fix = f"{model.config.quantization['bits']}-bit quantized", "convert it again without -q"
    elif (dtype := model.decoder.dtype) != mx.float32:
        kind, fix = str(dtype).removeprefix("mlx.core."), "load it with --dtype float32 (dtype=mx.float32)"
    else:
        return
    warnings.warn(f"this decoder is {kind}, which on a CPU runs ~10x slower than float32: {fix}", stacklevel=3)


def blas_threads_itself() -> bool:
    """Whether the CPU's BLAS runs each product on every core by itself (MKL). If not (OpenBLAS, one thread),
    the CPU modules parallelise over two streams themselves."""
    return _linux.LOADED == _linux.MKL


def parallel_streams() -> tuple[mx.Stream, mx.Stream]:
    """Two streams of the default device, for work that can run on two CPU cores at once.

    With MKL, one stream twice: MKL's own threads already use every core, and MKL called from two threads
    gets a thread team for each, after which every product runs slower (docs/PERFORMANCE.md)."""
    device = mx.default_device()
    key = str(device)
    if key not in _streams:
        if device == mx.cpu and blas_threads_itself():
            stream = mx.default_stream(device)
            _streams[key] = (stream, stream)
        else:
            _streams[key] = (mx.new_stream(device), mx.new_stream(device))
    return _streams[key]
