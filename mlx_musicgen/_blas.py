"""Load an optimized BLAS before mlx on Linux.

MLX's Linux wheels link a reference BLAS whose float32 matmul is ~60x slower than an optimized one. Loading one
into the global symbol namespace before mlx is imported makes mlx's BLAS calls resolve to it. In order of speed:
- MKL (pip package `mkl`, installed with the `cpu` extra on x86-64): a decoding step's products of 2-8 rows by
  each weight stream at the memory bandwidth on its own threads, so the decoder runs as one stream.
- OpenBLAS (Debian's libopenblas0-pthread): it repacks whole weights for such products, so the decoder works
  around it with its own two streams (cpu.py) and OpenBLAS runs one thread.
"""

import ctypes
import os
import sys
from pathlib import Path

MKL = "mkl"
OPENBLAS = "openblas"
OPENBLAS_NAMES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so")
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so")


LOADED: str | None = None  # what load_optimized_blas loaded


def load_optimized_blas() -> str | None:
    """Returns MKL, OPENBLAS, or None (not Linux, mlx already imported, turned off, or neither installed).

    MLX_MUSICGEN_BLAS=openblas skips MKL; MLX_MUSICGEN_NO_BLAS_FIX=1 loads nothing."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    if os.environ.get("MLX_MUSICGEN_NO_BLAS_FIX"):
        return None
    global LOADED
    if os.environ.get("MLX_MUSICGEN_BLAS", MKL) == MKL and load_mkl():
        LOADED = MKL
    else:
        # Our CPU code runs its own two streams of small products (cpu.py); OpenBLAS's worker threads would only
        # spin against them (EnCodec decodes ~10% faster with one).
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
        LOADED = OPENBLAS if load_first(OPENBLAS_NAMES) else None
    return LOADED


def load_mkl() -> bool:
    # The pip wheel puts its libraries in the environment's lib/ folder, which the loader does not search.
    folders = [Path(sys.prefix) / "lib", Path(sys.base_prefix) / "lib"]
    candidates = [str(folder / name) for folder in folders for name in MKL_NAMES] + list(MKL_NAMES)
    if load_first(("libgomp.so.1",)):
        # GNU OpenMP: the runtime torch and compilers bring anyway, so a process never holds two of them.
        os.environ.setdefault("MKL_THREADING_LAYER", "GNU")
    return load_first(candidates)


def load_first(names) -> bool:
    for name in names:
        try:
            ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False
