"""Decoding on a CPU: two cores through two MLX streams, and products that read each weight once.

A decoding step multiplies 1-8 rows by every weight of the decoder, so it is bound by memory bandwidth. Two
things keep it near that bound on a CPU:
- OpenBLAS's gemm repacks the whole weight for products this small (reading it ~3 times over). Products with
  column blocks of W.T, (blocks, in, out / blocks), skip the repacking.
- One core does not saturate memory. Each decoder layer is split in two halves, Megatron-style: each half
  holds half the heads of both attentions and half the feed-forward units, and runs on its own stream; the
  halves meet only to add their outputs, once per block. The arithmetic is the layer's own, reordered.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import _linux
from .decoder import ACTIVATIONS, DecoderLayer, KVCache, split_heads

MAX_BLOCKED_ROWS = 8  # more rows (a prefill) amortise the repacking: one ordinary product is faster
BLOCK_WIDTH = 64  # output columns per block: small enough that OpenBLAS neither repacks nor spawns threads

_streams: dict[str, tuple[mx.Stream, mx.Stream]] = {}


def blas_threads_itself() -> bool:
    """Whether the CPU's BLAS runs each product on every core by itself (MKL). If not (OpenBLAS, one thread),
    our CPU code parallelises over two streams and splits the decoder's layers (split_for_cpu)."""
    return _linux.LOADED == _linux.MKL


def parallel_streams() -> tuple[mx.Stream, mx.Stream]:
    """Two streams of the default device, for work that can run on two CPU cores at once.

    With MKL, one stream twice: MKL's own threads already use every core, and MKL called from two threads
    gets a thread team for each, after which every product runs ~2.5x slower (measured on 2 cores)."""
    device = mx.default_device()
    key = str(device)
    if key not in _streams:
        if device == mx.cpu and blas_threads_itself():
            stream = mx.default_stream(device)
            _streams[key] = (stream, stream)
        else:
            _streams[key] = (mx.new_stream(device), mx.new_stream(device))
    return _streams[key]


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
    def __init__(self, weight: mx.array):
        super().__init__()
        self.blocks = column_blocks(weight)

    def __call__(self, x: mx.array) -> mx.array:
        return blocked_matmul(x, self.blocks)


class SplitCache:
    """The self-attention KV caches of a split layer's two halves."""

    def __init__(self, halves: list):
        self.halves = halves

    @property
    def offset(self) -> int:
        return self.halves[0].offset


class SplitDecoderLayer(nn.Module):
    """A decoder.DecoderLayer as two halves on two streams (see the module's docstring)."""

    def __init__(self, layer: DecoderLayer, heads: int):
        super().__init__()
        self.self_attn_layer_norm = layer.self_attn_layer_norm
        self.encoder_attn_layer_norm = layer.encoder_attn_layer_norm
        self.final_layer_norm = layer.final_layer_norm
        self.activation = ACTIVATIONS[layer.activation]
        self.heads = heads // 2  # per half
        self.scale = layer.self_attn.scale
        # The text's keys and values are made once per generation, with many rows: plain weights.
        self.text_k_proj, self.text_v_proj = layer.encoder_attn.k_proj, layer.encoder_attn.v_proj
        sa, ca = layer.self_attn, layer.encoder_attn
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

    def text_kv(self, states: mx.array, text_rows: int | None = None) -> tuple[mx.array, mx.array]:
        return split_heads(self.text_k_proj(states), 2 * self.heads), split_heads(self.text_v_proj(states), 2 * self.heads)

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
        B, _, L, _ = queries.shape
        out = mx.fast.scaled_dot_product_attention(queries, keys, values, scale=self.scale, mask=mask)
        return out.transpose(0, 2, 1, 3).reshape(B, L, -1)

    def __call__(self, x: mx.array, text_kv: tuple[mx.array, mx.array], text_mask: mx.array,
                 cache: SplitCache | None) -> mx.array:
        causal = "causal" if x.shape[1] > 1 else None
        heads = slice(0, self.heads), slice(self.heads, 2 * self.heads)

        h = self.self_attn_layer_norm(x)

        def self_attention(half: int) -> mx.array:
            q, k, v = mx.split(split_heads(blocked_matmul(h, self.qkv[half]), 3 * self.heads), 3, axis=1)
            if cache is not None:
                k, v = cache.halves[half].update(k, v)
            return blocked_matmul(self.attention(q, k, v, causal), self.out[half])

        x = x + self.in_halves(self_attention)
        h = self.encoder_attn_layer_norm(x)

        def cross_attention(half: int) -> mx.array:
            q = split_heads(blocked_matmul(h, self.cross_q[half]), self.heads)
            k, v = (t[:, heads[half]] for t in text_kv)
            return blocked_matmul(self.attention(q, k, v, text_mask), self.cross_out[half])

        x = x + self.in_halves(cross_attention)
        h = self.final_layer_norm(x)
        return x + self.in_halves(lambda half: blocked_matmul(self.activation(blocked_matmul(h, self.fc1[half])),
                                                              self.fc2[half]))


def split_for_cpu(decoder: nn.Module) -> None:
    """Rebuild a loaded float32 decoder's layers as split layers and its heads as blocked products."""
    if decoder.layer_norm.weight.dtype != mx.float32 or not isinstance(decoder.lm_heads[0], nn.Linear):
        return  # half precision and quantized weights have no BLAS path on a CPU: nothing to gain
    heads = decoder.config.num_attention_heads
    if heads % 2:
        return
    for i, layer in enumerate(decoder.layers):
        decoder.layers[i] = SplitDecoderLayer(layer, heads)
        mx.eval(decoder.layers[i].parameters())  # one layer at a time: the old copy is freed as we go
    decoder.lm_heads = [BlockedLinear(head.weight) for head in decoder.lm_heads]
