"""The MusicGen decoder: a pre-LN transformer over K parallel streams of EnCodec codes.

Each step reads one column of K codes, sums their embeddings, attends causally to the past (self-attention)
and to the text (cross-attention), and predicts the next column with K separate heads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np


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

    @classmethod
    def from_dict(cls, d: dict) -> DecoderConfig:
        config = cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})
        if config.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported decoder activation {config.activation_function!r}; supported: {sorted(ACTIVATIONS)}."
            )
        return config

    @property
    def pad_token_id(self) -> int:
        # Row `vocab_size` of every embedding table is the pad/start token; the heads never predict it.
        return self.vocab_size


# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4], and +-1 beyond (as in float32): the float32 rational approximation that
# Eigen and XLA use. Plain arithmetic, so MLX's compiled CPU kernels vectorise it (mx.erf runs element by element
# there, ~6x slower); as close to the exact GELU as torch's own (max error 1.4e-6 vs torch's 1.2e-6).
ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
         -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
         -1.45660718464996e-05)


def erf(x: mx.array) -> mx.array:
    x = mx.clip(x, -4.0, 4.0)
    x2 = x * x
    return x * polynomial(x2, ERF_P) / polynomial(x2, ERF_Q)


def polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """sum(c[i] * x**i), by Horner's rule."""
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU of the reference."""
    return x * (1 + erf(x * math.sqrt(0.5))) / 2


ACTIVATIONS = {"gelu": gelu, "relu": nn.relu, "gelu_new": nn.gelu_approx, "silu": nn.silu}


def sinusoids(positions: mx.array, dims: int) -> mx.array:
    """Sinusoidal position embeddings [cos | sin], as in the reference (frequencies over half - 1)."""
    half = dims // 2
    freqs = mx.exp(-math.log(10000.0) / (half - 1) * mx.arange(half, dtype=mx.float32))
    angles = positions.astype(mx.float32)[:, None] * freqs[None, :]
    return mx.concatenate([mx.cos(angles), mx.sin(angles)], axis=-1)


@dataclass
class TextContext:
    """What cross-attention needs of the text: per layer, what the layer's text_kv made of it; the additive key
    mask (B, 1, 1, S)."""

    kv: list
    mask: mx.array


class KVCache:
    """Self-attention keys and values, preallocated for the whole generation so a step never copies the past."""

    def __init__(self, batch: int, heads: int, head_dim: int, max_length: int, dtype: mx.Dtype):
        self.keys = mx.zeros((batch, heads, max_length, head_dim), dtype=dtype)
        self.values = mx.zeros((batch, heads, max_length, head_dim), dtype=dtype)
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        start, end = self.offset, self.offset + keys.shape[2]
        if end > self.keys.shape[2]:
            raise ValueError(f"KV cache holds {self.keys.shape[2]} positions; asked for {end}.")
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
        self.offset = end
        return self.keys[:, :, :end], self.values[:, :, :end]


class Attention(nn.Module):
    def __init__(self, dims: int, heads: int):
        super().__init__()
        self.heads = heads
        self.scale = (dims // heads) ** -0.5
        self.q_proj = nn.Linear(dims, dims, bias=False)
        self.k_proj = nn.Linear(dims, dims, bias=False)
        self.v_proj = nn.Linear(dims, dims, bias=False)
        self.out_proj = nn.Linear(dims, dims, bias=False)


class DecoderLayer(nn.Module):
    """Pre-LN: x += SelfAttn(LN(x)); x += CrossAttn(LN(x), text); x += FFN(LN(x)).

    Everything but the self-attention over the KV cache (whose length grows every step) runs as two compiled
    functions of fixed shapes: MLX then fuses their element-wise ops and replays them without Python, which
    matters on a CPU, where a step is ~40 small ops per layer around the matrix products.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        D = config.hidden_size
        self.self_attn = Attention(D, config.num_attention_heads)
        self.self_attn_layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.encoder_attn = Attention(D, config.num_attention_heads)
        self.encoder_attn_layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.fc1 = nn.Linear(D, config.ffn_dim, bias=False)
        self.fc2 = nn.Linear(config.ffn_dim, D, bias=False)
        self.final_layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.activation = config.activation_function

    def text_kv(self, states: mx.array, text_rows: int | None) -> dict:
        """What this layer's cross-attention needs of the text states (B, S, D), computed once per generation.

        `text_rows`: when only the leading rows hold text (the others, guidance's unconditional half, attend to
        nothing, so their cross-attention adds exactly 0), how many; else None. When those rows are short, the
        query and output projections are folded into the text's keys and values, per head:
            q_h . k = x . (Wq_h^T k)        and        sum_h p_h V_h Wo_h^T = sum_h p_h (V_h Wo_h^T),
        so a step reads rows * heads * S * D keys and as many values instead of the two D x D weights: ~12% of
        a step's weight reads for one prompt of a dozen tokens.
        """
        attn = self.encoder_attn
        heads, (_, S, D) = attn.heads, states.shape
        if text_rows is None or text_rows * heads * S > D or "scales" in attn.q_proj or "scales" in attn.out_proj:
            return {"keys": split_heads(project(states, attn.k_proj), heads),
                    "values": split_heads(project(states, attn.v_proj), heads),
                    "q_proj": attn.q_proj, "out_proj": attn.out_proj}
        if text_rows == 0:  # unconditional: no row attends to anything
            return {"folded_keys": None, "folded_values": None}
        states = states[:text_rows]
        keys = split_heads(project(states, attn.k_proj), heads) * attn.scale  # (rows, heads, S, head_dim)
        values = split_heads(project(states, attn.v_proj), heads)
        q_by_head = attn.q_proj.weight.reshape(heads, -1, D)  # (heads, head_dim, D), as stored
        # Wo's columns by head, (heads, D, head_dim): on a CPU a 7x cheaper copy than Wo.T's rows by head.
        out_by_head = attn.out_proj.weight.reshape(D, heads, -1).transpose(1, 0, 2)
        folded_values = (out_by_head @ values.swapaxes(-1, -2)).swapaxes(-1, -2)  # (rows, heads, S, D)
        return {"folded_keys": (keys @ q_by_head).reshape(text_rows, heads * S, D),
                "folded_values": folded_values.reshape(text_rows, heads * S, D)}

    def make_cache(self, batch: int, max_length: int, dtype: mx.Dtype) -> KVCache:
        head_dim = self.self_attn.q_proj.weight.shape[0] // self.self_attn.heads
        return KVCache(batch, self.self_attn.heads, head_dim, max_length, dtype)

    def __call__(
        self,
        x: mx.array,
        text_kv: dict,
        text_mask: mx.array,
        cache: KVCache | None,
    ) -> mx.array:
        sa, ca = self.self_attn, self.encoder_attn
        queries, keys, values = self_attention_inputs(
            x, self.self_attn_layer_norm, sa.q_proj, sa.k_proj, sa.v_proj, sa.heads
        )
        if cache is not None:
            keys, values = cache.update(keys, values)
        causal = "causal" if x.shape[1] > 1 else None
        attended = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=sa.scale, mask=causal)
        return layer_output(
            x, attended, sa.out_proj, self.encoder_attn_layer_norm, text_kv, text_mask, ca.heads, ca.scale,
            self.final_layer_norm, self.fc1, self.fc2, self.activation,
        )


def project(x: mx.array, linear: nn.Module) -> mx.array:
    """A bias-free Linear or QuantizedLinear as a pure function of its parameters (so that it compiles with them
    as inputs); a quantized layer's bits and group size follow from its shapes."""
    weight = linear["weight"]
    if "scales" not in linear:
        return x @ weight.T
    in_dims = x.shape[-1]
    return mx.quantized_matmul(
        x, weight, linear["scales"], linear["biases"], transpose=True,
        group_size=in_dims // linear["scales"].shape[-1], bits=32 * weight.shape[-1] // in_dims,
    )


def layer_norm(x: mx.array, norm: nn.Module) -> mx.array:
    return mx.fast.layer_norm(x, norm["weight"], norm["bias"], 1e-5)


def split_heads(x: mx.array, heads: int) -> mx.array:
    B, L, _ = x.shape
    return x.reshape(B, L, heads, -1).transpose(0, 2, 1, 3)


def merge_heads(x: mx.array) -> mx.array:
    B, _, L, _ = x.shape
    return x.transpose(0, 2, 1, 3).reshape(B, L, -1)


@mx.compile
def self_attention_inputs(x, norm, q_proj, k_proj, v_proj, heads: int):
    h = layer_norm(x, norm)
    return tuple(split_heads(project(h, proj), heads) for proj in (q_proj, k_proj, v_proj))


@mx.compile
def layer_output(x, attended, out_proj, cross_norm, text: dict, text_mask, heads: int, scale: float, final_norm,
                 fc1, fc2, activation: str):
    """The rest of a layer after self-attention: its output projection, cross-attention and the FFN."""
    x = x + project(merge_heads(attended), out_proj)
    x = x + cross_attention(layer_norm(x, cross_norm), text, text_mask, heads, scale)
    return x + project(ACTIVATIONS[activation](project(layer_norm(x, final_norm), fc1)), fc2)


def cross_attention(h: mx.array, text: dict, text_mask: mx.array, heads: int, scale: float) -> mx.array:
    """h (B, L, D) attending to the text (see DecoderLayer.text_kv for the two forms)."""
    if "q_proj" in text:
        queries = split_heads(project(h, text["q_proj"]), heads)
        attended = mx.fast.scaled_dot_product_attention(queries, text["keys"], text["values"], scale=scale,
                                                        mask=text_mask)
        return project(merge_heads(attended), text["out_proj"])
    keys, values = text["folded_keys"], text["folded_values"]
    if keys is None:
        return mx.zeros_like(h)
    rows, (B, L, _) = keys.shape[0], h.shape
    scores = (h[:rows] @ keys.swapaxes(-1, -2)).reshape(rows, L, heads, -1) + text_mask[:rows]
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(rows, L, -1)
    out = weights @ values
    return mx.pad(out, [(0, B - rows), (0, 0), (0, 0)])  # rows without text add 0


class MusicgenDecoder(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        D = config.hidden_size
        self.embed_scale = math.sqrt(D) if config.scale_embedding else 1.0
        self.embed_tokens = [nn.Embedding(config.vocab_size + 1, D) for _ in range(config.num_codebooks)]
        self.layers = [DecoderLayer(config) for _ in range(config.num_hidden_layers)]
        self.layer_norm = nn.LayerNorm(D, eps=1e-5)
        self.lm_heads = [nn.Linear(D, config.vocab_size, bias=False) for _ in range(config.num_codebooks)]

    def text_context(self, states: mx.array, mask: mx.array) -> TextContext:
        """Keys and values of the text for every layer, computed once per generation rather than once per step,
        and the padding mask in additive form."""
        dtype = self.layer_norm.weight.dtype
        states = states.astype(dtype)
        has_text = np.array(mask).any(axis=1)
        text_rows = int(has_text.sum())
        if not has_text[:text_rows].all():  # rows with text must lead for the folded form
            text_rows = None
        return TextContext([layer.text_kv(states, text_rows) for layer in self.layers], additive_mask(mask, dtype))

    def make_cache(self, batch: int, max_length: int) -> list[KVCache]:
        dtype = self.layer_norm.weight.dtype
        return [layer.make_cache(batch, max_length, dtype) for layer in self.layers]

    def __call__(
        self,
        codes: mx.array,
        text: TextContext,
        cache: list[KVCache] | None = None,
    ) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab)."""
        offset = cache[0].offset if cache else 0
        x = sum(embed(codes[:, k]) for k, embed in enumerate(self.embed_tokens)) * self.embed_scale
        x = x + sinusoids(mx.arange(offset, offset + codes.shape[2]), x.shape[-1]).astype(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, text.kv[i], text.mask, cache[i] if cache else None)
        x = self.layer_norm(x)
        return mx.stack([head(x) for head in self.lm_heads], axis=1)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint names (`model.decoder.*`, `lm_heads.*`) -> ours; the stored sinusoid table is recomputed."""
        out = {}
        for name, value in weights.items():
            if name == "model.decoder.embed_positions.weights":
                continue
            out[name.removeprefix("model.decoder.")] = value
        return out


def additive_mask(mask: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """(B, S) 0/1 key mask -> (B, 1, 1, S) additive mask with a finite minimum, like the reference.

    A fully masked row (the unconditional half of guidance) then gets uniform weights over zero values and
    outputs exactly 0, where -inf would give NaN.
    """
    big_negative = mx.array(mx.finfo(dtype).min, dtype=dtype)
    return mx.where(mask[:, None, None, :].astype(mx.bool_), mx.array(0.0, dtype=dtype), big_negative)
