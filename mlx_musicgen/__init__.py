"""MusicGen text-to-music in MLX."""

from ._blas import load_optimized_blas

__version__ = "0.1.0"

BLAS = load_optimized_blas()  # must run before the first `import mlx`

from .model import MusicGen, MusicGenConfig  # noqa: E402

__all__ = ["MusicGen", "MusicGenConfig", "BLAS"]
