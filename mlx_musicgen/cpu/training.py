"""Training on a CPU: `optimize_for_training(model)` swaps, in place, the decoder's attention and GELU for forms
that compute the same functions (in float32, to its rounding, whatever the model's dtype) and whose gradients
are the exact formulas, with the exponentials and erf vectorised.

MLX's CPU `exp` and `erf` run element by element through libm. Training attends over hundreds of positions, so
its softmax takes exp of heads x length^2 scores a layer, and the feed-forward's GELU takes erf (forward) and
exp (backward) of length x ffn_dim values; at musicgen-small's shape on 10 s of audio they were most of a LoRA
step's time beyond its products (docs/performance.md). Here:
- exp(z), z <= 0: Cody-Waite range reduction z = n ln2 + r, |r| <= ln2/2, Cephes' degree-7 polynomial for e^r,
  and 2^n from its exponent bits (relative error < 1e-7);
- softmax through that exp, its vector-Jacobian product y * (g - sum(g * y)) (no exp at all);
- GELU x * Phi(x) with the rational erf of the CPU decoder (cpu.decoder.erf), its derivative Phi(x) + x phi(x).
The parameters and their names do not change; a model trained so saves and loads as the portable one.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..decoder import Attention, DecoderLayer
from .decoder import erf, polynomial

LOG2E = 1.4426950408889634
LN2_HIGH, LN2_LOW = 0.693359375, -2.12194440e-4  # ln 2 in two parts: n * LN2_HIGH is exact for |n| < 2**15
ROUND = 12582912.0  # 1.5 * 2**23: x + ROUND - ROUND rounds x to an integer, in float32
EXP_P = (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2, 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4)
# (Not cpu.encodec's expm1: its Taylor series with doublings is built for ELU near 0, and loses
# accuracy far from it; a softmax needs e^z to within float32's rounding down to z = -87.)
LOWEST = -88.0  # below float32's smallest normal number (e^-87.34); from here on 2^n is 0 or 2^-126


@mx.compile  # not shapeless: MLX cannot trace mx.view without shapes
def exp_nonpositive(z: mx.array) -> mx.array:
    """e^z for z <= 0 (-inf included: 0), vectorised, in float32 whatever z's dtype; under e^-87.34, float32's
    smallest normal number, 0 or subnormal. Not differentiable (its users give their own VJPs)."""
    z = mx.maximum(z.astype(mx.float32), LOWEST)
    n = (z * LOG2E + ROUND) - ROUND  # -127 <= n <= 0, and z = n ln 2 + r
    r = (z - n * LN2_HIGH) - n * LN2_LOW
    power_of_two = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # n = -127: 0
    return ((polynomial(r, EXP_P) * r + 1.0) * r + 1.0) * power_of_two


@mx.custom_function
@mx.compile
def softmax(scores: mx.array) -> mx.array:
    """softmax over the last axis (rows with at least one finite score)."""
    e = exp_nonpositive(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@softmax.vjp
@mx.compile
def softmax_vjp(scores: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    return output * (cotangent - (cotangent * output).sum(axis=-1, keepdims=True))


def attention(queries: mx.array, keys: mx.array, values: mx.array, scale: float,
              mask: mx.array | str | None = None) -> mx.array:
    """mx.fast.scaled_dot_product_attention's function, for the arguments the decoder gives it: queries
    (B, heads, L, d), keys and values (B, heads, S, d) with as many heads, the mask additive, boolean (True:
    attend) or "causal" (the L queries are the last of the S positions, L <= S). The softmax is float32."""
    if queries.shape[2] == 1:  # a decoding step: nothing to vectorise
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)
    scores = (queries * scale) @ keys.swapaxes(-1, -2)
    if isinstance(mask, str):
        length, span = scores.shape[-2:]
        mask = mx.arange(length)[:, None] + (span - length) >= mx.arange(span)[None]
    if mask is not None and mask.dtype == mx.bool_:
        scores = mx.where(mask, scores, -mx.inf)
    elif mask is not None:
        scores = scores + mask
    return softmax(scores.astype(mx.float32)).astype(values.dtype) @ values


def normal_cdf(x: mx.array) -> mx.array:
    """Phi(x), the standard normal distribution's CDF, with the rational erf."""
    return (1.0 + erf(x * math.sqrt(0.5))) * 0.5


@mx.custom_function
@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, x * Phi(x), computed in float32 (the rational erf is float32's) in x's dtype."""
    x32 = x.astype(mx.float32)
    return (x32 * normal_cdf(x32)).astype(x.dtype)


@gelu.vjp
@mx.compile
def gelu_vjp(x: mx.array, cotangent: mx.array, output: mx.array) -> mx.array:
    """GELU's derivative Phi(x) + x phi(x), phi the standard normal density, times the cotangent."""
    x32 = x.astype(mx.float32)
    density = exp_nonpositive(-0.5 * x32 * x32) * (1 / math.sqrt(2 * math.pi))
    return (cotangent.astype(mx.float32) * (normal_cdf(x32) + x32 * density)).astype(x.dtype)


def optimize_for_training(model: nn.Module) -> None:
    """Swap the decoder's attention and exact GELU for the forms above, in place (parameters untouched)."""
    for _, module in model.named_modules():
        if isinstance(module, Attention):
            module.attend = attention
        elif isinstance(module, DecoderLayer) and module.activation is nn.gelu:
            module.activation = gelu
