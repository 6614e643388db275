"""The decoder on a CPU: compiled layers, folded cross-attention, and (with OpenBLAS) layers split over two
streams with products that read each weight once. Each swapped module has the interface of the one it
replaces (decoder.DecoderLayer: text_kv, make_cache, __call__) and computes the same function.

A decoding step multiplies 1-8 rows by every weight of the decoder, so it is bound by memory bandwidth, and a
step is ~40 small ops per layer around the products. On a CPU:
- mx.compile fuses a layer's element-wise ops and replays them without Python (CompiledDecoderLayer).
- Cross-attention to a short text reads fewer bytes with the query and output projections folded into the
  text's keys and values (fold_text).
- mx.erf runs element by element on a CPU; a rational erf in plain arithmetic vectorises (gelu).
- MKL reads a weight faster for a step's few rows when it is stored transposed, (in, out): the feed-forward's
  and the heads' weights are re-laid so at load (TransposedLinear).
- OpenBLAS repacks whole weights for products this small, and one core does not saturate memory: with it,
  each layer is split Megatron-style into two halves on two streams, whose products use column blocks of W.T
  (SplitDecoderLayer). MKL threads each product itself, so there the compiled layer runs on one stream.
"""

from __future__ import annotations

import math
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..decoder import (
    ACTIVATIONS,
    Context,
    DecoderLayer,
    KVCache,
    MusicgenDecoder,
    TextKV,
    additive_mask,
    cached_keys_values,
    merge_heads,
    split_heads,
    text_kv,
)
from ..melody import MelodyDecoder, MelodyDecoderLayer
from .threads import blas_threads_itself, parallel_streams

MAX_BLOCKED_ROWS = 8  # more rows (a prefill) amortise the repacking: one ordinary product is faster
BLOCK_WIDTH = 64  # output columns per block: small enough that OpenBLAS neither repacks nor spawns threads

# erf(x) ~ x P(x^2) / Q(x^2) on [-4, 4], and +-1 beyond (as in float32): the float32 rational approximation that
# Eigen and XLA use; as close to the exact GELU as torch's own.
ERF_P = (-1.60960333262415e-02, -2.95459980854025e-03, -7.34990630326855e-04, -5.69250639462346e-05,
         -2.10102402082508e-06, 2.77068142495902e-08, -2.72614225801306e-10)
ERF_Q = (-1.42647390514189e-02, -7.37332916720468e-03, -1.68282697438203e-03, -2.13374055278905e-04,
         -1.45660718464996e-05)


def polynomial(x: mx.array, coefficients: tuple[float, ...]) -> mx.array:
    """sum(c[i] * x**i), by Horner's rule."""
    result = coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = result * x + c
    return result


def erf_within_4(x):
    """erf(x) for x in [-4, 4] (an mx.array or a numpy array: plain arithmetic)."""
    x2 = x * x
    return x * polynomial(x2, ERF_P) / polynomial(x2, ERF_Q)


def erf(x: mx.array) -> mx.array:
    return erf_within_4(mx.clip(x, -4.0, 4.0))


@partial(mx.compile, shapeless=True)
def gelu(x: mx.array) -> mx.array:
    """The exact (erf) GELU, with the rational erf."""
    return x * (1 + erf(x * math.sqrt(0.5))) / 2


CPU_ACTIVATIONS = {**ACTIVATIONS, "gelu": gelu}


def activation_name(layer: DecoderLayer) -> str:
    return next(name for name, fn in ACTIVATIONS.items() if fn is layer.activation)


# ---- compiled layers (every CPU; the whole layer on MKL's threads)


class TransposedLinear(nn.Module):
    """A bias-free float32 nn.Linear that holds its weight transposed, (in, out), contiguous: with a step's 1-8
    rows, MKL's product reads a weight so laid ~1.3-1.5x faster than (out, in) (docs/performance.md)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.weight_t = mx.contiguous(linear.weight.T)

    def __call__(self, x: mx.array) -> mx.array:
        return x @ self.weight_t


def transposed(linear: nn.Module) -> nn.Module:
    """linear as a TransposedLinear where it is a float32 nn.Linear (others have no BLAS path on a CPU)."""
    plain = type(linear) is nn.Linear and "bias" not in linear and linear.weight.dtype == mx.float32
    return TransposedLinear(linear) if plain else linear


def project(x: mx.array, linear: nn.Module) -> mx.array:
    """A bias-free Linear, TransposedLinear or QuantizedLinear as a pure function of its parameters (so that it
    compiles with them as inputs); a quantized layer's bits and group size follow from its shapes."""
    if "weight_t" in linear:
        return x @ linear["weight_t"]
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


@mx.compile
def self_attention_inputs(x, norm, q_proj, k_proj, v_proj, heads: int):
    h = layer_norm(x, norm)
    return tuple(split_heads(project(h, proj), heads) for proj in (q_proj, k_proj, v_proj))


def feed_forward(x, final_norm, fc1, fc2, activation: str):
    return x + project(CPU_ACTIVATIONS[activation](project(layer_norm(x, final_norm), fc1)), fc2)


@mx.compile
def layer_output(x, attended, out_proj, cross_norm, text: dict, heads: int, scale: float, final_norm, fc1, fc2,
                 activation: str):
    """The rest of a layer after self-attention: its output projection, cross-attention and the FFN."""
    x = x + project(merge_heads(attended), out_proj)
    x = x + cross_attention(layer_norm(x, cross_norm), text, heads, scale)
    return feed_forward(x, final_norm, fc1, fc2, activation)


@mx.compile
def self_only_layer_output(x, attended, out_proj, final_norm, fc1, fc2, activation: str):
    """The rest of a layer without cross-attention (MusicGen-Melody's): the output projection and the FFN."""
    return feed_forward(x + project(merge_heads(attended), out_proj), final_norm, fc1, fc2, activation)


def cross_attention(h: mx.array, text: dict, heads: int, scale: float) -> mx.array:
    """h (B, L, D) attending to the text: TextKV's fields as a dict (which compiles), with the query and output
    projections when the text is not folded (see fold_text)."""
    if "q_proj" in text:
        queries = split_heads(project(h, text["q_proj"]), heads)
        attended = mx.fast.scaled_dot_product_attention(queries, text["keys"], text["values"], scale=scale,
                                                        mask=text["mask"])
        return project(merge_heads(attended), text["out_proj"])
    keys, values = text["keys"], text["values"]
    if keys is None:
        return mx.zeros_like(h)
    rows, (B, L, _) = keys.shape[0], h.shape
    scores = (h[:rows] @ keys.swapaxes(-1, -2)).reshape(rows, L, heads, -1) + text["mask"][:rows]
    weights = mx.softmax(scores, axis=-1, precise=True).reshape(rows, L, -1)
    return mx.pad(weights @ values, [(0, B - rows), (0, 0), (0, 0)])  # rows without text add 0


def text_rows(mask: mx.array) -> int | None:
    """How many leading rows of a (B, S) mask have text when all later rows have none (guidance's layout,
    whose unconditional rows attend to nothing and add exactly 0); else None."""
    has_text = np.array(mask).any(axis=1)
    rows = int(has_text.sum())
    return rows if has_text[:rows].all() else None


def fold_text(attn: nn.Module, states: mx.array, mask: mx.array, rows: int) -> TextKV:
    """Cross-attention of a short text with the query and output projections folded in, per head:
        q_h . k = x . (Wq_h^T k)        and        sum_h p_h V_h Wo_h^T = sum_h p_h (V_h Wo_h^T),
    so a step reads rows * heads * S * D keys and as many values instead of the two D x D weights."""
    heads, D = attn.heads, states.shape[-1]
    if rows == 0:  # unconditional: no row attends to anything
        return TextKV(None, None, additive_mask(mask, states.dtype), folded=True)
    states = states[:rows]
    keys = split_heads(project(states, attn.k_proj), heads) * attn.scale  # (rows, heads, S, head_dim)
    values = split_heads(project(states, attn.v_proj), heads)
    q_by_head = attn.q_proj.weight.reshape(heads, -1, D)  # (heads, head_dim, D), as stored
    # Wo's columns by head, (heads, D, head_dim): on a CPU a much cheaper copy than Wo.T's rows by head.
    out_by_head = attn.out_proj.weight.reshape(D, heads, -1).transpose(1, 0, 2)
    folded_values = (out_by_head @ values.swapaxes(-1, -2)).swapaxes(-1, -2)  # (rows, heads, S, D)
    return TextKV((keys @ q_by_head).reshape(rows, heads * states.shape[1], D),
                  folded_values.reshape(rows, heads * states.shape[1], D), additive_mask(mask, states.dtype),
                  folded=True)


class CompiledDecoderLayer(nn.Module):
    """decoder.DecoderLayer (or melody.MelodyDecoderLayer, without cross-attention) as two compiled functions of
    fixed shapes around the self-attention over the KV cache (whose length grows every step), with folded
    cross-attention for short texts."""

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        self.self_attn = layer.self_attn
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        if layer.cross_attention:
            self.encoder_attn = layer.encoder_attn
            self.encoder_attn_layer_norm = layer.encoder_attn_layer_norm
        self.fc1, self.fc2 = transposed(layer.fc1), transposed(layer.fc2)
        self.final_layer_norm = layer.final_layer_norm
        self.activation = activation_name(layer)

    def make_cache(self, batch: int, max_length: int, dtype: mx.Dtype) -> KVCache:
        return DecoderLayer.make_cache(self, batch, max_length, dtype)

    def text_kv(self, states: mx.array, mask: mx.array) -> TextKV:
        """The text's keys and values, or for short texts their folded form (fold_text)."""
        attn = self.encoder_attn
        rows, (_, S, D) = text_rows(mask), states.shape
        if rows is None or rows * attn.heads * S > D or "scales" in attn.q_proj or "scales" in attn.out_proj:
            return attn.text_kv(states, mask)
        return fold_text(attn, states, mask, rows)

    def __call__(self, x: mx.array, text: TextKV | None = None, cache: KVCache | None = None) -> mx.array:
        sa = self.self_attn
        queries, keys, values = self_attention_inputs(
            x, self.self_attn_layer_norm, sa.q_proj, sa.k_proj, sa.v_proj, sa.heads
        )
        keys, values, mask = cached_keys_values(cache, keys, values)
        attended = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=sa.scale, mask=mask)
        # Only the modules it uses: the compiled function's inputs are flattened every step.
        if "encoder_attn" not in self:
            return self_only_layer_output(x, attended, sa.out_proj, self.final_layer_norm, self.fc1, self.fc2,
                                          self.activation)
        ca = self.encoder_attn
        projections = {} if text.folded else {"q_proj": ca.q_proj, "out_proj": ca.out_proj}
        text = {"keys": text.keys, "values": text.values, "mask": text.mask, **projections}
        return layer_output(x, attended, sa.out_proj, self.encoder_attn_layer_norm, text, ca.heads, ca.scale,
                            self.final_layer_norm, self.fc1, self.fc2, self.activation)


# ---- split layers (OpenBLAS: two halves on two streams)


def column_blocks(weight: mx.array) -> mx.array:
    """A Linear weight (out, in) -> column blocks of its transpose, (out / BLOCK_WIDTH, in, BLOCK_WIDTH)."""
    out_dims, in_dims = weight.shape
    blocks = max(1, out_dims // BLOCK_WIDTH)
    return mx.contiguous(weight.T.reshape(in_dims, blocks, out_dims // blocks).transpose(1, 0, 2))


def blocked_matmul(x: mx.array, blocks: mx.array) -> mx.array:
    """x (..., in) @ W.T for W held as column_blocks(W)."""
    *lead, in_dims = x.shape
    count, _, width = blocks.shape
    x = x.reshape(-1, in_dims)
    if x.shape[0] > MAX_BLOCKED_ROWS:
        y = x @ blocks.transpose(1, 0, 2).reshape(in_dims, count * width)
    else:
        y = (x @ blocks).transpose(1, 0, 2).reshape(-1, count * width)
    return y.reshape(*lead, count * width)


class BlockedLinear(nn.Module):
    """A bias-free nn.Linear whose products skip OpenBLAS's repacking."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.blocks = column_blocks(linear.weight)

    def __call__(self, x: mx.array) -> mx.array:
        return blocked_matmul(x, self.blocks)


class SplitCache:
    """The self-attention KV caches of a split layer's two halves (never in a compiled step: its halves run on
    two streams)."""

    at = None

    def __init__(self, halves: list[KVCache]):
        self.halves = halves

    @property
    def offset(self) -> int:
        return self.halves[0].offset


class SplitDecoderLayer(nn.Module):
    """decoder.DecoderLayer as two halves on two streams: each half holds half the heads of both attentions and
    half the feed-forward units, and the halves meet only to add their outputs, once per block. The arithmetic
    is the layer's own, reordered."""

    def __init__(self, layer: DecoderLayer):
        super().__init__()
        sa, ca = layer.self_attn, layer.encoder_attn
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        self.encoder_attn_layer_norm = layer.encoder_attn_layer_norm
        self.final_layer_norm = layer.final_layer_norm
        self.activation = CPU_ACTIVATIONS[activation_name(layer)]
        self.heads = sa.heads // 2  # per half
        self.scale = sa.scale
        # The text's keys and values are made once per generation, with many rows: plain weights.
        self.text_k_proj, self.text_v_proj = ca.k_proj, ca.v_proj
        D, F = sa.q_proj.weight.shape[0], layer.fc1.weight.shape[0]
        rows = [slice(0, D // 2), slice(D // 2, D)]  # a half's heads: rows of q, k, v; columns of out
        units = [slice(0, F // 2), slice(F // 2, F)]  # a half's feed-forward units
        self.qkv = [column_blocks(mx.concatenate([sa.q_proj.weight[r], sa.k_proj.weight[r], sa.v_proj.weight[r]]))
                    for r in rows]
        self.out = [column_blocks(sa.out_proj.weight[:, r]) for r in rows]
        self.cross_q = [column_blocks(ca.q_proj.weight[r]) for r in rows]
        self.cross_out = [column_blocks(ca.out_proj.weight[:, r]) for r in rows]
        self.fc1 = [column_blocks(layer.fc1.weight[u]) for u in units]
        self.fc2 = [column_blocks(layer.fc2.weight[:, u]) for u in units]

    def text_kv(self, states: mx.array, mask: mx.array) -> TextKV:
        return text_kv(self.text_k_proj, self.text_v_proj, 2 * self.heads, states, mask)

    def make_cache(self, batch: int, max_length: int, dtype: mx.Dtype) -> SplitCache:
        head_dim = self.qkv[0].shape[1] // (2 * self.heads)
        return SplitCache([KVCache(batch, self.heads, head_dim, max_length, dtype) for _ in range(2)])

    def in_halves(self, block) -> mx.array:
        """Run block(half) for both halves on their streams; their outputs add up to the whole block's."""
        parts = []
        for half, stream in enumerate(parallel_streams()):
            with mx.stream(stream):
                parts.append(block(half))
        return parts[0] + parts[1]

    def attention(self, queries: mx.array, keys: mx.array, values: mx.array, mask) -> mx.array:
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return merge_heads(out)

    def __call__(self, x: mx.array, text: TextKV, cache: SplitCache | None = None) -> mx.array:
        causal = "causal" if x.shape[1] > 1 else None
        heads = slice(0, self.heads), slice(self.heads, 2 * self.heads)

        h = self.self_attn_layer_norm(x)

        def self_attention(half: int) -> mx.array:
            q, k, v = mx.split(split_heads(blocked_matmul(h, self.qkv[half]), 3 * self.heads), 3, axis=1)
            if cache is not None:
                k, v, _ = cache.halves[half].update(k, v)  # never compiled: the mask is `causal`
            return blocked_matmul(self.attention(q, k, v, causal), self.out[half])

        x = x + self.in_halves(self_attention)
        h = self.encoder_attn_layer_norm(x)

        def cross_attention(half: int) -> mx.array:
            q = split_heads(blocked_matmul(h, self.cross_q[half]), self.heads)
            k, v = text.keys[:, heads[half]], text.values[:, heads[half]]
            return blocked_matmul(self.attention(q, k, v, text.mask), self.cross_out[half])

        x = x + self.in_halves(cross_attention)
        h = self.final_layer_norm(x)
        return x + self.in_halves(lambda half: blocked_matmul(self.activation(blocked_matmul(h, self.fc1[half])),
                                                              self.fc2[half]))


def uses_blas(decoder: MusicgenDecoder) -> bool:
    """Whether a decoder's products go through the BLAS: float32 and not quantized (others have no BLAS path on a
    CPU)."""
    head = decoder.lm_heads[0]
    return decoder.dtype == mx.float32 and (isinstance(head, (BlockedLinear, TransposedLinear))
                                            or type(head) is nn.Linear)


def placeholder_context(decoder: MusicgenDecoder) -> Context:
    """Guidance's two rows of a 4-token placeholder text (the second row masked, as guidance's is), or for
    MusicGen-Melody, whose layers have no cross-attention, a 4-position placeholder prefix: for timing steps."""
    states = mx.zeros((2, 4, decoder.config.hidden_size))
    if isinstance(decoder, MelodyDecoder):
        return Context(prefix=states)
    return decoder.text_context(states, mx.array([[1] * 4, [0] * 4]))


def timing_step(decoder: MusicgenDecoder):
    """A function that runs one decoding step of guidance's two rows over a short cache, on placeholder codes
    and text: what the BLAS team is chosen by (threads.choose_blas_team)."""
    context = placeholder_context(decoder)
    codes = mx.full((2, decoder.num_codebooks, 1), decoder.pad_token_id, dtype=mx.int32)

    def step() -> None:
        mx.eval(decoder(codes, context, decoder.make_cache(2, context.length + 8)))

    return step


def can_split(decoder: MusicgenDecoder) -> bool:
    """Split layers need float32 weights (half precision and quantized weights have no BLAS path on a CPU:
    nothing to gain), an even number of heads and cross-attention (MusicGen-Melody's layers are compiled)."""
    return uses_blas(decoder) and decoder.config.num_attention_heads % 2 == 0 and decoder.layers[0].cross_attention


def optimize_decoder(decoder: MusicgenDecoder, split: bool | None = None) -> None:
    """Swap a loaded decoder's layers for their CPU forms, in place: split layers and blocked heads when the
    BLAS does not thread itself (`split`, by default), else compiled layers (fc1 and fc2 transposed) and
    transposed heads."""
    if not all(type(layer) in (DecoderLayer, MelodyDecoderLayer) for layer in decoder.layers):
        return  # already swapped
    split = (not blas_threads_itself() and can_split(decoder)) if split is None else split
    for i, layer in enumerate(decoder.layers):
        decoder.layers[i] = SplitDecoderLayer(layer) if split else CompiledDecoderLayer(layer)
        mx.eval(decoder.layers[i].parameters())  # one layer at a time: a re-laid weight's old copy is freed as we go
    decoder.lm_heads = [BlockedLinear(head) if split else transposed(head) for head in decoder.lm_heads]
    mx.eval(decoder.lm_heads)
