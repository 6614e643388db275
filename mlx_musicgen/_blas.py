"""Load an optimized BLAS before mlx on Linux.

MLX's Linux wheels link a reference BLAS whose float32 matmul is ~60x slower than OpenBLAS. Loading
libopenblas into the global symbol namespace before mlx is imported makes mlx's BLAS calls resolve to it.
"""

import ctypes
import os
import sys

CANDIDATES = ("libopenblas.so.0", "libopenblas.so", "libopenblasp-r0.so")


def load_optimized_blas() -> str | None:
    """Returns the library loaded, or None (not Linux, mlx already imported, or no OpenBLAS installed)."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return None
    if os.environ.get("MLX_MUSICGEN_NO_BLAS_FIX"):
        return None
    # Our CPU code runs its own two streams of small products (cpu.py); OpenBLAS's worker threads would only
    # spin against them (EnCodec decodes ~10% faster with one).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for name in CANDIDATES:
        try:
            ctypes.CDLL(name, mode=os.RTLD_GLOBAL)
            return name
        except OSError:
            continue
    return None
