"""MusicGen text-to-music in MLX."""

from ._blas import load_optimized_blas

BLAS = load_optimized_blas()  # must run before the first `import mlx`

from .model import MusicGen, MusicGenConfig  # noqa: E402

__all__ = ["MusicGen", "MusicGenConfig", "BLAS"]
