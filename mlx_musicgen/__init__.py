"""MusicGen text-to-music in MLX: `MusicGen.from_pretrained(...)`, then `generate`, `generate_stream`,
`generate_tokens` and `decode`."""

from . import _linux

_linux.load_optimized_blas()  # must run before the first `import mlx`
_linux.keep_freed_memory()

from .model import MusicGenConfig  # noqa: E402
from .musicgen import MusicGen  # noqa: E402
from .settings import GenerationConfig  # noqa: E402
from .version import __version__  # noqa: E402

__all__ = ["MusicGen", "MusicGenConfig", "GenerationConfig", "__version__"]
