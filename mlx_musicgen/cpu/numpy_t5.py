"""T5's encoder in numpy (NumpyT5): the function t5.T5Encoder computes, on views of its float32 weights, for
encoding texts on a CPU.

A text is a dozen tokens, so each of T5's products multiplies a dozen rows by a weight read once. MKL through
MLX does such products at two thirds of numpy's OpenBLAS speed on some CPUs (docs/performance.md), and each of
MLX's ~300 ops an encoding costs tens of microseconds, against a few in numpy. Weights replaced after it was
made (loaded, merged, cast) are followed (views.WeightViews): the views are made again, or, for weights other
than float32 (T5's activations overflow half precision), the MLX encoder runs.
"""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from ..t5 import DenseGatedGeluDense, T5Encoder, T5Layer
from .numpy_decoder import softmax
from .views import WeightViews, weights


def linear(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x (..., in) by a bias-free linear layer's weight (out, in) -> (..., out)."""
    rows = x.reshape(-1, x.shape[-1])
    # (W x^T)^T, not x W^T: OpenBLAS runs the product with the weight first ~20% faster for a dozen rows
    return (weight @ rows.T).T.reshape(*x.shape[:-1], weight.shape[0])


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """x / sqrt(mean(x^2) + eps) * weight over the last axis (T5's layer norm: no centring, no bias)."""
    return x / np.sqrt(np.add.reduce(x * x, axis=-1, keepdims=True) / np.float32(x.shape[-1]) + np.float32(eps)) \
        * weight


def gelu_approx(x: np.ndarray) -> np.ndarray:
    """GELU's tanh approximation (nn.gelu_approx, T5 v1.1's)."""
    return x * (1 + np.tanh(np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3))) / 2


class NumpyT5Layer:
    """One T5Layer on views of its weights: x += Attn(RMS(x)); x += FF(RMS(x))."""

    def __init__(self, layer: T5Layer):
        attention, feed_forward = layer.attention, layer.feed_forward
        self.heads = attention.num_heads
        self.q, self.k, self.v, self.o = (np.asarray(p.weight) for p in (attention.q, attention.k, attention.v,
                                                                          attention.o))
        self.attention_norm = np.asarray(layer.attention_norm.weight), layer.attention_norm.eps
        self.feed_forward_norm = np.asarray(layer.feed_forward_norm.weight), layer.feed_forward_norm.eps
        self.gated = isinstance(feed_forward, DenseGatedGeluDense)
        self.wi = [np.asarray(p.weight) for p in ((feed_forward.wi_0, feed_forward.wi_1) if self.gated
                                                  else (feed_forward.wi,))]
        self.wo = np.asarray(feed_forward.wo.weight)

    def attention(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        """x (B, L, D), bias (B or 1, heads, L, L) -> (B, L, D); no 1/sqrt(d) (T5 folds it into q's weights)."""
        B, L, _ = x.shape
        q, k, v = (linear(x, w).reshape(B, L, self.heads, -1).transpose(0, 2, 1, 3) for w in (self.q, self.k, self.v))
        out = softmax(q @ k.transpose(0, 1, 3, 2) + bias) @ v
        return linear(out.transpose(0, 2, 1, 3).reshape(B, L, -1), self.o)

    def feed_forward(self, x: np.ndarray) -> np.ndarray:
        if self.gated:
            return linear(gelu_approx(linear(x, self.wi[0])) * linear(x, self.wi[1]), self.wo)
        return linear(np.maximum(linear(x, self.wi[0]), 0), self.wo)

    def __call__(self, x: np.ndarray, bias: np.ndarray) -> np.ndarray:
        x = x + self.attention(rms_norm(x, *self.attention_norm), bias)
        return x + self.feed_forward(rms_norm(x, *self.feed_forward_norm))


class NumpyT5(WeightViews):
    """A T5Encoder's forward pass in numpy (see the module's docstring); the same call as T5Encoder's."""

    def __init__(self, encoder: T5Encoder):
        super().__init__(encoder)
        self.embeddings = np.asarray(encoder.embed_tokens.weight)
        self.layers = [NumpyT5Layer(layer) for layer in encoder.layers]
        self.final_norm = np.asarray(encoder.final_layer_norm.weight), encoder.final_layer_norm.eps

    encoder = property(lambda self: self.module)

    @staticmethod
    def supports(encoder: T5Encoder) -> bool:
        """float32 weights (not half precision, not quantized; adapters never take T5, lora.is_target)."""
        return all(array.dtype == mx.float32 for array in weights(encoder))

    def __call__(self, input_ids: mx.array, attention_mask: mx.array | None = None) -> mx.array:
        """(B, L) token ids and optional (B, L) 0/1 padding mask -> (B, L, d_model) float32 hidden states."""
        if not self.current():
            return self.encoder(input_ids, attention_mask)
        ids = np.asarray(input_ids)
        bias = np.asarray(self.encoder.position_bias(ids.shape[1]))  # (1, heads, L, L), as T5Encoder makes it
        if attention_mask is not None:  # T5Encoder's padding: the lowest float32, so a fully masked row is uniform
            padding = np.where(np.asarray(attention_mask).astype(bool), np.float32(0), np.finfo(np.float32).min)
            bias = bias + padding[:, None, None, :]
        x = self.embeddings[ids]
        for layer in self.layers:
            x = layer(x, bias)
        return mx.array(rms_norm(x, *self.final_norm))
