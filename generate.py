"""Generate music from text with MusicGen on MLX: `python generate.py --help` (the same as `mlx_musicgen.generate`).

    python generate.py --text "80s pop track with bassy drums and synth" --duration 8 --output out.wav
"""

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.generate import main

if __name__ == "__main__":
    main()
