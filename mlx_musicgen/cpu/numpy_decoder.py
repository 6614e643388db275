"""A decoding step in numpy, on views of the compiled decoder's weights (NumpyDecoder): on CPUs where numpy's
OpenBLAS streams the weights faster than MKL does through MLX, chosen by timing (cpu.choose_step).

A step of guidance's two rows multiplies each row by every weight of the decoder. For one row, OpenBLAS's
matrix-vector product streams a weight from memory near the copy bandwidth; for two rows its matrix product
repacks the weight and runs at a third of that, and so does MKL's on some CPUs (docs/performance.md). So each
product here is one matrix-vector product per row: the first row's reads the weight from memory, the next ones'
from the cache. The small ops around the products cost microseconds in numpy, tens in MLX.

The first step of a window (the start column, a prompt: many positions) runs the compiled decoder, whose keys
and values are then copied into the numpy cache; every later step of one position runs here.
"""

from __future__ import annotations

import math
import statistics
import time

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import delay
from ..decoder import Context, KVCache, MusicgenDecoder, TextKV
from ..generation import DelayedLM, decoding_step
from .decoder import ERF_P, ERF_Q, CompiledDecoderLayer, TransposedLinear, polynomial
from .threads import TeamByTiming, numpy_blas_team

CHUNK_BYTES = 4 << 20  # a block of a weight that the cache holds for the next row's product (docs/performance.md)
MAX_ROWS = 2  # guidance's two rows: more rows read the weights from the cache more times than a matrix product


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU, with cpu.decoder's rational erf."""
    z = np.clip(x * np.float32(math.sqrt(0.5)), -4.0, 4.0)
    z2 = z * z
    return x * (1 + z * polynomial(z2, ERF_P) / polynomial(z2, ERF_Q)) / 2


ACTIVATIONS = {"gelu": gelu, "relu": lambda x: np.maximum(x, 0)}


class Weight:
    """A bias-free linear layer's weight as a numpy view, held as stored, (out, in), or transposed, (in, out) (a
    cpu.decoder.TransposedLinear), multiplied row by row in blocks of CHUNK_BYTES: each block is read from memory
    by the first row's matrix-vector product and from the cache by the others'."""

    def __init__(self, linear: nn.Module):
        self.transposed = isinstance(linear, TransposedLinear)
        self.array = np.asarray(linear.weight_t if self.transposed else linear.weight)
        step = max(1, CHUNK_BYTES // self.array[0].nbytes)
        self.blocks = [slice(start, start + step) for start in range(0, self.array.shape[0], step)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, in) -> x W^T (B, out)."""
        if self.transposed:  # blocks of inputs: partial sums
            y = np.zeros((x.shape[0], self.array.shape[1]), np.float32)
            for block in self.blocks:
                for row, out in zip(x, y):
                    out += np.dot(row[block], self.array[block])
            return y
        y = np.empty((x.shape[0], self.array.shape[0]), np.float32)
        for block in self.blocks:  # blocks of outputs
            for row, out in zip(x, y):
                np.dot(self.array[block], row, out=out[block])
        return y


def layer_norm(x: np.ndarray, norm: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    # np.add.reduce, not ndarray.mean: the same sums without mean's Python wrapper (a step calls this 73 times)
    scale = np.float32(1 / x.shape[-1])
    centered = x - np.add.reduce(x, axis=-1, keepdims=True) * scale
    variance = np.add.reduce(centered * centered, axis=-1, keepdims=True) * scale
    return centered / np.sqrt(variance + np.float32(1e-5)) * norm[0] + norm[1]


def softmax(scores: np.ndarray) -> np.ndarray:
    """Over the last axis; a row of equal (fully masked) scores gets uniform weights, as in MLX."""
    weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return weights / weights.sum(axis=-1, keepdims=True)


def norm_of(module: nn.Module) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(module.weight), np.asarray(module.bias)


class NumpyCache:
    """A layer's self-attention keys and values (B, heads, max_length, head_dim) in numpy; `offset` counts the
    positions filled."""

    def __init__(self, batch: int, heads: int, head_dim: int, max_length: int):
        self.keys = np.zeros((batch, heads, max_length, head_dim), np.float32)
        self.values = np.zeros_like(self.keys)
        self.offset = 0

    @property
    def max_length(self) -> int:
        return self.keys.shape[2]


class NumpyLayer:
    """One CompiledDecoderLayer's step of one position, on views of its weights."""

    def __init__(self, layer: CompiledDecoderLayer):
        sa, ca = layer.self_attn, layer.encoder_attn
        self.heads, self.scale = sa.heads, np.float32(sa.scale)
        self.self_norm, self.cross_norm = norm_of(layer.self_attn_layer_norm), norm_of(layer.encoder_attn_layer_norm)
        self.final_norm = norm_of(layer.final_layer_norm)
        self.q, self.k, self.v, self.out = (Weight(p) for p in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj))
        self.cross_q, self.cross_out = Weight(ca.q_proj), Weight(ca.out_proj)
        self.fc1, self.fc2 = Weight(layer.fc1), Weight(layer.fc2)
        self.activation = ACTIVATIONS[layer.activation]

    def self_attention(self, h: np.ndarray, cache: NumpyCache) -> np.ndarray:
        B, position = h.shape[0], cache.offset
        q, k, v = (proj(h).reshape(B, self.heads, -1) for proj in (self.q, self.k, self.v))
        cache.keys[:, :, position], cache.values[:, :, position] = k, v
        keys, values = cache.keys[:, :, : position + 1], cache.values[:, :, : position + 1]
        weights = softmax((keys @ q[..., None])[..., 0] * self.scale)  # (B, heads, positions)
        return self.out((weights[:, :, None] @ values).reshape(B, -1))

    def cross_attention(self, h: np.ndarray, text: TextKV) -> np.ndarray:
        B = h.shape[0]
        mask = np.asarray(text.mask)[:, 0]  # (B, 1, S), additive
        if text.folded:  # keys and values (rows, heads * S, D): cpu.decoder.fold_text
            out = np.zeros_like(h)
            if text.keys is None:
                return out
            keys, values = np.asarray(text.keys), np.asarray(text.values)
            rows = keys.shape[0]
            scores = np.stack([np.dot(keys[r], h[r]) for r in range(rows)]).reshape(rows, self.heads, -1)
            weights = softmax(scores + mask[:rows]).reshape(rows, -1)
            out[:rows] = np.stack([np.dot(weights[r], values[r]) for r in range(rows)])
            return out
        keys, values = np.asarray(text.keys), np.asarray(text.values)  # (B, heads, S, head_dim)
        q = self.cross_q(h).reshape(B, self.heads, -1)
        weights = softmax((keys @ q[..., None])[..., 0] * self.scale + mask)
        return self.cross_out((weights[:, :, None] @ values).reshape(B, -1))

    def __call__(self, x: np.ndarray, text: TextKV, cache: NumpyCache) -> np.ndarray:
        """x (B, D), the newest position of each row -> the layer's output (B, D)."""
        x = x + self.self_attention(layer_norm(x, self.self_norm), cache)
        x = x + self.cross_attention(layer_norm(x, self.cross_norm), text)
        return x + self.fc2(self.activation(self.fc1(layer_norm(x, self.final_norm))))


class NumpyDecoder:
    """A compiled MusicgenDecoder (cpu.decoder.optimize_decoder) whose steps of one position run in numpy: the step
    loop's DelayedLM. Its caches are numpy's for up to MAX_ROWS rows; with more, it is the compiled decoder."""

    def __init__(self, decoder: MusicgenDecoder):
        self.decoder = decoder
        self.layers = [NumpyLayer(layer) for layer in decoder.layers]
        self.embeddings = [np.asarray(embed.weight) for embed in decoder.embed_tokens]
        self.final_norm = norm_of(decoder.layer_norm)
        self.heads = [Weight(head) for head in decoder.lm_heads]
        self.positions: np.ndarray | None = None  # the position table, from make_cache
        blas = numpy_blas_team()
        self.team, self.threads = (None, None) if blas is None else (TeamByTiming(blas[0]), blas[1])

    @staticmethod
    def supports(decoder: MusicgenDecoder) -> bool:
        """A MusicGen decoder (not Melody's, not MAGNeT's) of compiled float32 layers with cross-attention and an
        activation numpy has here."""
        layers = decoder.layers
        return (type(decoder) is MusicgenDecoder and decoder.dtype == mx.float32
                and all(type(layer) is CompiledDecoderLayer and "encoder_attn" in layer for layer in layers)
                and all(type(p) in (nn.Linear, TransposedLinear) for p in projections(decoder))
                and all(layer.activation in ACTIVATIONS for layer in layers))

    num_codebooks = property(lambda self: self.decoder.num_codebooks)
    audio_channels = property(lambda self: self.decoder.audio_channels)
    pad_token_id = property(lambda self: self.decoder.pad_token_id)

    def make_cache(self, batch: int, max_length: int) -> list:
        if batch > MAX_ROWS:
            return self.decoder.make_cache(batch, max_length)
        self.positions = np.asarray(self.decoder.position_table(max_length, mx.float32))
        sa = self.decoder.layers[0].self_attn
        head_dim = sa.q_proj.weight.shape[0] // sa.heads
        return [NumpyCache(batch, sa.heads, head_dim, max_length) for _ in self.layers]

    def __call__(self, codes: mx.array, context: Context, cache: list | None = None) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab), as MusicgenDecoder."""
        if not cache or isinstance(cache[0], KVCache):
            return self.decoder(codes, context, cache)
        if codes.shape[-1] > 1 or cache[0].offset == 0:
            return self.first_step(codes, context, cache)
        codes = np.asarray(codes)[:, :, 0]  # (B, K): waits for the last step's sampling
        if self.team is None:
            return mx.array(self.step(codes, context, cache))
        threads = self.team.next_team()
        with self.threads(threads):
            start = time.perf_counter()
            logits = self.step(codes, context, cache)
        self.team.record(threads, time.perf_counter() - start)
        return mx.array(logits)

    def step(self, codes: np.ndarray, context: Context, cache: list[NumpyCache]) -> np.ndarray:
        """The newest column of codes (B, K) -> its logits (B, K, 1, vocab)."""
        x = sum(table[codes[:, k]] for k, table in enumerate(self.embeddings)) * np.float32(self.decoder.embed_scale)
        x = x + self.positions[cache[0].offset]
        for layer, text, layer_cache in zip(self.layers, context.text, cache):
            x = layer(x, text, layer_cache)
        for layer_cache in cache:
            layer_cache.offset += 1
        x = layer_norm(x, self.final_norm)
        return np.stack([head(x) for head in self.heads], axis=1)[:, :, None]

    def first_step(self, codes: mx.array, context: Context, cache: list[NumpyCache]) -> mx.array:
        """The compiled decoder over a window's first positions; their keys and values into the numpy cache."""
        if cache[0].offset:
            raise ValueError("the numpy decoder takes many positions on a window's first step only")
        compiled_cache = self.decoder.make_cache(codes.shape[0], codes.shape[-1])
        logits = self.decoder(codes, context, compiled_cache)
        mx.eval(logits, [c.state for c in compiled_cache])
        for source, target in zip(compiled_cache, cache):
            target.keys[:, :, : source.offset] = np.asarray(source.state["keys"])
            target.values[:, :, : source.offset] = np.asarray(source.state["values"])
            target.offset = source.offset
        return logits


def projections(decoder: MusicgenDecoder) -> list[nn.Module]:
    """Every linear layer a step multiplies by."""
    modules = list(decoder.lm_heads)
    for layer in decoder.layers:
        sa, ca = layer.self_attn, layer.encoder_attn
        modules += [sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, ca.q_proj, ca.out_proj, layer.fc1, layer.fc2]
    return modules


def step_seconds(lm: DelayedLM, context: Context, steps: int, skip: int) -> float:
    """The median time of guidance's decoding steps (generation.decoding_step, greedy) after the first `skip`."""
    cache = lm.make_cache(2, steps + 1)
    step = decoding_step(lm, context, 3.0, lambda logits, key: mx.argmax(logits, axis=-1).astype(mx.int32), cache)
    codes = mx.full((1, lm.num_codebooks, 1), lm.pad_token_id, dtype=mx.int32)
    forced, key, seconds = mx.full((1, lm.num_codebooks), delay.UNSET, dtype=mx.int32), mx.random.key(0), []
    for _ in range(steps):
        start = time.perf_counter()
        column, key = step(codes, forced, key)
        mx.eval(column)
        seconds.append(time.perf_counter() - start)
        codes = column[:1, :, None]
    return statistics.median(seconds[skip:])


def fastest_lm(decoder: MusicgenDecoder, steps: int = 8, margin: float = 0.05) -> DelayedLM:
    """The compiled decoder, or its numpy form where that supports it and ran guidance's steps faster here by
    more than `margin`, timed over a few steps of a short text (the numpy form's first steps try each thread
    team: they are not counted)."""
    if not NumpyDecoder.supports(decoder):
        return decoder
    context = decoder.text_context(mx.zeros((2, 4, decoder.config.hidden_size)), mx.array([[1] * 4, [0] * 4]))
    numpy_lm = NumpyDecoder(decoder)
    teams = 1 if numpy_lm.team is None else len(numpy_lm.team.teams)
    compiled = step_seconds(decoder, context, steps, skip=2)
    return numpy_lm if step_seconds(numpy_lm, context, steps, skip=1 + teams) < (1 - margin) * compiled else decoder
