"""Which BLAS the CPU runs, and the streams the CPU modules spread their work over."""

from __future__ import annotations

import os

import mlx.core as mx

from .. import _linux

_streams: dict[str, tuple[mx.Stream, mx.Stream]] = {}


def portable_requested() -> bool:
    """MLX_MUSICGEN_PORTABLE=1 (or any value but 0/empty): run the portable model as Metal and CUDA do."""
    return os.environ.get("MLX_MUSICGEN_PORTABLE", "") not in ("", "0")


def blas_threads_itself() -> bool:
    """Whether the CPU's BLAS runs each product on every core by itself (MKL). If not (OpenBLAS, one thread),
    the CPU modules parallelise over two streams themselves."""
    return _linux.LOADED == _linux.MKL


def parallel_streams() -> tuple[mx.Stream, mx.Stream]:
    """Two streams of the default device, for work that can run on two CPU cores at once.

    With MKL, one stream twice: MKL's own threads already use every core, and MKL called from two threads
    gets a thread team for each, after which every product runs slower (docs/performance.md)."""
    device = mx.default_device()
    key = str(device)
    if key not in _streams:
        if device == mx.cpu and blas_threads_itself():
            stream = mx.default_stream(device)
            _streams[key] = (stream, stream)
        else:
            _streams[key] = (mx.new_stream(device), mx.new_stream(device))
    return _streams[key]
