"""A decoding step in numpy, on views of the compiled decoder's weights (NumpyDecoder): on CPUs where it streams
the weights faster than MKL does through MLX, chosen by timing at load (fastest_lm) unless MLX_MUSICGEN_STEP
chooses (generation.requested_step).

A step of guidance's two rows multiplies each row by every weight of the decoder. BLAS's matrix product repacks
the weight for so few rows and runs at a third of the copy bandwidth, and so does MKL's on some CPUs
(docs/performance.md). So each product here reads its weight from memory once for both rows. Where numba runs on
TBB's or OpenMP's threads, a whole layer is one call of its kernels (cpu.kernels.decoder_layer): the products, the
attention over the KV cache (and over a long text by head), the layer norms, the activation and the folded
cross-attention; the heads are numba's products too. Else the layer runs op by op in numpy, each product as one
BLAS matrix-vector product a row, the first row's reading the weight from memory and the next ones' from the
cache.

The first step of a window (the start column, a prompt: many positions) runs the compiled decoder, whose keys
and values are then copied into the numpy cache; every later step of one position runs here.
"""

from __future__ import annotations

import functools
import importlib
import math
import statistics
import threading
import time
import types
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .. import delay
from ..decoder import Context, KVCache, MusicgenDecoder, TextKV
from ..generation import DelayedLM, decoding_step, requested_step
from ..melody import MelodyDecoder
from .._linux import usable_cores
from .decoder import CompiledDecoderLayer, TransposedLinear, erf_within_4, placeholder_context
from .threads import ThreadTeams, TeamByTiming, fastest_team, numpy_blas_teams
from .views import WeightViews

if TYPE_CHECKING:  # numba's module, imported when the first NumpyDecoder is made (numba_kernels)
    from .kernels import LayerText, LayerWeights

CHUNK_BYTES = 4 << 20  # a block of a weight that the cache holds for the next row's product (docs/performance.md)
MAX_ROWS = 2  # guidance's two rows: more rows read the weights from the cache more times than a matrix product


def gelu(x: np.ndarray) -> np.ndarray:
    """The exact (erf) GELU, with cpu.decoder's rational erf."""
    return x * (1 + erf_within_4(np.clip(x * np.float32(math.sqrt(0.5)), -4.0, 4.0))) / 2


ACTIVATIONS = {"gelu": gelu, "relu": lambda x: np.maximum(x, 0)}


def load_numba_kernels(name: str, ready: Callable[[types.ModuleType], bool], purpose: str, instead: str
                       ) -> types.ModuleType | None:
    """The module of numba's kernels cpu.<name>, once `ready(module)` has compiled them (or loaded them from
    numba's cache) and found them worth running; None where numba is not installed (the `cpu` extra brings it on
    Linux), or cannot import, compile or cache them here (said once: what they are for, `purpose`, and what runs
    `instead`)."""
    try:
        kernels = importlib.import_module(f".{name}", __package__)
    except ImportError as error:
        if error.name != "numba":  # numba is there but cannot load (a numpy it does not support, say)
            warnings.warn(f"numba could not be imported ({error}); {purpose} runs without its kernels",
                          stacklevel=3)
        return None
    try:
        return kernels if ready(kernels) else None
    except Exception as error:  # numba's own: no cache it can write, a threading layer it cannot load
        warnings.warn(f"numba's kernels for {purpose} could not be loaded ({error}); {instead}", stacklevel=3)
        return None


@functools.cache
def numba_kernels() -> types.ModuleType | None:
    """cpu.kernels, compiled (or loaded from numba's cache) when the first NumpyDecoder is made, not with the
    package (numba takes ~0.2 s to import); None also where numba's threads are its own work queue's
    (kernels.fast_threading_layer)."""
    return load_numba_kernels("kernels", lambda kernels: kernels.fast_threading_layer(), "the CPU's decoding step",
                              "its products run on BLAS instead")


def fits_kernels(array: np.ndarray) -> bool:
    """Whether numba's kernels take the array as they were compiled for (C-contiguous, writeable float32):
    another layout would be another signature, compiled in a step; a copy of a weight would double its memory."""
    return array.dtype == np.float32 and array.flags.c_contiguous and array.flags.writeable


class RowwiseLinear:
    """A bias-free linear layer's weight as a numpy view, held as stored, (out, in), or transposed, (in, out) (a
    cpu.decoder.TransposedLinear): numba's decoder layer takes its array; called, it is a head's product, or a
    layer's where numba's kernels do not run. Its product with a few rows reads the weight from memory once:
    numba's kernels (cpu.kernels) where they run (numba_kernels) and take the weight (fits_kernels); else one BLAS
    matrix-vector product a row, in blocks of CHUNK_BYTES, each block read from memory by the first row's product
    and from the cache by the others'."""

    def __init__(self, linear: nn.Module):
        self.transposed = isinstance(linear, TransposedLinear)
        self.array = np.asarray(linear.weight_t if self.transposed else linear.weight)
        self.kernels = numba_kernels() if fits_kernels(self.array) else None
        step = max(1, CHUNK_BYTES // self.array[0].nbytes)
        self.blocks = [slice(start, start + step) for start in range(0, self.array.shape[0], step)]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x (B, in) -> x W^T (B, out)."""
        if self.kernels is not None:
            return (self.kernels.times_weight_t if self.transposed else self.kernels.times_weight)(x, self.array)
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
    """x (B, D) normalised over D, eps 1e-5 (nn.LayerNorm's), then scaled and shifted by norm's (weight, bias)."""
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
    """An nn.LayerNorm's (weight, bias), as numpy views."""
    return np.asarray(module.weight), np.asarray(module.bias)


@dataclass
class NumpyText:
    """A layer's decoder.TextKV as numpy views: keys and values, the additive mask (B, 1, S), folded or not."""

    keys: np.ndarray | None
    values: np.ndarray | None
    mask: np.ndarray
    folded: bool

    @classmethod
    def of(cls, text: TextKV) -> NumpyText:
        keys, values = (None if a is None else np.ascontiguousarray(a) for a in (text.keys, text.values))
        return cls(keys, values, np.ascontiguousarray(np.asarray(text.mask)[:, 0]), text.folded)


def text_for_kernels(kernels: types.ModuleType, text: NumpyText | None, batch: int) -> LayerText:
    """A window's text for a layer of `batch` rows as numba's decoder layer takes it (cpu.kernels.LayerText):
    none (MusicGen-Melody's layers), folded, or by head."""
    none3, none4 = np.empty((0, 0, 0), np.float32), np.empty((0,) * 4, np.float32)
    if text is None:
        return kernels.LayerText(kernels.SELF_ONLY, none4, none4, none3, none3, np.empty((batch, 0), np.float32))
    # C-contiguous, writeable float32, as the kernels were compiled for: a copy of a window's text at most
    mask, keys, values = (None if a is None else np.require(a, np.float32, ("C", "W"))
                          for a in (text.mask[:, 0], text.keys, text.values))
    if not text.folded:
        return kernels.LayerText(kernels.TEXT, keys, values, none3, none3, mask)
    keys, values = (none3, none3) if keys is None else (keys, values)
    return kernels.LayerText(kernels.FOLDED, none4, none4, keys, values, mask)


class NumpyCache:
    """A layer's self-attention keys and values (B, heads, max_length, head_dim) in numpy; `offset` counts the
    positions filled. `text`: the window's text for cross-attention, as numpy views made on its first step, and
    `kernel_text` the same as numba's layer takes it."""

    def __init__(self, batch: int, heads: int, head_dim: int, max_length: int):
        self.keys = np.zeros((batch, heads, max_length, head_dim), np.float32)
        self.values = np.zeros_like(self.keys)
        self.offset = 0
        self.text: NumpyText | None = None
        self.kernel_text: LayerText | None = None

    def append(self, keys: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Write the newest position's keys and values (B, heads, head_dim); return every position's so far."""
        position = self.offset
        if position >= self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; asked for {position + 1}.")
        self.keys[:, :, position], self.values[:, :, position] = keys, values
        return self.keys[:, :, : position + 1], self.values[:, :, : position + 1]


class NumpyLayer:
    """One CompiledDecoderLayer's step of one position, on views of its weights; with cross-attention (MusicGen) or
    without (MusicGen-Melody, whose conditioning is a prefix in the KV cache). One call of numba's kernels where
    they run and take its weights (kernel_weights); else op by op in numpy."""

    def __init__(self, layer: CompiledDecoderLayer):
        sa = layer.self_attn
        self.heads, self.scale = sa.heads, np.float32(sa.scale)
        self.self_norm, self.final_norm = norm_of(layer.self_attn_layer_norm), norm_of(layer.final_layer_norm)
        self.q, self.k, self.v, self.out = (RowwiseLinear(p) for p in (sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj))
        self.cross = "encoder_attn" in layer
        if self.cross:
            ca = layer.encoder_attn
            self.cross_norm = norm_of(layer.encoder_attn_layer_norm)
            self.cross_q, self.cross_out = RowwiseLinear(ca.q_proj), RowwiseLinear(ca.out_proj)
        self.fc1, self.fc2 = RowwiseLinear(layer.fc1), RowwiseLinear(layer.fc2)
        self.activation_name = layer.activation
        self.activation = ACTIVATIONS[layer.activation]
        self.kernels = numba_kernels()
        self.kernel_weights = None if self.kernels is None else self.weights_for(self.kernels)

    def weights_for(self, kernels: types.ModuleType) -> LayerWeights | None:
        """The layer's weights as numba's decoder layer takes them (cpu.kernels.LayerWeights), or None where one
        does not fit them (fits_kernels)."""
        none1, none2 = np.empty((0,), np.float32), np.empty((0, 0), np.float32)
        cross_norm, cross = ((self.cross_norm, (self.cross_q, self.cross_out)) if self.cross
                             else ((none1, none1), (None, None)))
        products = (self.q, self.k, self.v, self.out, *cross, self.fc1, self.fc2)
        norms = (*self.self_norm, *cross_norm, *self.final_norm)
        arrays = tuple(none2 if p is None else p.array for p in products)
        if not all(fits_kernels(a) for a in norms + arrays):
            return None
        return kernels.LayerWeights(norms, arrays, tuple(p is not None and p.transposed for p in products),
                                    self.scale, kernels.ACTIVATIONS[self.activation_name])

    def self_attention(self, h: np.ndarray, cache: NumpyCache) -> np.ndarray:
        B = h.shape[0]
        q, k, v = (proj(h).reshape(B, self.heads, -1) for proj in (self.q, self.k, self.v))
        keys, values = cache.append(k, v)
        weights = softmax((keys @ q[..., None])[..., 0] * self.scale)  # (B, heads, positions)
        return self.out((weights[:, :, None] @ values).reshape(B, -1))

    def cross_attention(self, h: np.ndarray, text: NumpyText) -> np.ndarray:
        B, keys, values, mask = h.shape[0], text.keys, text.values, text.mask
        if text.folded:  # keys and values (rows, heads * S, D): cpu.decoder.fold_text
            out = np.zeros_like(h)
            if keys is None:
                return out
            rows = keys.shape[0]
            scores = np.stack([np.dot(keys[r], h[r]) for r in range(rows)]).reshape(rows, self.heads, -1)
            weights = softmax(scores + mask[:rows]).reshape(rows, -1)
            out[:rows] = np.stack([np.dot(weights[r], values[r]) for r in range(rows)])
            return out
        q = self.cross_q(h).reshape(B, self.heads, -1)
        weights = softmax((keys @ q[..., None])[..., 0] * self.scale + mask)
        return self.cross_out((weights[:, :, None] @ values).reshape(B, -1))

    def __call__(self, x: np.ndarray, cache: NumpyCache) -> np.ndarray:
        """x (B, D), the newest position of each row -> the layer's output (B, D)."""
        if self.kernel_weights is not None:
            return self.kernels.decoder_layer(x, cache.offset, cache.keys, cache.values, cache.kernel_text,
                                              self.kernel_weights)
        x = x + self.self_attention(layer_norm(x, self.self_norm), cache)
        if self.cross:
            x = x + self.cross_attention(layer_norm(x, self.cross_norm), cache.text)
        return x + self.fc2(self.activation(self.fc1(layer_norm(x, self.final_norm))))


class NumpyDecoder(WeightViews):
    """A compiled MusicgenDecoder (cpu.decoder.optimize_decoder) whose steps of one position run in numpy: the step
    loop's DelayedLM. Its caches are numpy's for up to MAX_ROWS rows; with more, it is the compiled decoder. The
    thread team of its products (numba's, or numpy's OpenBLAS's: product_teams) follows the step times
    (threads.TeamByTiming); one step at a time runs in a process (OpenBLAS's team is process-wide)."""

    def __init__(self, decoder: MusicgenDecoder):
        super().__init__(decoder)
        self.layers = [NumpyLayer(layer) for layer in decoder.layers]
        self.embeddings = [np.asarray(embed.weight) for embed in decoder.embed_tokens]
        self.final_norm = norm_of(decoder.layer_norm)
        self.kernels = numba_kernels()  # for the final layer norm (the heads are RowwiseLinear's)
        self.heads = [RowwiseLinear(head) for head in decoder.lm_heads]
        self.positions: np.ndarray | None = None  # the position table, from make_cache
        teams = product_teams()
        self.team, self.limit_threads = (None, None) if teams is None else (TeamByTiming(teams.sizes), teams.limit)

    @staticmethod
    def supports(decoder: MusicgenDecoder) -> bool:
        """A MusicGen or MusicGen-Melody decoder (not MAGNeT's) of compiled float32 layers, with cross-attention
        (MusicGen) or without (Melody), and an activation numpy has here."""
        layers, cross = decoder.layers, type(decoder) is MusicgenDecoder
        return (type(decoder) in (MusicgenDecoder, MelodyDecoder) and decoder.dtype == mx.float32
                and all(type(layer) is CompiledDecoderLayer and ("encoder_attn" in layer) == cross for layer in layers)
                and all(type(p) in (nn.Linear, TransposedLinear) and "bias" not in p for p in projections(decoder))
                and all(layer.activation in ACTIVATIONS for layer in layers))

    decoder = property(lambda self: self.module)
    num_codebooks = property(lambda self: self.decoder.num_codebooks)
    audio_channels = property(lambda self: self.decoder.audio_channels)
    pad_token_id = property(lambda self: self.decoder.pad_token_id)

    def make_cache(self, batch: int, max_length: int) -> list:
        """numpy caches (NumpyCache) for up to MAX_ROWS rows of a current decoder; else the compiled decoder's."""
        if batch > MAX_ROWS or not self.current():
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
        # NaN or inf logits are the sampler's to report (sampling.NONFINITE), as in MLX: no warnings here
        with _step_lock, np.errstate(over="ignore", invalid="ignore"):
            if self.team is None:
                return mx.array(self.step(codes, cache))
            threads = self.team.next_team()
            with self.limit_threads(threads):
                start = time.perf_counter()
                logits = self.step(codes, cache)
            self.team.record(threads, time.perf_counter() - start)
        return mx.array(logits)

    def step(self, codes: np.ndarray, cache: list[NumpyCache]) -> np.ndarray:
        """The newest column of codes (B, K) -> its logits (B, K, 1, vocab), with the window's text as its first
        step left it in the caches."""
        x = sum(table[codes[:, k]] for k, table in enumerate(self.embeddings)) * np.float32(self.decoder.embed_scale)
        x = x + self.positions[cache[0].offset]
        for layer, layer_cache in zip(self.layers, cache):
            x = layer(x, layer_cache)
        for layer_cache in cache:
            layer_cache.offset += 1
        x = (layer_norm(x, self.final_norm) if self.kernels is None
             else self.kernels.layer_norm(x, *self.final_norm))
        return np.stack([head(x) for head in self.heads], axis=1)[:, :, None]

    def first_step(self, codes: mx.array, context: Context, cache: list[NumpyCache]) -> mx.array:
        """codes (B, K, T), a window's first positions -> logits (B, K, T, vocab) by the compiled decoder, whose
        keys and values (a melody's prefix's too) go into the numpy cache, with the window's text for
        cross-attention as numpy views (made once a window)."""
        if cache[0].offset:
            raise ValueError("the numpy decoder takes many positions on a window's first step only")
        compiled_cache = self.decoder.make_cache(codes.shape[0], context.length + codes.shape[-1])
        logits = self.decoder(codes, context, compiled_cache)
        mx.eval(logits, [c.state for c in compiled_cache])
        for layer, source, target, text in zip(self.layers, compiled_cache, cache, context.text or [None] * len(cache)):
            target.text = None if text is None else NumpyText.of(text)
            if layer.kernel_weights is not None:
                target.kernel_text = text_for_kernels(layer.kernels, target.text, codes.shape[0])
            target.keys[:, :, : source.offset] = np.asarray(source.state["keys"])
            target.values[:, :, : source.offset] = np.asarray(source.state["values"])
            target.offset = source.offset
        return logits


_step_lock = threading.Lock()


def product_teams() -> ThreadTeams | None:
    """The thread teams that the products of a step can run on: numba's, or numpy's OpenBLAS's
    (threads.numpy_blas_teams)."""
    kernels = numba_kernels()
    if kernels is None:
        return numpy_blas_teams()
    return ThreadTeams(kernels.thread_counts(usable_cores()), kernels.threads)


def projections(decoder: MusicgenDecoder) -> list[nn.Module]:
    """Every linear layer a step multiplies by."""
    modules = list(decoder.lm_heads)
    for layer in decoder.layers:
        sa = layer.self_attn
        modules += [sa.q_proj, sa.k_proj, sa.v_proj, sa.out_proj, layer.fc1, layer.fc2]
        if "encoder_attn" in layer:
            modules += [layer.encoder_attn.q_proj, layer.encoder_attn.out_proj]
    return modules


def step_seconds(lm: DelayedLM, context: Context, steps: int, skip: int) -> float:
    """The median time of guidance's decoding steps (generation.decoding_step, greedy) after the first `skip`."""
    cache = lm.make_cache(2, context.length + steps)
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


_chosen: dict[tuple, str] = {}


def fastest_lm(decoder: MusicgenDecoder, steps: int = 7, margin: float = 0.05) -> DelayedLM:
    """The compiled decoder, or its numpy form where that supports it and either MLX_MUSICGEN_STEP=numpy asks for
    it or it ran guidance's steps faster here by more than `margin`: timed once per process and decoder shape,
    over the first steps of a window (not counting the first step, which is the compiled decoder's in both, the
    compiled step's trace, and the numpy form's tries of each thread team). The numpy form's lead grows with the
    position (docs/performance.md): the first steps are where it is least."""
    choice = requested_step()
    if not NumpyDecoder.supports(decoder) or choice in ("compiled", "op-by-op"):
        return decoder
    numpy_lm = NumpyDecoder(decoder)
    config = decoder.config
    shape = (type(decoder).__name__, config.hidden_size, config.ffn_dim, config.num_hidden_layers,
             config.num_codebooks, config.num_attention_heads)
    if choice is None and shape not in _chosen:
        context = placeholder_context(decoder)
        teams = 1 if numpy_lm.team is None else len(numpy_lm.team.teams)
        forms = {"compiled": (decoder, 3), "numpy": (numpy_lm, 1 + teams)}  # the form, the steps not counted
        _chosen[shape] = fastest_team(lambda form: [step_seconds(forms[form][0], context, steps, forms[form][1])],
                                      list(forms), margin)
    return numpy_lm if (choice or _chosen[shape]) == "numpy" else decoder
