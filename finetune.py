"""Fine-tune MusicGen on your own music (LoRA) in MLX: `python finetune.py --help` (the same as
`mlx_musicgen.finetune`).

    python finetune.py --model facebook/musicgen-small --data my_clips --adapter-path my_style --iters 1000
"""

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.finetune import main

if __name__ == "__main__":
    main()
