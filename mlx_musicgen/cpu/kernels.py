"""The numpy decoding step's layers as numba kernels (decoder_layer): each product reads its weight (and the
attention each head's keys and values) from memory once, at the rate memory streams it; the small ops between
them (layer norms, GELU, folded cross-attention) take one pass each; and a whole layer is one call from Python.

A decoding step with guidance multiplies 2 rows by every weight of the decoder. BLAS's matrix product repacks
the weight for so few rows and its matrix-vector product takes one row: here both rows of x are multiplied as
each stretch of the weight arrives from memory, on numba's threads (docs/performance.md). numba, not a BLAS call
or a C extension of our own: no BLAS has this product, and numba compiles it where the package is installed,
with no compiler needed. numba does not check bounds: the functions named with an underscore take the shapes
that the public ones (times_weight, times_weight_t, layer_norm, decoder_layer) have checked, each with a plain
condition (a message is formatted only for an error: a step makes ~30 calls).
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import numba
import numpy as np

from .decoder import ERF_P, ERF_Q

# Sums may be reordered (as BLAS does) and fused into FMAs, which lets LLVM vectorise them; numba's full fastmath
# would also assume no inf or NaN, which a step's inputs may hold (the sampler reports them).
_FAST = dict(fastmath={"reassoc", "contract"}, cache=True, nogil=True)
_JIT = dict(parallel=True, **_FAST)  # loops split among numba's threads (numba.prange)


@numba.njit(**_JIT)
def _product(x: np.ndarray, weight: np.ndarray, out: np.ndarray) -> None:
    """out (R, N) = x (R, K) @ weight (N, K)^T: weight's rows are split among the threads; each row, read from
    memory once, is multiplied by two rows of x at a time, each element loaded once for both (an odd row, as a
    step without guidance has, in a pass of its own)."""
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
def _product_t(x: np.ndarray, weight_t: np.ndarray, partials: np.ndarray) -> None:
    """partials (T, R, N), summed over T = x (R, K) @ weight_t (K, N): weight_t's rows (x's columns) are split
    into T runs, one a thread, each streamed from memory once into that thread's partial sums (in the cache),
    four of its rows a pass (a quarter of the partial sums' loads and stores) for two rows of x at a time, each
    element loaded once for both (an odd row in a pass of its own)."""
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
def _attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, length: int, mask: np.ndarray,
           out: np.ndarray) -> None:
    """out (B, H, D) = softmax(keys[:, :, :length] . q + mask) @ values[:, :, :length] for each row and head: q
    (B, H, D) scaled already; keys and values (B, H, positions, D), a KV cache's whole arrays or a text's; mask
    (B, length) additive, or (B, 0) for none. The rows' heads are split among the threads, and each head's keys
    and values are read from memory once."""
    heads, width, masked = q.shape[1], q.shape[2], mask.shape[1] > 0
    for i in numba.prange(q.shape[0] * heads):
        b, h = i // heads, i % heads
        scores = np.empty(length, np.float32)
        for p in range(length):
            score = np.float32(0)
            for d in range(width):
                score += keys[b, h, p, d] * q[b, h, d]
            scores[p] = score + mask[b, p] if masked else score
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


@numba.njit(inline="always", fastmath=_FAST["fastmath"])
def normal_cdf(x: np.float32) -> np.float32:
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2, float32, with cpu.decoder's rational erf (inlined where it is called)."""
    z = min(max(x * np.float32(math.sqrt(0.5)), np.float32(-4)), np.float32(4))
    z2 = z * z
    p, q = _ERF_P[0], _ERF_Q[0]
    for c in _ERF_P[1:]:
        p = p * z2 + c
    for c in _ERF_Q[1:]:
        q = q * z2 + c
    return (np.float32(1) + z * p / q) * np.float32(0.5)


@numba.njit(**_FAST)
def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU of x (B, N) float32, x Phi(x), in float32 and one pass (numpy makes ~25)."""
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        for n in range(x.shape[1]):
            out[r, n] = x[r, n] * normal_cdf(x[r, n])
    return out


@numba.njit(inline="always", fastmath=_FAST["fastmath"])
def mean_and_rstd(row: np.ndarray) -> tuple[np.float32, np.float32]:
    """A row's mean and 1 / sqrt(variance + eps), eps the decoder's LayerNorms' 1e-5, in float32."""
    width = np.float32(row.shape[0])
    mean = np.float32(0)
    for d in range(row.shape[0]):
        mean += row[d]
    mean /= width
    variance = np.float32(0)
    for d in range(row.shape[0]):
        variance += (row[d] - mean) * (row[d] - mean)
    return mean, np.float32(1) / np.sqrt(variance / width + np.float32(1e-5))


@numba.njit(**_FAST)
def _layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        mean, scale = mean_and_rstd(x[r])
        for d in range(x.shape[1]):
            out[r, d] = (x[r, d] - mean) * scale * weight[d] + bias[d]
    return out


@numba.njit(**_FAST)
def _folded_cross_attention(h: np.ndarray, keys: np.ndarray, values: np.ndarray, mask: np.ndarray,
                           heads: int) -> np.ndarray:
    """Cross-attention with the text folded into the keys and values (cpu.decoder.fold_text): h (B, D); keys and
    values (rows, heads * S, D) for the first `rows` of h (the others attend to no text: 0); mask (B, S),
    additive -> (B, D)."""
    out = np.zeros_like(h)
    positions, width = keys.shape[1] // heads, h.shape[1]
    weights = np.empty(keys.shape[1], np.float32)
    for r in range(keys.shape[0]):
        for j in range(keys.shape[1]):  # a score for each head and text position: the query is folded in
            score = np.float32(0)
            for d in range(width):
                score += keys[r, j, d] * h[r, d]
            weights[j] = score + mask[r, j % positions]
        for head in range(heads):
            part = weights[head * positions:(head + 1) * positions]
            part[:] = np.exp(part - part.max())
            part /= part.sum()
        for j in range(keys.shape[1]):  # the output projection is folded into the values
            for d in range(width):
                out[r, d] += weights[j] * values[r, j, d]
    return out


SELF_ONLY, FOLDED, TEXT = 0, 1, 2  # a layer's cross-attention: none (MusicGen-Melody), folded text, text by head
ACTIVATIONS = {"gelu": 0, "relu": 1}


@numba.njit(**_FAST)
def _linear(x: np.ndarray, weight: np.ndarray, transposed: bool, threads: int) -> np.ndarray:
    """x (R, K) times a weight stored (N, K) (product), or transposed (K, N) (product_t, on `threads` threads: numba
    cannot cache a function that asks numba.get_num_threads) -> (R, N)."""
    if not transposed:
        out = np.empty((x.shape[0], weight.shape[0]), np.float32)
        _product(x, weight, out)
        return out
    partials = np.empty((threads, x.shape[0], weight.shape[1]), np.float32)
    _product_t(x, weight, partials)
    out = partials[0].copy()
    for t in range(1, threads):
        out += partials[t]
    return out


@numba.njit(**_FAST)
def _decoder_layer(x, position, cache_keys, cache_values, cross, text_keys, text_values, folded_keys, folded_values,
                   text_mask, norms, products, transposed, scale, activation, threads):
    """decoder_layer's body: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), text); x += fc2(act(fc1(LN(x))))."""
    B, heads, _, width = cache_keys.shape
    self_norm, cross_norm, final_norm = norms[0:2], norms[2:4], norms[4:6]
    q, k, v, out, cross_q, cross_out, fc1, fc2 = products
    h = _layer_norm(x, *self_norm)
    queries = _linear(h, q, transposed[0], threads) * scale
    new_keys, new_values = _linear(h, k, transposed[1], threads), _linear(h, v, transposed[2], threads)
    for b in range(B):
        for head in range(heads):
            for d in range(width):
                cache_keys[b, head, position, d] = new_keys[b, head * width + d]
                cache_values[b, head, position, d] = new_values[b, head * width + d]
    attended, unmasked = np.empty((B, heads, width), np.float32), np.empty((B, 0), np.float32)
    _attend(queries.reshape(B, heads, width), cache_keys, cache_values, position + 1, unmasked, attended)
    x = x + _linear(attended.reshape(B, heads * width), out, transposed[3], threads)
    if cross == FOLDED:
        x = x + _folded_cross_attention(_layer_norm(x, *cross_norm), folded_keys, folded_values, text_mask, heads)
    elif cross == TEXT:
        queries = _linear(_layer_norm(x, *cross_norm), cross_q, transposed[4], threads) * scale
        _attend(queries.reshape(B, heads, width), text_keys, text_values, text_keys.shape[2], text_mask, attended)
        x = x + _linear(attended.reshape(B, heads * width), cross_out, transposed[5], threads)
    h = _linear(_layer_norm(x, *final_norm), fc1, transposed[6], threads)
    return x + _linear(gelu(h) if activation == 0 else np.maximum(h, np.float32(0)), fc2, transposed[7], threads)


def times_weight(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (R, K) @ weight.T: weight (N, K), C-contiguous float32, as nn.Linear stores it -> (R, N)."""
    if not (x.ndim == 2 and x.shape[1] == weight.shape[1]):
        raise ValueError(f"cpu.kernels: x {x.shape} does not fit a weight {weight.shape}")
    return _linear(np.ascontiguousarray(x, np.float32), weight, False, numba.get_num_threads())


def times_weight_t(x: np.ndarray, weight_t: np.ndarray) -> np.ndarray:
    """x (R, K) @ weight_t: weight_t (K, N), C-contiguous float32 (a cpu.decoder.TransposedLinear's) -> (R, N)."""
    if not (x.ndim == 2 and x.shape[1] == weight_t.shape[0]):
        raise ValueError(f"cpu.kernels: x {x.shape} does not fit a weight_t {weight_t.shape}")
    return _linear(np.ascontiguousarray(x, np.float32), weight_t, True, numba.get_num_threads())


def layer_norm(x: np.ndarray, weight: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """x (B, D) float32 normalised over D (eps 1e-5, nn.LayerNorm's), scaled by weight and shifted by bias (D,)."""
    if not (x.ndim == 2 and weight.shape == bias.shape == x.shape[1:]):
        raise ValueError(f"cpu.kernels: a norm of {weight.shape} for x {x.shape}")
    return _layer_norm(x, weight, bias)


@dataclass(frozen=True)
class LayerWeights:
    """A decoder layer's weights as the kernels take them, C-contiguous float32: the (weight, bias) of its three
    layer norms (self-attention, cross-attention, final) as six (D,) arrays; the products q, k, v, out, cross q,
    cross out, fc1, fc2, each stored (out, in) or transposed (in, out) as `transposed` says; the attention's
    scale; the activation (ACTIVATIONS). A layer without cross-attention has (0,)- and (0, 0)-arrays there."""

    norms: tuple[np.ndarray, ...]
    products: tuple[np.ndarray, ...]
    transposed: tuple[bool, ...]
    scale: np.float32
    activation: int


@dataclass(frozen=True)
class LayerText:
    """A window's text for a layer's cross-attention as the kernels take it: `cross` (SELF_ONLY, FOLDED, TEXT);
    keys and values by head (B, heads, S, head_dim) for TEXT; folded ones (rows, heads * S, D) for FOLDED; the
    additive mask (B, S); unused arrays empty."""

    cross: int
    keys: np.ndarray
    values: np.ndarray
    folded_keys: np.ndarray
    folded_values: np.ndarray
    mask: np.ndarray


def decoder_layer(x: np.ndarray, position: int, cache_keys: np.ndarray, cache_values: np.ndarray, text: LayerText,
                  weights: LayerWeights) -> np.ndarray:
    """One decoder layer's step of one position, in one call: x (B, D) -> (B, D). Writes the position's keys and
    values into the KV cache (B, heads, max_length, head_dim, C-contiguous float32) and attends over every position
    up to it; `weights` as cpu.numpy_decoder.NumpyLayer takes them from the layer (their shapes are the layer's)."""
    (B, D), (heads, _, width), S = x.shape, cache_keys.shape[1:], text.mask.shape[1]
    if not (cache_keys.shape == cache_values.shape and cache_keys.shape[0] == B and heads * width == D
            and 0 <= position < cache_keys.shape[2] and weights.norms[0].shape == (D,)):
        raise ValueError(f"cpu.kernels: x {x.shape} at position {position} does not fit a cache {cache_keys.shape} "
                         f"and a layer of width {weights.norms[0].shape}")
    with_cross = weights.norms[2].shape == (D,)  # a layer without cross-attention has an empty cross norm
    if text.cross == SELF_ONLY:
        fits = weights.norms[2].shape == (0,)
    elif text.cross == FOLDED:
        rows = text.folded_keys.shape[0]
        fits = with_cross and text.folded_keys.shape == text.folded_values.shape and (
            rows == 0 or rows <= B and text.folded_keys.shape[1:] == (heads * S, D))
    else:
        fits = with_cross and text.keys.shape == text.values.shape == (B, heads, S, width)
    if not (text.mask.shape[0] == B and fits):
        raise ValueError(f"cpu.kernels: a text of mask {text.mask.shape}, keys {text.keys.shape} and folded keys "
                         f"{text.folded_keys.shape} does not fit x {x.shape} and a layer with {heads} heads "
                         f"{'with' if with_cross else 'without'} cross-attention")
    return _decoder_layer(np.ascontiguousarray(x, np.float32), position, cache_keys, cache_values, text.cross,
                          text.keys, text.values, text.folded_keys, text.folded_values, text.mask, weights.norms,
                          weights.products, weights.transposed, weights.scale, weights.activation,
                          numba.get_num_threads())


def fast_threading_layer() -> bool:
    """Whether numba's threads come from TBB or OpenMP (a decoding step's products on them beat BLAS's
    matrix-vector products here) rather than numba's own work queue (on which they lose: docs/performance.md).
    Compiles every kernel (or loads it from numba's cache) and starts the threads, so that no step pays for it."""
    one, none = np.ones((1, 1), np.float32), np.empty((0, 0), np.float32)
    layer_norm(times_weight_t(times_weight(one, one), one), one[0], one[0])
    weights = LayerWeights((one[0],) * 6, (one,) * 8, (False,) * 8, np.float32(1), ACTIVATIONS["gelu"])
    text = LayerText(FOLDED, none[None, None], none[None, None], one[None], one[None], one)
    decoder_layer(one, 0, one[None, None], one[None, None], text, weights)
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
