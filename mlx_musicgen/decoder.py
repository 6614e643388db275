"""The MusicGen decoder (Copet et al., 2023, "Simple and Controllable Music Generation"): a pre-LN transformer
over K parallel streams of EnCodec codes.

Each step reads one column of K codes, sums their embeddings, adds sinusoidal positions, attends causally to
the past (self-attention) and to the text (cross-attention), and predicts the next column with K heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

ACTIVATIONS = {"gelu": nn.gelu, "relu": nn.relu, "gelu_new": nn.gelu_approx, "silu": nn.silu}


@dataclass
class DecoderConfig:
    vocab_size: int = 2048
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    ffn_dim: int = 4096
    num_codebooks: int = 4
    audio_channels: int = 1
    max_position_embeddings: int = 2048
    activation_function: str = "gelu"
    scale_embedding: bool = False
    sinusoids: str = "transformers"  # whose rounding of the position table: transformers' or audiocraft's

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})

    def check(self) -> None:
        """Raise ValueError for sizes that make no decoder (its fields' types are the loader's to check)."""
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported decoder activation {self.activation_function!r}; supported: {sorted(ACTIVATIONS)}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"the decoder's {self.num_attention_heads} heads do not divide its width "
                             f"{self.hidden_size}")
        if self.sinusoids not in SINUSOIDS:
            raise ValueError(f"the decoder's sinusoids {self.sinusoids!r} are not one of {sorted(SINUSOIDS)}")
        if self.audio_channels not in (1, 2) or self.num_codebooks % self.audio_channels:
            raise ValueError(f"{self.num_codebooks} codebooks for {self.audio_channels} audio channels: MusicGen is "
                             f"mono or stereo, with the same codebooks per channel")

    @property
    def pad_token_id(self) -> int:
        # Row `vocab_size` of every embedding table is the pad/start token; the heads never predict it.
        return self.vocab_size


def position_frequencies(dims: int) -> np.ndarray:
    """The (dims // 2,) float32 frequencies of the sinusoids, exp(-i * ln(10000) / (half - 1)): the exponent
    rounded to float32 as the reference's float32 arithmetic rounds it, then exp in float64 rounded once.
    MLX's float32 exp is a step off for most of them, which moves angles near position 1300 by up to 1e-4:
    enough to flip a near-tied greedy choice late in a 30 s window."""
    half = dims // 2
    exponents = np.arange(half, dtype=np.float32) * np.float32(-math.log(10000.0) / (half - 1))
    return np.exp(exponents.astype(np.float64)).astype(np.float32)


def sinusoids(length: int, dims: int) -> np.ndarray:
    """The reference's table of sinusoidal positions [cos | sin] (length, dims), float32, a zero column
    padding an odd width: angle(p, i) = p * frequency(i), a float32 product as the reference's, its cos and
    sin from float64 rounded once, so every entry is the reference's to float32 rounding."""
    angles = np.arange(length, dtype=np.float32)[:, None] * position_frequencies(dims)[None, :]
    return cos_sin(angles, dims)


def audiocraft_sinusoids(length: int, dims: int) -> np.ndarray:
    """audiocraft's table (modules/transformer.py create_sin_embedding), the same sinusoids rounded its way:
    angle(p, i) = p / 10000 ** (i / (half - 1)), the exponent, the power and the quotient each a float32, as
    its float32 arithmetic makes them (the power from float64 rounded once); cos and sin as in `sinusoids`."""
    half = dims // 2
    exponents = np.arange(half, dtype=np.float32) / np.float32(half - 1)
    periods = (10000.0 ** exponents.astype(np.float64)).astype(np.float32)
    return cos_sin(np.arange(length, dtype=np.float32)[:, None] / periods[None, :], dims)


def cos_sin(angles: np.ndarray, dims: int) -> np.ndarray:
    """(length, half) float32 angles -> [cos | sin] (length, dims) float32, each from float64 rounded once."""
    angles = angles.astype(np.float64)
    table = np.concatenate([np.cos(angles), np.sin(angles), np.zeros((len(angles), dims % 2))], axis=1)
    return table.astype(np.float32)


SINUSOIDS = {"transformers": sinusoids, "audiocraft": audiocraft_sinusoids}  # DecoderConfig.sinusoids


def split_heads(x: mx.array, heads: int) -> mx.array:
    """(B, L, heads * d) -> (B, heads, L, d)"""
    B, L, _ = x.shape
    return x.reshape(B, L, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    """(B, heads, L, d) -> (B, L, heads * d)"""
    B, _, L, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)


def additive_mask(mask: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(B, S) 0/1 key mask -> (B, 1, 1, S) additive mask with a finite minimum, like the reference.

    A fully masked row (the unconditional half of guidance) then gets uniform weights over zero values and
    outputs exactly 0, where -inf would give NaN.
    """
    big_negative = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(mask[:, None, None, :].astype(mx.bool_), mx.array(0.0, dtype=dtype), big_negative)


def plus_linear(residual: mx.array, linear: nn.Module, x: mx.array) -> mx.array:
    """residual + linear(x), (B, L, out): for a plain linear layer without a bias as one product that adds as it
    writes (addmm: one kernel instead of two on Metal and CUDA, BLAS's beta = 1 on a CPU); any other layer (a
    LoRA, a quantized one) as a product and an add."""
    if type(linear) is nn.Linear and "bias" not in linear:
        return mx.addmm(residual, x, linear.weight.T)
    return residual + linear(x)


SPAN = 128  # a compiled step attends over the cache in multiples of this many positions (see KVCache.at)
CAUSAL = "causal"  # the self-attention's mask: causal over the new positions, as the cache has them


class KVCache:
    """Self-attention keys and values (B, heads, max_length, head_dim), preallocated for the whole generation so
    that a step never copies the past; `state` holds them (what a compiled step captures and updates), `offset`
    counts the positions filled, on the host.

    Inside a compiled step of one new position (generation.decoding_step) `at` is (position, mask): the offset
    as an array, and the (span,) mask of the positions filled once it is written, over a static span, a multiple
    of SPAN. The step's shapes then change once every SPAN steps, not every step, and it compiles once per
    span; the mask is made once per step, for every layer."""

    def __init__(self, batch: int, heads: int, head_dim: int, max_length: int, dtype: mx.Dtype):
        shape = (batch, heads, max_length, head_dim)
        self.state = {"keys": mx.zeros(shape, dtype=dtype), "values": mx.zeros(shape, dtype=dtype)}
        self.offset = 0
        self.at: tuple[mx.array, mx.array] | None = None

    @property
    def max_length(self) -> int:
        return self.state["keys"].shape[2]

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array | str | None]:
        """Append (B, heads, L, head_dim) keys and values; return the keys and values to attend to, and the
        mask of scaled_dot_product_attention (causal over the new positions)."""
        L = keys.shape[2]
        if self.at is not None:
            position, mask = self.at
            span = mask.shape[-1]
            for name, new in (("keys", keys), ("values", values)):
                self.state[name] = mx.slice_update(self.state[name], new, position, axes=(2,))
            return self.state["keys"][:, :, :span], self.state["values"][:, :, :span], mask
        start, end = self.offset, self.offset + L
        if end > self.max_length:
            raise ValueError(f"KV cache holds {self.max_length} positions; asked for {end}.")
        self.state["keys"][:, :, start:end] = keys
        self.state["values"][:, :, start:end] = values
        self.offset = end
        return self.state["keys"][:, :, :end], self.state["values"][:, :, :end], "causal" if L > 1 else None


def cached_keys_values(cache: KVCache | None, keys: mx.array, values: mx.array
                          ) -> tuple[mx.array, mx.array, mx.array | str | None]:
    """The newest positions' keys and values (B, heads, L, head_dim) -> what they attend to and the mask:
    through the cache where there is one (KVCache.update), else themselves, causally."""
    if cache is not None:
        return cache.update(keys, values)
    return keys, values, "causal" if keys.shape[2] > 1 else None


def cache_position(cache: list | None) -> int | mx.array:
    """Where the next positions go: the caches' offset (inside a compiled step, as an array)."""
    if not cache:
        return 0
    return cache[0].offset if cache[0].at is None else cache[0].at[0]


@dataclass
class TextKV:
    """What one layer's cross-attention needs of the text: keys and values (B, heads, S, head_dim) and the
    additive key mask (B, 1, 1, S). `folded`: the CPU's form for short texts (cpu.decoder.fold_text), keys and
    values (rows, heads * S, D) with the query and output projections folded in (None: no row has text)."""

    keys: mx.array | None
    values: mx.array | None
    mask: mx.array
    folded: bool = False
    masked: bool = True  # False: the mask changes nothing (text_mask_matters), and attention goes without it


@dataclass
class Context:
    """What the decoder is conditioned on in one window, made once per window (not per step): each layer's
    view of the text for cross-attention (MusicGen), or a prefix (B, S, D) of chroma and text that enters the
    KV cache on the first step (MusicGen-Melody)."""

    text: list[TextKV] | None = None
    prefix: mx.array | None = None

    @property
    def length(self) -> int:
        """Positions the context takes in the KV cache: the prefix's (cross-attended text takes none)."""
        return 0 if self.prefix is None else self.prefix.shape[1]


class Attention(nn.Module):
    """Multi-head self-attention without biases: softmax(Q K^T / sqrt(d)) V per head, heads concatenated and
    projected; causal over the KV cache."""

    # softmax(Q K^T * scale + mask) V; training on a CPU swaps in cpu.training.attention (the same function)
    attend = staticmethod(mx.fast.scaled_dot_product_attention)

    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)

    def __call__(self, x: mx.array, cache: KVCache | None = None, mask: mx.array | str | None = CAUSAL
                 ) -> mx.array:
        """x (B, L, D), the L newest positions -> (B, L, D); `mask` CAUSAL (over the cache, see
        cached_keys_values), or without a cache None (every position) or an additive (L, L) mask (MAGNeT's)."""
        return self.out_proj(self.heads_out(x, cache, mask))

    def heads_out(self, x: mx.array, cache: KVCache | None = None, mask: mx.array | str | None = CAUSAL
                  ) -> mx.array:
        """The heads' outputs, concatenated (B, L, D): what out_proj projects."""
        queries, keys, values = (split_heads(proj(x), self.heads) for proj in (self.q_proj, self.k_proj, self.v_proj))
        keys, values, causal = cached_keys_values(cache, keys, values)
        out = self.attend(queries, keys, values, scale=self.scale, mask=causal if mask is CAUSAL else mask)
        return merge_heads(out)


def text_mask_matters(states: mx.array, mask: mx.array) -> bool:
    """Whether the (B, S) key mask changes cross-attention to the text states (B, S, D): whether some row is
    part text, part padding, or has no text but states that are not 0. Otherwise each row is all text (the mask
    adds 0) or none with states of 0 (guidance's unconditional rows), whose keys and values are then 0 and whose
    output is 0 with or without the mask. Without it, attention of one query is one fused kernel on CUDA too
    (docs/performance.md). Reads the arrays on the host: not for a traced function."""
    rows = mask.astype(mx.bool_)
    all_text, no_text = rows.all(axis=1), ~rows.any(axis=1) & mx.all(states == 0, axis=(1, 2))
    return not bool(mx.all(all_text | no_text))


def text_kv(k_proj: nn.Module, v_proj: nn.Module, heads: int, states: mx.array, mask: mx.array) -> TextKV:
    """states (B, S, D), mask (B, S) 0/1 -> the text's keys and values by head, and its additive mask."""
    keys, values = (split_heads(proj(states), heads) for proj in (k_proj, v_proj))
    return TextKV(keys, values, additive_mask(mask, keys.dtype))


class CrossAttention(Attention):
    """Attention from the codes to the text; the text's keys and values are computed once per generation."""

    def text_kv(self, states: mx.array, mask: mx.array) -> TextKV:
        return text_kv(self.k_proj, self.v_proj, self.heads, states, mask)

    def __call__(self, x: mx.array, text: TextKV) -> mx.array:
        return self.out_proj(self.heads_out(x, text))

    def heads_out(self, x: mx.array, text: TextKV) -> mx.array:
        queries = split_heads(self.q_proj(x), self.heads)
        out = self.attend(queries, text.keys, text.values, scale=self.scale, mask=text.mask if text.masked else None)
        return merge_heads(out)


class DecoderLayer(nn.Module):
    """Pre-LN: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), text); x += fc2(act(fc1(LN(x))))."""

    cross_attention = True  # MusicGen-Melody's layers have none (melody.MelodyDecoderLayer)

    def __init__(self, config: DecoderConfig):
        super().__init__()
        D = config.hidden_size
        self.self_attn = Attention(D, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(D, eps=1e-5)
        if self.cross_attention:
            self.encoder_attn = CrossAttention(D, config.num_attention_heads)
            self.encoder_attn_layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.fc1 = nn.Linear(D, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, D, bias=False)
        self.final_layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.activation = ACTIVATIONS[config.activation_function]

    def text_kv(self, states: mx.array, mask: mx.array) -> TextKV:
        return self.encoder_attn.text_kv(states, mask)

    def make_cache(self, batch: int, max_length: int, dtype: mx.Dtype) -> KVCache:
        attn = self.self_attn
        return KVCache(batch, attn.heads, attn.q_proj.weight.shape[0] // attn.heads, max_length, dtype)

    def __call__(self, x: mx.array, text: TextKV | None = None, cache: KVCache | None = None,
                 mask: mx.array | str | None = CAUSAL) -> mx.array:
        # each branch's last product adds the residual as it writes (plus_linear)
        attn = self.self_attn
        x = plus_linear(x, attn.out_proj, attn.heads_out(self.self_attn_layer_norm(x), cache, mask))
        if self.cross_attention:
            cross = self.encoder_attn
            x = plus_linear(x, cross.out_proj, cross.heads_out(self.encoder_attn_layer_norm(x), text))
        return plus_linear(x, self.fc2, self.activation(self.fc1(self.final_layer_norm(x))))


class MusicgenDecoder(nn.Module):
    """Embeddings of K codebooks (summed), sinusoidal positions, the layers, a final LayerNorm and K heads."""

    Layer = DecoderLayer

    def __init__(self, config: DecoderConfig):
        super().__init__()
        config.check()
        self.config = config
        D = config.hidden_size
        self.embed_scale = math.sqrt(D) if config.scale_embedding else 1.0
        self.embed_tokens = [nn.Embedding(config.vocab_size + 1, D) for _ in range(config.num_codebooks)]
        self.layers = [self.Layer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.lm_heads = [nn.Linear(D, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]
        self._positions = mx.zeros((0, D))  # the position table, made as far as it is used; "_": not a parameter

    @property
    def dtype(self) -> mx.Dtype:
        return self.layer_norm.weight.dtype

    @property
    def num_codebooks(self) -> int:
        return self.config.num_codebooks

    @property
    def audio_channels(self) -> int:
        return self.config.audio_channels

    @property
    def pad_token_id(self) -> int:
        return self.config.pad_token_id

    def text_context(self, states: mx.array, mask: mx.array, skip_needless_mask: bool = False) -> Context:
        """Each layer's view of the text (B, S, D) with its (B, S) padding mask, computed once per generation
        rather than once per step; `skip_needless_mask`: attend without the mask where it changes nothing
        (text_mask_matters, which reads the arrays: not while they are traced)."""
        states = states.astype(self.dtype)
        masked = not skip_needless_mask or text_mask_matters(states, mask)
        return Context(text=[replace(layer.text_kv(states, mask), masked=masked) for layer in self.layers])

    def make_cache(self, batch: int, max_length: int) -> list:
        self.position_table(max_length, self.dtype)  # made here: a compiled step reads it, it cannot grow it
        return [layer.make_cache(batch, max_length, self.dtype) for layer in self.layers]

    def embed(self, codes: mx.array) -> mx.array:
        """codes (B, K, T) -> the sum of their K embeddings (B, T, D)."""
        return sum(embed(codes[:, k]) for k, embed in enumerate(self.embed_tokens)) * self.embed_scale

    def position_table(self, length: int, dtype: mx.Dtype) -> mx.array:
        """The sinusoids of the first `length` positions (at least), made once and cast once, not every step."""
        if length > self._positions.shape[0] or self._positions.dtype != dtype:
            size = 1 << (length - 1).bit_length()
            self._positions = mx.array(SINUSOIDS[self.config.sinusoids](size, self.config.hidden_size)).astype(dtype)
        return self._positions

    def add_positions(self, x: mx.array, offset: int | mx.array) -> mx.array:
        """x (B, L, D) at positions offset.. offset + L - 1 -> x + their sinusoids (`offset` an array: inside a
        compiled step, whose cache made the table)."""
        B, L, D = x.shape
        if isinstance(offset, mx.array):
            return x + mx.slice(self._positions, offset, axes=(0,), slice_size=(L, D))
        return x + self.position_table(offset + L, x.dtype)[offset : offset + L]

    def logits(self, x: mx.array) -> mx.array:
        """The last layer's output (B, T, D) -> logits (B, K, T, vocab)."""
        x = self.layer_norm(x)
        return mx.stack([head(x) for head in self.lm_heads], axis=1)

    def __call__(self, codes: mx.array, context: Context, cache: list | None = None) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab); positions continue from the cache's."""
        x = self.add_positions(self.embed(codes), cache_position(cache))
        for i, layer in enumerate(self.layers):
            x = layer(x, context.text[i], cache[i] if cache else None)
        return self.logits(x)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names (`model.decoder.*`, `lm_heads.*`) -> ours; the stored sinusoid table is recomputed."""
        return {
            name.removeprefix("model.decoder."): value
            for name, value in weights.items()
            if name != "model.decoder.embed_positions.weights"
        }
