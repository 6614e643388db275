"""Convert a Hugging Face MusicGen checkpoint (Hub id or folder) to an MLX folder.

    python convert.py --hf-path facebook/musicgen-small --mlx-path mlx_model [--dtype float16] [-q --q-bits 4]
"""

import argparse
import sys
from pathlib import Path

import mlx_musicgen  # noqa: F401  (first: loads an optimized BLAS before mlx on Linux)
from mlx_musicgen.cli import run_main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-path", default="facebook/musicgen-small", help="Hub id or Hub-layout folder")
    p.add_argument("--mlx-path", default="mlx_model", help="output folder (default mlx_model)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="decoder precision; T5 and EnCodec stay float32 (default float32)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the decoder (4 bits unless --q-bits)")
    p.add_argument("--q-bits", type=int, choices=[4, 8], help="bits per decoder weight (implies -q)")
    p.add_argument("--q-group-size", type=int, default=64, help="quantization group size (default 64)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --mlx-path")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def read_torch_bin(files: list[Path]) -> dict:
    """Older checkpoints (pytorch_model.bin): torch's safe loader (tensors only, no code). Conversion is the
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


def main(args: argparse.Namespace) -> None:
    from mlx_musicgen.cli import Bar
    from mlx_musicgen.convert import STAGES, convert

    bits = args.q_bits or (4 if args.quantize else None)
    with Bar(total=len(STAGES), desc="converting", unit="stage", dynamic_ncols=True,
             bar_format="{desc}: {n}/{total} stages |{bar}| [{elapsed}{postfix}]") as bar:

        def stage(name: str) -> None:
            bar.update(STAGES.index(name) - bar.n)
            bar.set_postfix_str(name)

        out = convert(args.hf_path, args.mlx_path, dtype=args.dtype, q_bits=bits, q_group_size=args.q_group_size,
                      overwrite=args.overwrite, progress=stage, read_bin=read_torch_bin)
        bar.update(len(STAGES) - bar.n)
        bar.set_postfix_str("done")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    args = parse_args()
    run_main(lambda: main(args), args.debug)
