"""A LoRA fine-tune's loss and gradients on a CPU, in numpy: `lora_loss_and_grad(model)` returns a function of
(model, batch) -> (loss, gradients) that computes what nn.value_and_grad(model, training.loss) does for a
MusicGen model whose only trainable weights are LoRA's, with the backward pass written out.

A LoRA step at musicgen-small's shape is ~700 GFLOP of products, the same ones MLX and torch run, and a few
hundred passes over the activations between them (layer norms, softmax, GELU, residuals). MLX's CPU runs those
passes on one core, as a dozen element-wise kernels each, which left its step at ~0.75x torch's; here the
products are numpy's BLAS on every core and each pass is one numba kernel on every core (cpu.training_kernels;
docs/performance.md, Fine-tuning).

The forward pass is training.forward's, layer by layer (DecoderLayer: x += SelfAttn(LN(x));
x += CrossAttn(LN(x), text); x += fc2(act(fc1(LN(x))))); the backward pass is its vector-Jacobian products:
- a LoRA linear y = x W^T + b + s (x A^T) B^T: dB = dy^T (s x A^T), dA = s (dy B)^T x, dx = dy W + s (dy B) A;
- attention O = P V, P = softmax(s Q K^T + mask): dV = P^T dO, dS = s P (dO V^T - rowsum(dO * O)),
  dQ = dS K, dK = dS^T Q;
- a layer norm y = n w + b, n = (x - mean) rstd: dx = rstd (g - mean(g) - n mean(g n)), g = dy w;
- the exact GELU: Phi(x) + x phi(x); the cross-entropy: softmax - onehot, over each codebook's predicted codes.
The gradients are compared with torch autograd's in the tests, as the portable model's are.
"""

from __future__ import annotations

import functools
import types
import warnings
from dataclasses import dataclass
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..decoder import MusicgenDecoder
from ..lora import LoRALinear

LORA = ("lora_a", "lora_b")


@functools.cache
def training_kernels() -> types.ModuleType | None:
    """cpu.training_kernels, compiled (or loaded from numba's cache) on the first use; None where numba is not
    installed or cannot compile or cache them here (said once)."""
    try:
        from . import training_kernels
    except ImportError as error:
        if error.name != "numba":
            warnings.warn(f"numba could not be imported ({error}); LoRA trains on MLX's CPU", stacklevel=2)
        return None
    try:
        training_kernels.compile_all()
        return training_kernels
    except Exception as error:  # numba's own: no cache it can write, a threading layer it cannot load
        warnings.warn(f"numba's training kernels could not be loaded ({error}); LoRA trains on MLX's CPU",
                      stacklevel=2)
        return None


class Linear:
    """A linear layer as numpy views: its frozen weight (out, in) and bias, and its LoRA A (r, in), B (out, r)
    and scale s if it has one (read again at every call: the optimizer replaces them); `name` is its module's
    path, its gradients' prefix."""

    def __init__(self, name: str, module: nn.Module):
        self.name, self.module = name, module
        linear = module.linear if isinstance(module, LoRALinear) else module
        self.weight = np.asarray(linear.weight)
        self.bias = np.asarray(linear.bias) if "bias" in linear else None

    @property
    def lora(self) -> tuple[np.ndarray, np.ndarray, float] | None:
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
        """The gradient of x (N, in) from grad_y (N, out) (None if not `input_grad`); LoRA's into `grads`."""
        grad_x = grad_y @ self.weight if input_grad else None
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
    weight: np.ndarray
    bias: np.ndarray


@dataclass
class Layer:
    """One decoder layer's weights (DecoderLayer's, by the same names)."""

    norms: tuple[LayerNorm, LayerNorm, LayerNorm]  # before self-attention, cross-attention, feed-forward
    self_attn: tuple[Linear, Linear, Linear, Linear]  # q, k, v, out
    cross_attn: tuple[Linear, Linear, Linear, Linear]
    fc1: Linear
    fc2: Linear


NO_MASK = np.zeros((1, 0), np.float32)  # softmax's mask where there is none (self-attention: causal)
BLOCK = 128  # queries a block of causal attention: each block's scores stop at its own last position


def attention_blocks(queries: int, keys: int, causal: bool) -> list[tuple[int, int, int]]:
    """(first query, end of the queries, keys seen) for each block of queries, the queries the last of the keys:
    causal, blocks of BLOCK queries, each seeing the keys up to its last (which skips 3/8 of the scores of 4
    blocks, more of longer clips); else one block that sees every key."""
    if not causal:
        return [(0, queries, keys)]
    return [(start, end, end + keys - queries) for start in range(0, queries, BLOCK)
            for end in [min(queries, start + BLOCK)]]


def split_heads(x: np.ndarray, batch: int, heads: int) -> np.ndarray:
    """(B * L, heads * d) -> (B, heads, L, d), contiguous."""
    return np.ascontiguousarray(x.reshape(batch, -1, heads, x.shape[1] // heads).transpose(0, 2, 1, 3))


def merge_heads(x: np.ndarray) -> np.ndarray:
    """(B, heads, L, d) -> (B * L, heads * d), contiguous."""
    B, H, L, d = x.shape
    return np.ascontiguousarray(x.transpose(0, 2, 1, 3)).reshape(B * L, H * d)


class NumpyLoRA:
    """The loss and LoRA gradients of a MusicGen model (see the module's docstring) as one call of a batch."""

    def __init__(self, model, kernels: types.ModuleType, checkpoint: bool = False):
        """`checkpoint`: keep each layer's input only, and run its forward pass again in the backward pass (the
        activations of one layer alive at a time, for a sixth more time a step)."""
        self.model, self.kernels, self.checkpoint = model, kernels, checkpoint
        decoder: MusicgenDecoder = model.decoder
        config = decoder.config
        self.heads, self.activation = config.num_attention_heads, config.activation_function
        self.scale = (config.hidden_size // self.heads) ** -0.5
        modules = dict(model.named_modules())

        def linear(name: str) -> Linear:
            return Linear(name, modules[name])

        def norm(name: str) -> LayerNorm:
            return LayerNorm(np.asarray(modules[name].weight), np.asarray(modules[name].bias))

        self.layers = []
        for i in range(len(decoder.layers)):
            p = f"decoder.layers.{i}"
            self.layers.append(Layer(
                (norm(f"{p}.self_attn_layer_norm"), norm(f"{p}.encoder_attn_layer_norm"), norm(f"{p}.final_layer_norm")),
                tuple(linear(f"{p}.self_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
                tuple(linear(f"{p}.encoder_attn.{n}") for n in ("q_proj", "k_proj", "v_proj", "out_proj")),
                linear(f"{p}.fc1"), linear(f"{p}.fc2")))
        self.final_norm = norm("decoder.layer_norm")
        self.lm_heads = [linear(f"decoder.lm_heads.{k}") for k in range(config.num_codebooks)]
        self.embeddings = [np.asarray(e.weight) for e in decoder.embed_tokens]
        self.text_projection = linear("enc_to_dec_proj") if model.config.project_text else None
        self.names = [name for name, _ in tree_flatten(model.trainable_parameters())]

    # ---- pieces

    def layer_norm(self, norm: LayerNorm, x: np.ndarray) -> tuple[np.ndarray, tuple]:
        out, normalized = np.empty_like(x), np.empty_like(x)
        rstd = np.empty(x.shape[0], np.float32)
        self.kernels.layer_norm(x, norm.weight, norm.bias, out, normalized, rstd)
        return out, (normalized, rstd)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, causal: bool
               ) -> tuple[np.ndarray, list[np.ndarray]]:
        """q (B, H, L, d), k and v (B, H, S, d) -> the heads' outputs (B, H, L, d) and the weights P, by blocks of
        queries (attention_blocks). mask (B, S) additive, or (B, 0)."""
        out, weights = np.empty_like(q), []
        for start, end, keys in attention_blocks(q.shape[2], k.shape[2], causal):
            block = q[:, :, start:end] @ k[:, :, :keys].transpose(0, 1, 3, 2)
            self.kernels.softmax(block, self.scale, mask, causal)
            out[:, :, start:end] = block @ v[:, :, :keys]
            weights.append(block)
        return out, weights

    def attend_backward(self, q, k, v, weights: list[np.ndarray], grad_out, causal: bool
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The gradients of q, k and v from the outputs', block by block as attend made the weights."""
        grad_q, grad_k, grad_v = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
        for (start, end, keys), block in zip(attention_blocks(q.shape[2], k.shape[2], causal), weights):
            grad_block = grad_out[:, :, start:end]
            grad_v[:, :, :keys] += block.transpose(0, 1, 3, 2) @ grad_block
            grad_scores = grad_block @ v[:, :, :keys].transpose(0, 1, 3, 2)
            self.kernels.softmax_backward(block, grad_scores, self.scale)
            grad_q[:, :, start:end] = grad_scores @ k[:, :, :keys]
            grad_k[:, :, :keys] += grad_scores.transpose(0, 1, 3, 2) @ q[:, :, start:end]
        return grad_q, grad_k, grad_v

    # ---- one layer

    def layer_forward(self, layer: Layer, x: np.ndarray, batch: int, text: np.ndarray, text_mask: np.ndarray
                      ) -> tuple[np.ndarray, dict]:
        """x (B * L, D) -> the layer's output, and what its backward pass reads. text (B * S, D), text_mask
        (B, S) additive."""
        H, saved = self.heads, {}
        h, saved["norm1"] = self.layer_norm(layer.norms[0], x)
        projected = [p.forward(h) for p in layer.self_attn[:3]]
        q, k, v = (split_heads(y, batch, H) for y, _ in projected)
        out, weights = self.attend(q, k, v, NO_MASK, True)
        merged = merge_heads(out)
        y, middle_o = layer.self_attn[3].forward(merged)
        saved["self"] = (h, [m for _, m in projected], q, k, v, weights, merged, middle_o)
        x = x + y

        h, saved["norm2"] = self.layer_norm(layer.norms[1], x)
        qy, middle_q = layer.cross_attn[0].forward(h)
        ky, middle_k = layer.cross_attn[1].forward(text)
        vy, middle_v = layer.cross_attn[2].forward(text)
        q, k, v = split_heads(qy, batch, H), split_heads(ky, batch, H), split_heads(vy, batch, H)
        out, weights = self.attend(q, k, v, text_mask, False)
        merged = merge_heads(out)
        y, middle_o = layer.cross_attn[3].forward(merged)
        saved["cross"] = (h, (middle_q, middle_k, middle_v), q, k, v, weights, merged, middle_o)
        x += y

        h, saved["norm3"] = self.layer_norm(layer.norms[2], x)
        hidden, middle_1 = layer.fc1.forward(h)
        if self.activation == "gelu":
            activated = np.empty_like(hidden)
            self.kernels.gelu(hidden, activated)
        else:
            activated = np.maximum(hidden, 0)
        y, middle_2 = layer.fc2.forward(activated)
        saved["ffn"] = (h, hidden, activated, middle_1, middle_2)
        x += y
        return x, saved

    def layer_backward(self, layer: Layer, saved: dict, grad: np.ndarray, text: np.ndarray, grad_text: np.ndarray,
                       grads: dict, input_grad: bool) -> np.ndarray:
        """The gradient of the layer's input x from its output's, grad (B * L, D), updated in place (the
        residual's path) and returned; the text's gradient added into grad_text (B * S, D)."""
        kernels = self.kernels
        h, hidden, activated, middle_1, middle_2 = saved["ffn"]
        grad_activated = layer.fc2.backward(activated, middle_2, grad, grads)
        if self.activation == "gelu":
            kernels.gelu_backward(hidden, grad_activated)
        else:
            grad_activated *= hidden > 0
        grad_h = layer.fc1.backward(h, middle_1, grad_activated, grads)
        kernels.layer_norm_backward(grad_h, *saved["norm3"], layer.norms[2].weight, grad)

        h, (middle_q, middle_k, middle_v), q, k, v, weights, merged, middle_o = saved["cross"]
        grad_out = split_heads(layer.cross_attn[3].backward(merged, middle_o, grad, grads), *q.shape[:2])
        grad_q, grad_k, grad_v = self.attend_backward(q, k, v, weights, grad_out, False)
        grad_text += layer.cross_attn[1].backward(text, middle_k, merge_heads(grad_k), grads)
        grad_text += layer.cross_attn[2].backward(text, middle_v, merge_heads(grad_v), grads)
        grad_h = layer.cross_attn[0].backward(h, middle_q, merge_heads(grad_q), grads)
        kernels.layer_norm_backward(grad_h, *saved["norm2"], layer.norms[1].weight, grad)

        h, middles, q, k, v, weights, merged, middle_o = saved["self"]
        grad_out = split_heads(layer.self_attn[3].backward(merged, middle_o, grad, grads), *q.shape[:2])
        grad_heads = self.attend_backward(q, k, v, weights, grad_out, True)
        grad_h = [projection.backward(h, middle, merge_heads(grad_y), grads, input_grad)
                  for projection, middle, grad_y in zip(layer.self_attn[:3], middles, grad_heads)]
        if input_grad:  # (the first layer's input is the embeddings': frozen)
            kernels.layer_norm_backward(grad_h[0] + grad_h[1] + grad_h[2], *saved["norm1"], layer.norms[0].weight,
                                        grad)
        return grad

    # ---- the whole model

    def __call__(self, model, batch) -> tuple[mx.array, dict]:
        if model is not self.model:
            raise ValueError("numpy_training: call it with the model it was made for")
        if batch.chroma is not None:
            raise ValueError("numpy_training: melody batches train on MLX (training.compiled_loss_and_grad)")
        decoder = model.decoder
        inputs, labels = np.asarray(batch.inputs), np.asarray(batch.labels)
        B, K, L = inputs.shape
        D = decoder.config.hidden_size
        grads: dict[str, np.ndarray] = {}

        # the text, as model.project_text and decoder_context make it
        states = np.asarray(batch.text_states.astype(mx.float32))
        mask = np.asarray(batch.text_mask).astype(np.float32)
        if batch.unconditioned is not None:
            mask = mask * (1 - np.asarray(batch.unconditioned).astype(np.float32))[:, None]
        S = states.shape[1]
        states = np.ascontiguousarray(states.reshape(B * S, -1))
        middle_text = None
        if self.text_projection is not None:
            projected, middle_text = self.text_projection.forward(states)
        else:
            projected = states.copy()
        keep = mask.reshape(B * S, 1)
        text = projected * keep
        attended = np.ones_like(mask) if model.config.attend_text_padding else mask
        text_mask = np.where(attended > 0, np.float32(0), np.finfo(np.float32).min).astype(np.float32)

        # forward
        x = sum(table[inputs[:, k]] for k, table in enumerate(self.embeddings)) * np.float32(decoder.embed_scale)
        x = (x + np.asarray(decoder.position_table(L, mx.float32))[:L]).reshape(B * L, D).astype(np.float32)
        tape = []
        for layer in self.layers:
            tape.append(x if self.checkpoint else None)
            x, saved = self.layer_forward(layer, x, B, text, text_mask)
            if not self.checkpoint:
                tape[-1] = saved
        h, final = self.layer_norm(self.final_norm, x)

        # the loss, and its gradient back to the final norm's output
        valid = labels != decoder.pad_token_id
        total = 0.0
        grad_h = np.zeros_like(h)
        for k, head in enumerate(self.lm_heads):
            logits, middle = head.forward(h)
            codebook_valid = valid[:, k].reshape(-1)
            weights = codebook_valid.astype(np.float32) / np.float32(max(codebook_valid.sum(), 1) * K)
            losses = np.empty(B * L, np.float32)
            targets = np.where(codebook_valid, labels[:, k].reshape(-1), 0).astype(np.int64)
            self.kernels.cross_entropy(logits, targets, weights, losses)
            total += float(losses.sum(dtype=np.float64))
            grad_h += head.backward(h, middle, logits, grads)

        # backward
        grad = np.zeros_like(x)
        self.kernels.layer_norm_backward(grad_h, *final, self.final_norm.weight, grad)
        grad_text = np.zeros_like(text)
        for i in reversed(range(len(self.layers))):
            saved = self.layer_forward(self.layers[i], tape[i], B, text, text_mask)[1] if self.checkpoint else tape[i]
            grad = self.layer_backward(self.layers[i], saved, grad, text, grad_text, grads, input_grad=i > 0)
            tape[i] = None  # its activations go as soon as they are read
        if self.text_projection is not None:
            self.text_projection.backward(states, middle_text, grad_text * keep, grads, input_grad=False)

        missing = [name for name in self.names if name not in grads]
        if missing:
            raise ValueError(f"numpy_training: no gradient for {missing[:3]}")
        return mx.array(np.float32(total)), tree_unflatten([(name, mx.array(grads[name])) for name in self.names])


def unsupported(model) -> str | None:
    """Why numpy_training does not take the model (None: it does): it takes MusicGen (no melody, not MAGNeT) in
    float32 with GELU or ReLU, whose trainable weights are all LoRA's on linear layers, without LoRA dropout."""
    decoder = model.decoder
    if type(decoder) is not MusicgenDecoder or model.config.melody is not None:
        return "not a MusicGen decoder"
    if decoder.dtype != mx.float32 or decoder.config.activation_function not in ("gelu", "relu"):
        return "not float32 with GELU or ReLU"
    modules = dict(model.named_modules())
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    for name in names:
        path, _, kind = name.rpartition(".")
        module = modules.get(path)
        if kind not in LORA or not isinstance(module, LoRALinear) or type(module.linear) is not nn.Linear:
            return f"{name} trains, and is not a LoRA of a linear layer"
        if module.dropout_rate:
            return "LoRA dropout"
    return None if names else "nothing trains"


def lora_loss_and_grad(model, checkpoint: bool = False) -> Callable | None:
    """The model's loss and LoRA gradients in numpy (NumpyLoRA), or None where numba's kernels do not load or
    the model is not one it takes (unsupported)."""
    if unsupported(model) is not None:
        return None
    kernels = training_kernels()
    return None if kernels is None else NumpyLoRA(model, kernels, checkpoint)
