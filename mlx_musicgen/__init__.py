"""MusicGen text-to-music in MLX."""

from . import _linux

__version__ = "0.1.0"

_linux.load_optimized_blas()  # must run before the first `import mlx`
_linux.keep_freed_memory()

from .generation import GenerationConfig  # noqa: E402
from .model import MusicGen, MusicGenConfig  # noqa: E402

__all__ = ["MusicGen", "MusicGenConfig", "GenerationConfig"]
