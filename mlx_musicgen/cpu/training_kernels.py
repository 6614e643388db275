"""numba kernels for numpy_training: a training step's row-wise passes, forward and backward (layer norm, GELU,
softmax, cross-entropy), each one pass over its rows with the rows split among numba's threads. The products
between them are numpy's (BLAS's, on its own threads).

MLX runs these passes on one core of a CPU, as a dozen element-wise kernels each; here each is one loop, on
every core (docs/performance.md, Fine-tuning). numba does not check bounds: numpy_training gives every kernel
the arrays it makes itself, of the shapes written below (and checks the codes against the vocabulary). numba's
cache is keyed on this file: the constants and inlined helpers it imports (cpu.training's exp, cpu.kernels' erf
and moments) are compiled in, so a change there needs the cache (__pycache__/*.nbi, *.nbc) cleared.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from .kernels import mean_and_rstd, normal_cdf
from .training import EXP_P, LN2_HIGH, LN2_LOW, LOG2E, LOWEST

_JIT = dict(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)  # as cpu.kernels'
_EXP_P = np.array(EXP_P[::-1], np.float32)  # highest power first, for Horner's rule


@numba.njit(inline="always", fastmath={"reassoc", "contract"})
def _exp_nonpositive(values: np.ndarray, bits: np.ndarray) -> None:
    """values := e^values (each <= 0), in place, as cpu.training.exp_nonpositive computes it (z = n ln 2 + r,
    a polynomial for e^r, 2^n from its exponent bits, written to `bits`, an int32 array as long): two loops that
    LLVM vectorises, where numba's exp is libm's, one value at a time."""
    for j in range(values.shape[0]):
        z = max(values[j], np.float32(LOWEST))
        n = np.floor(z * np.float32(LOG2E) + np.float32(0.5))
        r = (z - n * np.float32(LN2_HIGH)) - n * np.float32(LN2_LOW)
        p = _EXP_P[0]
        for c in _EXP_P[1:]:
            p = p * r + c
        values[j] = (p * r + np.float32(1)) * r + np.float32(1)
        bits[j] = (np.int32(n) + 127) << 23
    powers = bits.view(np.float32)
    for j in range(values.shape[0]):
        values[j] *= powers[j]


@numba.njit(**_JIT)
def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray, out: np.ndarray, normalized: np.ndarray,
               rstd: np.ndarray) -> None:
    """out (N, D) = normalized * weight + bias, normalized = (x - mean) * rstd, rstd = 1 / sqrt(var + 1e-5), per
    row of x (N, D); normalized and rstd (N,) kept for the backward pass."""
    for r in numba.prange(x.shape[0]):
        mean, scale = mean_and_rstd(x[r])
        rstd[r] = scale
        for d in range(x.shape[1]):
            n = (x[r, d] - mean) * scale
            normalized[r, d] = n
            out[r, d] = n * weight[d] + bias[d]


@numba.njit(**_JIT)
def layer_norm_backward(grad_out: np.ndarray, normalized: np.ndarray, rstd: np.ndarray, weight: np.ndarray,
                        grad_x: np.ndarray) -> None:
    """grad_x (N, D) += the layer norm's vector-Jacobian product: with g = grad_out * weight,
    rstd * (g - mean(g) - normalized * mean(g * normalized)) per row (the residual's gradient flows past it)."""
    width = np.float32(normalized.shape[1])
    for r in numba.prange(normalized.shape[0]):
        mean_g, mean_gn = np.float32(0), np.float32(0)
        for d in range(normalized.shape[1]):
            g = grad_out[r, d] * weight[d]
            mean_g += g
            mean_gn += g * normalized[r, d]
        mean_g /= width
        mean_gn /= width
        for d in range(normalized.shape[1]):
            grad_x[r, d] += rstd[r] * (grad_out[r, d] * weight[d] - mean_g - normalized[r, d] * mean_gn)


@numba.njit(**_JIT)
def gelu(x: np.ndarray, out: np.ndarray) -> None:
    """out = x * Phi(x), the exact GELU, x (N, F)."""
    for r in numba.prange(x.shape[0]):
        for n in range(x.shape[1]):
            out[r, n] = x[r, n] * normal_cdf(x[r, n])


@numba.njit(**_JIT)
def gelu_backward(x: np.ndarray, grad: np.ndarray) -> None:
    """grad (N, F) *= GELU's derivative at x, Phi(x) + x phi(x), in place."""
    density = np.float32(1 / math.sqrt(2 * math.pi))
    for r in numba.prange(x.shape[0]):
        exponent = np.empty(x.shape[1], np.float32)
        for n in range(x.shape[1]):
            exponent[n] = np.float32(-0.5) * x[r, n] * x[r, n]
        _exp_nonpositive(exponent, np.empty(x.shape[1], np.int32))
        for n in range(x.shape[1]):
            v = x[r, n]
            grad[r, n] *= normal_cdf(v) + v * density * exponent[n]


@numba.njit(**_JIT)
def softmax(scores: np.ndarray, scale: float, mask: np.ndarray, causal: bool) -> None:
    """scores (B, H, L, S) := softmax(scores * scale + mask) over S, in place; mask (B, S) additive (a text's
    padding), or (B, 0): none. `causal`: query i sees the keys up to S - L + i; the others get weight 0."""
    B, H, L, S = scores.shape
    scale32 = np.float32(scale)
    for g in numba.prange(B * H * L):
        b, i = g // (H * L), g % L
        row = scores[b, (g // L) % H, i]
        seen = S - L + i + 1 if causal else S
        top = np.float32(-np.inf)
        for j in range(seen):
            value = row[j] * scale32
            if mask.shape[1]:
                value += mask[b, j]
            row[j] = value
            top = max(top, value)
        for j in range(seen):
            row[j] -= top
        _exp_nonpositive(row[:seen], np.empty(seen, np.int32))
        total = np.float32(0)
        for j in range(seen):
            total += row[j]
        inverse = np.float32(1) / total
        for j in range(seen):
            row[j] *= inverse
        for j in range(seen, S):
            row[j] = 0


@numba.njit(**_JIT)
def softmax_backward(weights: np.ndarray, grad: np.ndarray, scale: float) -> None:
    """grad (B, H, L, S) := the gradient of the scores (before `scale`) from that of the softmax's weights,
    scale * weights * (grad - sum(grad * weights)) per row, in place (0 wherever a weight is 0)."""
    B, H, L, S = weights.shape
    scale32 = np.float32(scale)
    for g in numba.prange(B * H * L):
        b, h, i = g // (H * L), (g // L) % H, g % L
        w, d = weights[b, h, i], grad[b, h, i]
        total = np.float32(0)
        for j in range(S):
            total += w[j] * d[j]
        for j in range(S):
            d[j] = scale32 * w[j] * (d[j] - total)


@numba.njit(**_JIT)
def cross_entropy(logits: np.ndarray, labels: np.ndarray, weights: np.ndarray, losses: np.ndarray) -> None:
    """Per row of logits (N, V): losses[r] = weights[r] * (logsumexp(logits[r]) - logits[r, labels[r]]), and
    logits[r] := its gradient, weights[r] * (softmax(logits[r]) - onehot(labels[r])), in place (a row of weight 0,
    a label not predicted: loss 0 and gradient 0)."""
    for r in numba.prange(logits.shape[0]):
        row = logits[r]
        if weights[r] == 0:
            row[:] = 0
            losses[r] = 0
            continue
        label = labels[r]
        target, top = row[label], np.float32(-np.inf)
        for v in range(row.shape[0]):
            top = max(top, row[v])
        for v in range(row.shape[0]):
            row[v] -= top
        _exp_nonpositive(row, np.empty(row.shape[0], np.int32))
        total = np.float32(0)
        for v in range(row.shape[0]):
            total += row[v]
        losses[r] = weights[r] * (np.log(total) + top - target)
        scale = weights[r] / total
        for v in range(row.shape[0]):
            row[v] *= scale
        row[label] -= weights[r]


KERNELS = (layer_norm, layer_norm_backward, gelu, gelu_backward, softmax, softmax_backward, cross_entropy)


def compile_all() -> bool:
    """Call every kernel once, with the argument types that numpy_training gives it (so each is compiled, or
    loaded from numba's cache, once, before a step: ~9 s the first time on a machine, then ~0.4 s); True."""
    one, row, rows = np.ones((1, 1, 1, 1), np.float32), np.ones(1, np.float32), np.ones((1, 1), np.float32)
    layer_norm(rows, row, row, rows.copy(), rows.copy(), row.copy())
    layer_norm_backward(rows, rows, row, row, rows.copy())
    gelu(rows, rows.copy())
    gelu_backward(rows, rows.copy())
    softmax(one.copy(), 1.0, rows, True)
    softmax_backward(one, one.copy(), 1.0)
    cross_entropy(rows.copy(), np.zeros(1, np.int64), row, row.copy())
    return True
