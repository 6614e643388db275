"""The parts of numpy_training's step, as numpy: a linear layer with its LoRA, forward and backward (`Linear`),
one decoder layer's weights by DecoderLayer's names (`Layer`, read at `layer_paths`), what each layer's backward
pass reads (`LayerTape`), and the heads' layout (split_heads, merge_heads). Each part knows which of its weights
train (a LoRA's A and B; a full fine-tune's weights and biases) and gives their gradients."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.nn as nn
import numpy as np

from ..lora import LoRALinear


def trained(path: str, trainable: set[str]) -> frozenset[str]:
    """Which of the module at `path`'s "weight" and "bias" are among the `trainable` parameters' names."""
    return frozenset(kind for kind in ("weight", "bias") if f"{path}.{kind}" in trainable)


class Linear:
    """A linear layer as numpy views: its weight (out, in) and bias, and its LoRA A (r, in), B (out, r) and
    scale s if it has one (each read again at every call: the optimizer replaces what trains); `name` is its
    module's path, its gradients' prefix; `trainable`: the model's trainable parameters' names (a full
    fine-tune's include the weight and bias of a plain Linear)."""

    def __init__(self, name: str, module: nn.Module, trainable: set[str]):
        self.name, self.module = name, module
        self.linear = module.linear if isinstance(module, LoRALinear) else module
        self.trains = trained(name, trainable) if self.linear is module else frozenset()

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.linear.weight)

    @property
    def bias(self) -> np.ndarray | None:
        return np.asarray(self.linear.bias) if "bias" in self.linear else None

    @property
    def lora(self) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(A, B, s) as they are now, or None for a frozen layer without LoRA."""
        if not isinstance(self.module, LoRALinear):
            return None
        return np.asarray(self.module.lora_a), np.asarray(self.module.lora_b), self.module.scale

    def forward(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """x (N, in) -> y (N, out), and s x A^T (N, r) for the backward pass (None without LoRA)."""
        y = x @ self.weight.T
        if self.bias is not None:
            y += self.bias
        lora = self.lora
        if lora is None:
            return y, None
        a, b, scale = lora
        middle = x @ a.T
        middle *= np.float32(scale)
        y += middle @ b.T
        return y, middle

    def backward(self, x: np.ndarray, middle: np.ndarray | None, grad_y: np.ndarray, grads: dict,
                 input_grad: bool = True) -> np.ndarray | None:
        """The gradient of x (N, in) from grad_y (N, out) (None if not `input_grad`); the trainable weights' into
        `grads`: dW = dy^T x, db = sum(dy) (a full fine-tune), or LoRA's."""
        grad_x = grad_y @ self.weight if input_grad else None
        if "weight" in self.trains:
            grads[f"{self.name}.weight"] = grad_y.T @ x
        if "bias" in self.trains:
            grads[f"{self.name}.bias"] = grad_y.sum(axis=0)
        lora = self.lora
        if lora is not None:
            a, b, scale = lora
            grad_middle = grad_y @ b
            grad_middle *= np.float32(scale)
            grads[f"{self.name}.lora_b"] = grad_y.T @ middle
            grads[f"{self.name}.lora_a"] = grad_middle.T @ x
            if input_grad:
                grad_x += grad_middle @ a
        return grad_x


@dataclass
class LayerNorm:
    """A LayerNorm (its eps the decoder's 1e-5: kernels.mean_and_rstd) by its module's path; `trains`: which of
    "weight" and "bias" are trainable (a full fine-tune's both)."""

    name: str
    module: nn.LayerNorm
    trains: frozenset[str]

    @property
    def weight(self) -> np.ndarray:
        return np.asarray(self.module.weight)

    @property
    def bias(self) -> np.ndarray:
        return np.asarray(self.module.bias)

    def parameter_grads(self, grad_out: np.ndarray, normalized: np.ndarray, grads: dict) -> None:
        """The gradients of its weight, sum(dy * normalized), and bias, sum(dy), over the rows of its output's
        grad_out (N, D), those that train, into `grads`."""
        if "weight" in self.trains:
            grads[f"{self.name}.weight"] = np.einsum("nd,nd->d", grad_out, normalized)
        if "bias" in self.trains:
            grads[f"{self.name}.bias"] = grad_out.sum(axis=0)


@dataclass
class AttentionWeights:
    q: Linear
    k: Linear
    v: Linear
    out: Linear


@dataclass
class Layer:
    """One decoder layer's weights (DecoderLayer's, by the same names)."""

    norms: tuple[LayerNorm, LayerNorm, LayerNorm]  # before self-attention, cross-attention, feed-forward
    self_attn: AttentionWeights
    cross_attn: AttentionWeights
    fc1: Linear
    fc2: Linear


@dataclass
class AttentionTape:
    """What an attention's backward pass reads: its input h (N, D) (the text's for keys and values in
    cross-attention), the LoRA middles of q, k, v and out, the heads' q, k, v (B, H, L or S, d), the weights P by
    block of queries, and the heads' merged outputs (N, D)."""

    h: np.ndarray
    middles: tuple
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    weights: list[np.ndarray]
    merged: np.ndarray


@dataclass
class LayerTape:
    """What a layer's backward pass reads: each norm's (normalized, rstd), both attentions' tapes, and the
    feed-forward's input h, pre-activation, activation and LoRA middles."""

    norms: list[tuple[np.ndarray, np.ndarray]]
    self_attn: AttentionTape
    cross_attn: AttentionTape
    ffn: tuple


def split_heads(x: np.ndarray, batch: int, heads: int) -> np.ndarray:
    """(B * L, heads * d) -> (B, heads, L, d), contiguous."""
    return np.ascontiguousarray(x.reshape(batch, -1, heads, x.shape[1] // heads).transpose(0, 2, 1, 3))


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, heads, L, d) -> (B * L, heads * d), contiguous."""
    B, H, L, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B * L, H * d)


def layer_paths(i: int) -> tuple[list[str], list[str]]:
    """The paths of decoder layer i's linear layers and layer norms (DecoderLayer's names)."""
    p = f"decoder.layers.{i}"
    linears = [f"{p}.{attention}.{name}" for attention in ("self_attn", "encoder_attn")
               for name in ("q_proj", "k_proj", "v_proj", "out_proj")] + [f"{p}.fc1", f"{p}.fc2"]
    norms = [f"{p}.self_attn_layer_norm", f"{p}.encoder_attn_layer_norm", f"{p}.final_layer_norm"]
    return linears, norms


def model_paths(model) -> tuple[list[str], list[str], list[str]]:
    """The paths of every linear layer, layer norm and embedding table NumpyTraining reads."""
    decoder = model.decoder
    linears = [f"decoder.lm_heads.{k}" for k in range(len(decoder.lm_heads))]
    linears += ["enc_to_dec_proj"] if model.config.project_text else []
    norms = ["decoder.layer_norm"]
    for i in range(len(decoder.layers)):
        layer_linears, layer_norms = layer_paths(i)
        linears += layer_linears
        norms += layer_norms
    return linears, norms, [f"decoder.embed_tokens.{k}" for k in range(len(decoder.embed_tokens))]
