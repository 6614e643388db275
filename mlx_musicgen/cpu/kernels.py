"""The numpy decoding step's products and attention over the KV cache as numba kernels: each reads its weight (or
a head's keys and values) from memory once, at the rate memory streams it; and the small ops between them (layer
norm, GELU, folded cross-attention), one pass each.

A decoding step with guidance multiplies 2 rows by every weight of the decoder. BLAS's matrix product repacks
the weight for so few rows and its matrix-vector product takes one row: here every row of x is multiplied as
each stretch of the weight arrives from memory, on numba's threads (docs/performance.md). numba, not a BLAS call
or a C extension of our own: no BLAS has this product, and numba compiles it where the package is installed,
with no compiler needed.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from typing import Iterator

import numba
import numpy as np

from .decoder import ERF_P, ERF_Q

# Sums may be reordered (as BLAS does) and fused into FMAs, which lets LLVM vectorise them; numba's full fastmath
# would also assume no inf or NaN, which a step's inputs may hold (the sampler reports them).
_JIT = dict(parallel=True, fastmath={"reassoc", "contract"}, cache=True, nogil=True)


@numba.njit(**_JIT)
def _times_weight(x: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """out (R, N) = x (R, K) @ weight (N, K)^T: weight's rows are split among the threads; each row, read from
    memory once, is multiplied by two rows of x at a time, each element loaded once for both (an odd row last,
    the weight's row then from the L1 cache)."""
    rows = x.shape[0]
    for n in numba.prange(weight.shape[0]):
        for r in range(0, rows - 1, 2):
            first, second = np.float32(0), np.float32(0)
            for k in range(weight.shape[1]):
                w = weight[n, k]
                first += w * x[r, k]
                second += w * x[r + 1, k]
            out[r, n], out[r + 1, n] = first, second
        if rows % 2:
            total = np.float32(0)
            for k in range(weight.shape[1]):
                total += weight[n, k] * x[rows - 1, k]
            out[rows - 1, n] = total


@numba.njit(**_JIT)
def _times_weight_t(x: np.ndarray, weight_t: np.ndarray, partials: np.ndarray) -> None:
    """partials (T, R, N), summed over T = x (R, K) @ weight_t (K, N): weight_t's rows (x's columns) are split
    into T runs, one a thread, each streamed from memory once into that thread's partial sums (in the cache),
    four of its rows a pass (a quarter of the partial sums' loads and stores) for two rows of x at a time, each
    element loaded once for both (an odd row last, the run then from the cache)."""
    inputs, threads, rows, width = weight_t.shape[0], partials.shape[0], x.shape[0], weight_t.shape[1]
    run = (inputs + threads - 1) // threads
    for t in numba.prange(threads):
        sums = partials[t]
        sums[:] = 0
        start, end = t * run, min(inputs, (t + 1) * run)
        for r in range(0, rows - 1, 2):
            first, second = sums[r], sums[r + 1]
            k = start
            while k + 4 <= end:
                a0, b0, c0, d0 = x[r, k], x[r, k + 1], x[r, k + 2], x[r, k + 3]
                a1, b1, c1, d1 = x[r + 1, k], x[r + 1, k + 1], x[r + 1, k + 2], x[r + 1, k + 3]
                for n in range(width):
                    w0, w1, w2, w3 = weight_t[k, n], weight_t[k + 1, n], weight_t[k + 2, n], weight_t[k + 3, n]
                    first[n] += a0 * w0 + b0 * w1 + c0 * w2 + d0 * w3
                    second[n] += a1 * w0 + b1 * w1 + c1 * w2 + d1 * w3
                k += 4
            for tail in range(k, end):
                first += x[r, tail] * weight_t[tail]
                second += x[r + 1, tail] * weight_t[tail]
        if rows % 2:
            last, k = rows - 1, start
            while k + 4 <= end:
                a, b, c, d = x[last, k], x[last, k + 1], x[last, k + 2], x[last, k + 3]
                for n in range(width):
                    sums[last, n] += a * weight_t[k, n] + b * weight_t[k + 1, n] + c * weight_t[k + 2, n] \
                        + d * weight_t[k + 3, n]
                k += 4
            for tail in range(k, end):
                sums[last] += x[last, tail] * weight_t[tail]


@numba.njit(**_JIT)
def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, out: np.ndarray) -> None:
    """out (B, H, D) = softmax(keys[:, :, :length] . q) @ values[:, :, :length] for each row and head, q (B, H, D)
    scaled already, keys and values (B, H, positions, D): the rows' heads are split among the threads, and each
    head's keys and values are read from memory once."""
    heads, width = q.shape[1], q.shape[2]
    for i in numba.prange(q.shape[0] * heads):
        b, h = i // heads, i % heads
        scores = np.empty(length, np.float32)
        for p in range(length):
            score = np.float32(0)
            for d in range(width):
                score += keys[b, h, p, d] * q[b, h, d]
            scores[p] = score
        top = scores.max()
        total = np.float32(0)
        for p in range(length):
            scores[p] = np.exp(scores[p] - top)
            total += scores[p]
        mixed = np.zeros(width, np.float32)
        for p in range(length):
            for d in range(width):
                mixed[d] += scores[p] * values[b, h, p, d]
        for d in range(width):
            out[b, h, d] = mixed[d] / total


# The rational erf of cpu.decoder (Eigen's and XLA's), highest power first for Horner's rule, in float32 as numpy
# computes it on float32 arrays.
_ERF_P = np.array(ERF_P[::-1], np.float32)
_ERF_Q = np.array(ERF_Q[::-1], np.float32)


_SMALL = dict(fastmath={"reassoc", "contract"}, cache=True, nogil=True)  # one thread: microseconds of work


@numba.njit(**_SMALL)
def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of x (B, N) float32, with cpu.decoder's rational erf, in float32 and one pass (numpy
    makes ~25)."""
    out = np.empty_like(x)
    half_sqrt2, one, half = np.float32(math.sqrt(0.5)), np.float32(1), np.float32(0.5)
    for r in range(x.shape[0]):
        for n in range(x.shape[1]):
            value = x[r, n]
            z = min(max(value * half_sqrt2, np.float32(-4)), np.float32(4))
            z2 = z * z
            p, q = _ERF_P[0], _ERF_Q[0]
            for c in _ERF_P[1:]:
                p = p * z2 + c
            for c in _ERF_Q[1:]:
                q = q * z2 + c
            out[r, n] = value * (one + z * p / q) * half
    return out


@numba.njit(**_SMALL)
def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    width, eps = np.float32(x.shape[1]), np.float32(1e-5)
    for r in range(x.shape[0]):
        mean = np.float32(0)
        for d in range(x.shape[1]):
            mean += x[r, d]
        mean /= width
        variance = np.float32(0)
        for d in range(x.shape[1]):
            variance += (x[r, d] - mean) * (x[r, d] - mean)
        scale = np.float32(1) / np.sqrt(variance / width + eps)
        for d in range(x.shape[1]):
            out[r, d] = (x[r, d] - mean) * scale * weight[d] + bias[d]
    return out


@numba.njit(**_SMALL)
def _folded_cross_attention(h: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray,
                            heads: int) -> np.ndarray:
    out = np.zeros_like(h)
    positions, width = keys.shape[1] // heads, h.shape[1]
    weights = np.empty(keys.shape[1], np.float32)
    for r in range(keys.shape[0]):
        for j in range(keys.shape[1]):  # a score for each head and text position: the query is folded in
            score = np.float32(0)
            for d in range(width):
                score += keys[r, j, d] * h[r, d]
            weights[j] = score + mask[r, 0, j % positions]
        for head in range(heads):
            part = weights[head * positions:(head + 1) * positions]
            part[:] = np.exp(part - part.max())
            part /= part.sum()
        for j in range(keys.shape[1]):  # the output projection is folded into the values
            for d in range(width):
                out[r, d] += weights[j] * values[r, j, d]
    return out


def _check(condition: bool, what: str) -> None:
    """numba does not check bounds: shapes that disagree would read past an array."""
    if not condition:
        raise ValueError(f"cpu.kernels: {what}")


def times_weight(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (R, K) @ weight.T: weight (N, K), C-contiguous float32, as nn.Linear stores it -> (R, N)."""
    _check(x.ndim == 2 and x.shape[1] == weight.shape[1], f"x {x.shape} does not fit a weight {weight.shape}")
    out = np.empty((x.shape[0], weight.shape[0]), np.float32)
    _times_weight(np.ascontiguousarray(x, np.float32), weight, out)
    return out


def times_weight_t(x: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """x (R, K) @ weight_t: weight_t (K, N), C-contiguous float32 (a cpu.decoder.TransposedLinear's) -> (R, N)."""
    _check(x.ndim == 2 and x.shape[1] == weight_t.shape[0], f"x {x.shape} does not fit a weight_t {weight_t.shape}")
    partials = np.empty((numba.get_num_threads(), x.shape[0], weight_t.shape[1]), np.float32)
    _times_weight_t(np.ascontiguousarray(x, np.float32), weight_t, partials)
    return np.add.reduce(partials, axis=0)


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int) -> np.ndarray:
    """Attention of one position over the first `length` (>= 1) of a KV cache: q (B, H, D), scaled; keys, values
    (B, H, positions, D), the cache's whole C-contiguous float32 arrays -> (B, H, D)."""
    _check(keys.shape == values.shape and keys.shape[:2] + keys.shape[3:] == q.shape and 1 <= length <= keys.shape[2],
           f"q {q.shape} and {length} positions do not fit keys {keys.shape} and values {values.shape}")
    out = np.empty(q.shape, np.float32)
    _attend(np.ascontiguousarray(q, np.float32), keys, values, int(length), out)
    return out


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (B, D) float32 normalised over D (eps 1e-5, nn.LayerNorm's), scaled by weight and shifted by bias (D,)."""
    _check(x.ndim == 2 and weight.shape == bias.shape == x.shape[1:], f"a norm of {weight.shape} for x {x.shape}")
    return _layer_norm(x, weight, bias)


def folded_cross_attention(h: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray,
                           heads: int) -> np.ndarray:
    """Cross-attention with the text folded into the keys and values (cpu.decoder.fold_text): h (B, D); keys and
    values (rows, heads * S, D) for the first `rows` of h (the others attend to no text: 0); mask (B, 1, S),
    additive -> (B, D)."""
    _check(keys.shape == values.shape and keys.shape[0] <= h.shape[0] == mask.shape[0] and keys.shape[2] == h.shape[1]
           and keys.shape[1] == heads * mask.shape[2],
           f"h {h.shape}, mask {mask.shape} and {heads} heads do not fit keys {keys.shape} and values {values.shape}")
    return _folded_cross_attention(h, keys, values, mask, heads)


def fast_threading_layer() -> bool:
    """Whether numba's threads come from TBB or OpenMP (a decoding step's products on them beat BLAS's
    matrix-vector products here) rather than numba's own work queue (on which they lose: docs/performance.md).
    Compiles every kernel (or loads it from numba's cache) and starts the threads, so that no step pays for it."""
    one = np.ones((1, 1), np.float32)
    times_weight(one, one)
    times_weight_t(one, one)
    attend(one[None], one[None, None], one[None, None], 1)
    layer_norm(gelu(one), one[0], one[0])
    folded_cross_attention(one, one[None], one[None], np.zeros((1, 1, 1, 1), np.float32)[:, 0], 1)
    return numba.threading_layer() != "workqueue"


def thread_counts(cores: int) -> list[int]:
    """The teams of numba's threads to choose from for `cores` usable cores (every one, one less, one), the
    default first, at most numba's own count; only that count where the user set it (NUMBA_NUM_THREADS)."""
    if "NUMBA_NUM_THREADS" in os.environ:
        return [numba.config.NUMBA_NUM_THREADS]
    return sorted({min(n, numba.config.NUMBA_NUM_THREADS) for n in (cores, max(1, cores - 1), 1)}, reverse=True)


@contextmanager
def threads(count: int) -> Iterator[None]:
    """The kernels called inside, from this thread, run on `count` of numba's threads; then as before."""
    before = numba.get_num_threads()
    numba.set_num_threads(count)
    try:
        yield
    finally:
        numba.set_num_threads(before)
