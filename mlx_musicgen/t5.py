"""The T5 encoder (Raffel et al., 2020, "Exploring the Limits of Transfer Learning"): MusicGen's text conditioner.

A stack of pre-norm transformer layers with RMS layer norms, no biases, no attention scaling and no absolute
positions: each head instead adds a learned bias chosen by a bucket of the query-key distance, computed once and
shared by every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Protocol

import mlx.core as mx
import mlx.nn as nn

from .names import compile_names, renamed

FEED_FORWARDS = ("relu", "gated-gelu")


class TextEncoder(Protocol):
    """What encodes texts for the front end: T5Encoder, or its CPU form (cpu.numpy_t5.NumpyT5)."""

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """(B, L) token ids and optional (B, L) 0/1 padding mask -> (B, L, d_model) float32 hidden states."""


@dataclass
class T5Config:
    """The encoder's sizes; the defaults are t5-base, MusicGen's text encoder."""

    vocab_size: int = 32128
    d_model: int = 768
    d_kv: int = 64
    d_ff: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"

    def check(self) -> None:
        """Raise ValueError for settings that make no encoder (its fields' types are the loader's to check)."""
        if self.feed_forward_proj not in FEED_FORWARDS:
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not one of {FEED_FORWARDS}")
        if self.relative_attention_num_buckets < 4 or self.relative_attention_max_distance <= (
                self.relative_attention_num_buckets // 4):
            raise ValueError(f"T5 relative attention needs at least 4 buckets and a max distance beyond a quarter "
                             f"of them, got {self.relative_attention_num_buckets} and "
                             f"{self.relative_attention_max_distance}")

    @classmethod
    def from_dict(cls, d: dict) -> T5Config:
        """From a Hugging Face T5 config dict (a MusicGen config's `text_encoder`); other keys are ignored."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def relative_position_bucket(relative_position: mx.array, num_buckets: int, max_distance: int) -> mx.array:
    """Map key position - query position to a bucket, both directions (the encoder sees the whole text).

    Half the buckets are for keys after the query, half for keys before. Within a half, the first half of the
    buckets hold distances exactly; the rest are logarithmically wider, up to max_distance, beyond which all
    distances share the last bucket.
    """
    num_buckets //= 2
    direction = (relative_position > 0).astype(mx.int32) * num_buckets
    distance = mx.abs(relative_position)
    max_exact = num_buckets // 2
    # Clamped below so log never sees 0; those distances take the exact branch anyway.
    log_distance = mx.log(mx.maximum(distance, max_exact).astype(mx.float32) / max_exact)
    log_bucket = max_exact + (log_distance / math.log(max_distance / max_exact) * (num_buckets - max_exact))
    log_bucket = mx.minimum(log_bucket.astype(mx.int32), num_buckets - 1)
    return direction + mx.where(distance < max_exact, distance, log_bucket)


class T5Attention(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.num_heads = config.num_heads
        inner_dim = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner_dim, bias=False)
        self.k = nn.Linear(config.d_model, inner_dim, bias=False)
        self.v = nn.Linear(config.d_model, inner_dim, bias=False)
        self.o = nn.Linear(inner_dim, config.d_model, bias=False)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        B, L, _ = x.shape
        q, k, v = self.q(x), self.k(x), self.v(x)
        q, k, v = (t.reshape(B, L, self.num_heads, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        # No 1/sqrt(d_kv): T5 folds it into the initialisation of q.
        out = mx.fast.scaled_dot_product_attention(q, k, v, scale=1.0, mask=mask)
        return self.o(out.transpose(0, 2, 1, 3).reshape(B, L, -1))


class DenseReluDense(nn.Module):
    """The original T5 feed-forward (t5-base, hence MusicGen)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(nn.relu(self.wi(x)))


class DenseGatedGeluDense(nn.Module):
    """T5 v1.1's feed-forward: a GELU (tanh approximation, as in the reference) gate on a linear path."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.wo(nn.gelu_approx(self.wi_0(x)) * self.wi_1(x))


class T5Layer(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        self.attention_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.attention = T5Attention(config)
        self.feed_forward_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)
        gated = config.feed_forward_proj == "gated-gelu"
        self.feed_forward = DenseGatedGeluDense(config) if gated else DenseReluDense(config)

    def __call__(self, x: mx.array, mask: mx.array) -> mx.array:
        x = x + self.attention(self.attention_norm(x), mask)
        return x + self.feed_forward(self.feed_forward_norm(x))


# Hugging Face parameter names -> ours. The relative attention bias lives in HF's first layer, which computes it
# for all layers; here it belongs to the encoder itself.
HF_NAMES = compile_names(
    (
        (r"shared\.weight", "embed_tokens.weight"),
        (r"encoder\.block\.0\.layer\.0\.SelfAttention\.relative_attention_bias\.weight",
         "relative_attention_bias.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.SelfAttention\.(q|k|v|o)\.weight", r"layers.\1.attention.\2.weight"),
        (r"encoder\.block\.(\d+)\.layer\.0\.layer_norm\.weight", r"layers.\1.attention_norm.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight",
         r"layers.\1.feed_forward.\2.weight"),
        (r"encoder\.block\.(\d+)\.layer\.1\.layer_norm\.weight", r"layers.\1.feed_forward_norm.weight"),
        (r"encoder\.final_layer_norm\.weight", "final_layer_norm.weight"),
    )
)


class T5Encoder(nn.Module):
    def __init__(self, config: T5Config):
        super().__init__()
        config.check()
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_heads)
        self.layers = [T5Layer(config) for _ in range(config.num_layers)]
        self.final_layer_norm = nn.RMSNorm(config.d_model, eps=config.layer_norm_epsilon)

    def position_bias(self, length: int) -> mx.array:
        """The (1, heads, query, key) bias every layer adds to its attention scores."""
        positions = mx.arange(length)
        relative_position = positions[None, :] - positions[:, None]
        buckets = relative_position_bucket(relative_position, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).astype(mx.float32).transpose(2, 0, 1)[None]

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """(B, L) token ids and optional (B, L) 0/1 padding mask -> (B, L, d_model) float32 hidden states.

        The mask hides padded keys only, so padded positions still get (meaningless) outputs, as in the reference.
        """
        # The residual stream is float32 whatever the weights' dtype (mixed matmuls promote): T5's activations
        # overflow float16, which the reference patches over by clamping.
        x = self.embed_tokens(input_ids).astype(mx.float32)
        mask = self.position_bias(input_ids.shape[1])
        if attention_mask is not None:
            # A large finite negative rather than -inf, so a fully masked row gives a softmax, not NaN.
            padding = mx.where(attention_mask.astype(mx.bool_), 0.0, mx.finfo(mx.float32).min)
            mask = mask + padding[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask)
        return self.final_layer_norm(x)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Rename a Hugging Face T5 encoder's tensors (`text_encoder.` prefix stripped) to this module's names.

        `encoder.embed_tokens.weight` is a tied copy of `shared.weight`: used only when `shared.weight` is absent.
        Unrecognised keys pass through unchanged, for strict loading to report.
        """
        weights = dict(weights)
        tied = weights.pop("encoder.embed_tokens.weight", None)
        if tied is not None and "shared.weight" not in weights:
            weights["shared.weight"] = tied
        return renamed(weights, HF_NAMES)
