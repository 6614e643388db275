"""Convert a Hugging Face MusicGen checkpoint (Hub id or folder) to an MLX folder: `python convert.py --help`
(the same as `python -m mlx_musicgen.convert`).

    python convert.py --hf-path facebook/musicgen-small --mlx-path mlx_model [--dtype float16] [-q --q-bits 4]
"""

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.convert import main

if __name__ == "__main__":
    main()
