"""Convert a Hugging Face MusicGen checkpoint (Hub id or folder) to an MLX folder: `python convert.py --help`
(the same as `mlx_musicgen.convert`, and it also reads checkpoints that have only pytorch_model.bin files).

    python convert.py --hf-path facebook/musicgen-small --mlx-path mlx_model [--dtype float16] [-q --q-bits 4]
"""

from pathlib import Path

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.convert import main


def read_torch_bin(files: list[Path]) -> dict:
    """Older checkpoints (pytorch_model.bin): torch's safe loader (tensors only, no code). This script is the
    only place torch is used outside tests and benchmarks."""
    import mlx.core as mx

    from mlx_musicgen.loading import CheckpointError

    try:
        import torch
    except ImportError:
        raise CheckpointError(
            f"{files[0].parent} has only pytorch_model.bin weights: install torch to convert it once "
            "(`pip install torch`), then use the converted folder."
        ) from None
    weights = {}
    for file in files:
        state = torch.load(file, map_location="cpu", weights_only=True)
        weights.update({k: mx.array(v.float().numpy()) for k, v in state.items()})
    return weights


if __name__ == "__main__":
    main(read_bin=read_torch_bin)
