"""The CPU's fast paths, beside the portable model: `optimize_for_cpu(decoder, audio_encoder)` swaps modules of a
loaded model for ones with the same interface and the same outputs that run faster on a CPU, and returns what the
step loop should decode with (see docs/performance.md); `text_encoder_for_cpu(encoder)` returns what should encode
the texts (T5 in numpy, cpu.numpy_t5); `optimize_for_training(model)` swaps the decoder's modules for training
(trainer.Trainer), and `numpy_loss_and_grad(model)` computes a fine-tune's loss and gradients (LoRA's or the whole
decoder's) in numpy (cpu.numpy_training).

MusicGen.from_pretrained calls optimize_for_cpu and text_encoder_for_cpu when MLX's default device is the CPU, unless
MLX_MUSICGEN_PORTABLE=1.
Nothing here changes the saved format: weights are re-laid in memory at load.
"""

from __future__ import annotations

import warnings

import mlx.core as mx

from ..decoder import MusicgenDecoder
from ..generation import DelayedLM
from ..encodec import EncodecModel
from ..magnet import MagnetDecoder
from ..t5 import T5Encoder, TextEncoder
from .decoder import optimize_decoder, timing_step, uses_blas
from .encodec import optimize_encodec
from .numpy_decoder import fastest_lm
from .numpy_t5 import NumpyT5
from .numpy_training import loss_and_grad as numpy_loss_and_grad
from .threads import choose_blas_team, every_core_for_blas, portable_requested
from .training import optimize_for_training

__all__ = ["optimize_for_cpu", "text_encoder_for_cpu", "optimize_for_training", "numpy_loss_and_grad",
           "warn_if_slow", "portable_requested"]


def optimize_for_cpu(decoder: MusicgenDecoder, audio_encoder: EncodecModel) -> DelayedLM:
    """Swap the decoder's and EnCodec's modules for their CPU forms, in place; with MKL, size MKL's thread team by
    timing a few decoding steps (threads.choose_blas_team), and return the faster of the compiled decoder and its
    numpy form (numpy_decoder.fastest_lm) for the step loop, else the decoder. MAGNeT's decoder reads whole clips,
    as training does: it takes training's forms of attention and GELU, and every core for its products."""
    optimize_encodec(audio_encoder)
    if isinstance(decoder, MagnetDecoder):
        optimize_for_training(decoder)
        decoder.products = every_core_for_blas
        return decoder
    optimize_decoder(decoder)
    if not uses_blas(decoder):
        return decoder
    config = decoder.config
    choose_blas_team(timing_step(decoder), (type(decoder).__name__, config.hidden_size, config.ffn_dim,
                                            config.num_hidden_layers, config.num_codebooks))
    return fastest_lm(decoder)


def text_encoder_for_cpu(encoder: T5Encoder) -> TextEncoder:
    """T5 in numpy (cpu.numpy_t5.NumpyT5) where its weights are float32, else the encoder itself."""
    return NumpyT5(encoder) if NumpyT5.supports(encoder) else encoder


def warn_if_slow(decoder: MusicgenDecoder, quantization: dict | None) -> None:
    """MLX's CPU has a BLAS path for float32 products only: half precision and quantized decoders run ~10x
    slower there (they are the fast paths on Metal and CUDA)."""
    if quantization:
        kind, fix = f"{quantization['bits']}-bit quantized", "convert it again without -q"
    elif (dtype := decoder.dtype) != mx.float32:
        kind, fix = str(dtype).removeprefix("mlx.core."), "load it with --dtype float32 (dtype=mx.float32)"
    else:
        return
    warnings.warn(f"this decoder is {kind}, which on a CPU runs ~10x slower than float32: {fix}", stacklevel=3)
