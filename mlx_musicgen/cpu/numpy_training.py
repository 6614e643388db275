"""A fine-tune's loss and gradients on a CPU, in numpy: `loss_and_grad(model)` returns a function of (model,
batch) -> (loss, gradients) that computes what nn.value_and_grad(model, training.loss) does for a MusicGen model
whose trainable weights are LoRA's, or the decoder's and its text projection's (a full fine-tune), or any mix of
those (`unsupported` says what it takes), with the backward pass written out.

A LoRA step at musicgen-small's shape is ~700 GFLOP of products (a full fine-tune's ~1000: each weight's gradient
too), the same ones MLX and torch run, and a few hundred passes over the activations between them (layer norms,
softmax, GELU, residuals). MLX's CPU runs those
passes on one core, as a dozen element-wise kernels each, which left its step at ~0.75x torch's; here the
products are numpy's BLAS on every core and each pass is one numba kernel on every core (cpu.training_kernels;
docs/performance.md, Fine-tuning).

The forward pass is training.forward's, layer by layer (DecoderLayer: x += SelfAttn(LN(x));
x += CrossAttn(LN(x), text); x += fc2(act(fc1(LN(x))))); the backward pass is its vector-Jacobian products:
- a LoRA linear y = x W^T + b + s (x A^T) B^T: dB = dy^T (s x A^T), dA = s (dy B)^T x, dx = dy W + s (dy B) A;
  a linear layer that trains whole: dW = dy^T x, db = sum(dy);
- attention O = P V, P = softmax(s Q K^T + mask): dV = P^T dO, dS = s P (dO V^T - rowsum(dO * O)),
  dQ = dS K, dK = dS^T Q;
- a layer norm y = n w + b, n = (x - mean) rstd: dx = rstd (g - mean(g) - n mean(g n)), g = dy w; dw = sum(dy n),
  db = sum(dy);
- the embeddings x = scale sum_k E_k[code_k] + positions: dE_k[c] = scale times the sum of dx over the positions
  whose code k is c;
- the exact GELU: Phi(x) + x phi(x); the cross-entropy: softmax - onehot, over each codebook's predicted codes.
The gradients are compared with torch autograd's in the tests, as the portable model's are.
"""

from __future__ import annotations

import functools
import types
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..decoder import MusicgenDecoder
from ..lora import LoRALinear
from .numpy_decoder import load_numba_kernels
from .numpy_training_parts import (AttentionTape, AttentionWeights, Layer, LayerNorm, LayerTape, Linear, layer_paths,
                                  merge_heads, model_paths, split_heads, trained)

LORA = ("lora_a", "lora_b")


@functools.cache
def training_kernels() -> types.ModuleType | None:
    """cpu.training_kernels, compiled (or loaded from numba's cache) when the trainer starts; None where they do
    not load (numpy_decoder.load_numba_kernels)."""
    return load_numba_kernels("training_kernels", lambda kernels: kernels.compile_all(), "the CPU's training step",
                              "fine-tunes train on MLX instead")


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


ACTIVATIONS = ("gelu", "relu")  # the decoder's activations NumpyTraining computes


class NumpyTraining:
    """The loss and gradients of a MusicGen model's trainable weights (see the module's docstring) as one call of a
    batch."""

    def __init__(self, model, kernels: types.ModuleType, checkpoint: bool = False):
        """`checkpoint`: keep each layer's input only, and run its forward pass again in the backward pass (the
        activations of one layer alive at a time, for a sixth more time a step)."""
        self.model, self.kernels, self.checkpoint = model, kernels, checkpoint
        decoder: MusicgenDecoder = model.decoder
        config = decoder.config
        self.heads, self.activation = config.num_attention_heads, config.activation_function
        self.scale = (config.hidden_size // self.heads) ** -0.5
        modules = dict(model.named_modules())
        self.names = [name for name, _ in tree_flatten(model.trainable_parameters())]
        trainable = set(self.names)

        def norm(name: str) -> LayerNorm:
            return LayerNorm(name, modules[name], trained(name, trainable))

        self.layers = []
        for i in range(len(decoder.layers)):
            linear_names, norm_names = layer_paths(i)
            linears = [Linear(name, modules[name], trainable) for name in linear_names]
            self.layers.append(Layer(tuple(norm(name) for name in norm_names), AttentionWeights(*linears[:4]),
                                     AttentionWeights(*linears[4:8]), *linears[8:]))
        self.final_norm = norm("decoder.layer_norm")
        self.lm_heads = [Linear(f"decoder.lm_heads.{k}", head, trainable) for k, head in enumerate(decoder.lm_heads)]
        self.embeddings = [f"decoder.embed_tokens.{k}.weight" for k in range(len(decoder.embed_tokens))]
        self.embeddings_train = any(name in trainable for name in self.embeddings)
        self.text_projection = Linear("enc_to_dec_proj", model.enc_to_dec_proj, trainable) \
            if model.config.project_text else None

    # ---- pieces

    def layer_norm(self, norm: LayerNorm, x: np.ndarray) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """x (N, D) -> LN(x), and (normalized, rstd) for the backward pass."""
        out, normalized = np.empty_like(x), np.empty_like(x)
        rstd = np.empty(x.shape[0], np.float32)
        self.kernels.layer_norm(x, norm.weight, norm.bias, out, normalized, rstd)
        return out, (normalized, rstd)

    def layer_norm_backward(self, norm: LayerNorm, saved: tuple[np.ndarray, np.ndarray], grad_out: np.ndarray,
                            grad_x: np.ndarray, grads: dict) -> None:
        """grad_x (N, D) += the input's gradient from the output's grad_out; the norm's own into `grads` if it
        trains. `saved`: layer_norm's (normalized, rstd)."""
        norm.parameter_grads(grad_out, saved[0], grads)
        self.kernels.layer_norm_backward(grad_out, *saved, norm.weight, grad_x)

    def attend(self, q: np.ndarray, k: np.ndarray, v: np.ndarray, mask: np.ndarray, causal: bool
               ) -> tuple[np.ndarray, list[np.ndarray]]:
        """q (B, H, L, d), k and v (B, H, S, d) -> the heads' outputs (B, H, L, d) and the weights P, by blocks of
        queries (attention_blocks). mask (B, S) additive, or NO_MASK."""
        out, weights = np.empty_like(q), []
        for start, end, keys in attention_blocks(q.shape[2], k.shape[2], causal):
            block = q[:, :, start:end] @ k[:, :, :keys].transpose(0, 1, 3, 2)
            self.kernels.softmax(block, self.scale, mask, causal)
            out[:, :, start:end] = block @ v[:, :, :keys]
            weights.append(block)
        return out, weights

    def attend_backward(self, tape: AttentionTape, grad_out: np.ndarray, causal: bool
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The gradients of the heads' q, k and v from their outputs' (B, H, L, d), block by block as attend made
        the weights."""
        q, k, v = tape.q, tape.k, tape.v
        grad_q, grad_k, grad_v = np.empty_like(q), np.zeros_like(k), np.zeros_like(v)
        for (start, end, keys), block in zip(attention_blocks(q.shape[2], k.shape[2], causal), tape.weights):
            grad_block = grad_out[:, :, start:end]
            grad_v[:, :, :keys] += block.transpose(0, 1, 3, 2) @ grad_block
            grad_scores = grad_block @ v[:, :, :keys].transpose(0, 1, 3, 2)
            self.kernels.softmax_backward(block, grad_scores, self.scale)
            grad_q[:, :, start:end] = grad_scores @ k[:, :, :keys]
            grad_k[:, :, :keys] += grad_scores.transpose(0, 1, 3, 2) @ q[:, :, start:end]
        return grad_q, grad_k, grad_v

    def attention(self, weights: AttentionWeights, h: np.ndarray, batch: int, text: np.ndarray | None = None,
                  mask: np.ndarray = NO_MASK) -> tuple[np.ndarray, AttentionTape]:
        """Self-attention of h (B * L, D), causal; or with `text` (B * S, D), cross-attention to it under the
        additive mask (B, S) -> (B * L, D), and its tape."""
        sources = h if text is None else text
        (q, middle_q), (k, middle_k), (v, middle_v) = (weights.q.forward(h), weights.k.forward(sources),
                                                       weights.v.forward(sources))
        q, k, v = (split_heads(y, batch, self.heads) for y in (q, k, v))
        out, attention_weights = self.attend(q, k, v, mask, text is None)
        merged = merge_heads(out)
        y, middle_out = weights.out.forward(merged)
        return y, AttentionTape(h, (middle_q, middle_k, middle_v, middle_out), q, k, v, attention_weights, merged)

    def attention_backward(self, weights: AttentionWeights, tape: AttentionTape, grad_y: np.ndarray, grads: dict,
                           text: np.ndarray | None = None, grad_text: np.ndarray | None = None,
                           input_grad: bool = True) -> np.ndarray | None:
        """The gradient of h from the output's grad_y (B * L, D) (None if not `input_grad`); for cross-attention
        the text's added into grad_text (B * S, D)."""
        middle_q, middle_k, middle_v, middle_out = tape.middles
        B, H = tape.q.shape[:2]
        grad_out = split_heads(weights.out.backward(tape.merged, middle_out, grad_y, grads), B, H)
        grad_q, grad_k, grad_v = (merge_heads(g) for g in self.attend_backward(tape, grad_out, text is None))
        grad_h = weights.q.backward(tape.h, middle_q, grad_q, grads, input_grad)
        if text is None:
            grad_k = weights.k.backward(tape.h, middle_k, grad_k, grads, input_grad)
            grad_v = weights.v.backward(tape.h, middle_v, grad_v, grads, input_grad)
            return grad_h + grad_k + grad_v if input_grad else None
        grad_text += weights.k.backward(text, middle_k, grad_k, grads)
        grad_text += weights.v.backward(text, middle_v, grad_v, grads)
        return grad_h

    # ---- one layer

    def layer_forward(self, layer: Layer, x: np.ndarray, batch: int, text: np.ndarray, text_mask: np.ndarray
                      ) -> tuple[np.ndarray, LayerTape]:
        """x (B * L, D) -> the layer's output (a new array), and its tape. text (B * S, D), text_mask (B, S)
        additive."""
        h, first = self.layer_norm(layer.norms[0], x)
        y, self_tape = self.attention(layer.self_attn, h, batch)
        x = x + y
        h, second = self.layer_norm(layer.norms[1], x)
        y, cross_tape = self.attention(layer.cross_attn, h, batch, text, text_mask)
        x += y
        h, third = self.layer_norm(layer.norms[2], x)
        hidden, middle_1 = layer.fc1.forward(h)
        if self.activation == "gelu":
            activated = np.empty_like(hidden)
            self.kernels.gelu(hidden, activated)
        else:
            activated = np.maximum(hidden, 0)
        y, middle_2 = layer.fc2.forward(activated)
        x += y
        return x, LayerTape([first, second, third], self_tape, cross_tape, (h, hidden, activated, middle_1, middle_2))

    def layer_backward(self, layer: Layer, tape: LayerTape, grad: np.ndarray, text: np.ndarray,
                       grad_text: np.ndarray, grads: dict, input_grad: bool) -> np.ndarray:
        """The gradient of the layer's input from its output's, grad (B * L, D), updated in place (the residual's
        path) and returned (not `input_grad`: only as far as the self-attention's output, which is all the first
        layer's LoRA needs); the text's gradient added into grad_text (B * S, D)."""
        kernels = self.kernels
        norms = layer.norms
        h, hidden, activated, middle_1, middle_2 = tape.ffn
        grad_activated = layer.fc2.backward(activated, middle_2, grad, grads)
        if self.activation == "gelu":
            kernels.gelu_backward(hidden, grad_activated)
        else:
            grad_activated *= hidden > 0
        grad_h = layer.fc1.backward(h, middle_1, grad_activated, grads)
        self.layer_norm_backward(norms[2], tape.norms[2], grad_h, grad, grads)
        grad_h = self.attention_backward(layer.cross_attn, tape.cross_attn, grad, grads, text, grad_text)
        self.layer_norm_backward(norms[1], tape.norms[1], grad_h, grad, grads)
        grad_h = self.attention_backward(layer.self_attn, tape.self_attn, grad, grads, input_grad=input_grad)
        if input_grad:
            self.layer_norm_backward(norms[0], tape.norms[0], grad_h, grad, grads)
        return grad

    # ---- the whole model

    def __call__(self, model, batch) -> tuple[mx.array, dict]:
        """A training.Batch (inputs and labels (B, K, L), T5 states (B, S, d_model) and mask (B, S), the rows
        trained unconditioned) -> (the loss, a scalar; the gradients of the trainable parameters, as
        nn.value_and_grad gives them)."""
        return self.run(model, batch, gradients=True)

    def loss(self, model, batch) -> mx.array:
        """The loss alone (the trainer's validation): the forward pass, keeping no activations."""
        return self.run(model, batch, gradients=False)[0]

    def run(self, model, batch, gradients: bool) -> tuple[mx.array, dict | None]:
        if model is not self.model:
            raise ValueError("numpy_training: call it with the model it was made for")
        if batch.chroma is not None:
            raise ValueError("numpy_training: melody batches train on MLX (training.compiled_loss_and_grad)")
        decoder = model.decoder
        inputs, labels = np.asarray(batch.inputs), np.asarray(batch.labels)
        B, K, L = inputs.shape
        D, vocab = decoder.config.hidden_size, decoder.config.vocab_size
        valid = labels != decoder.pad_token_id
        if labels.min() < 0 or (labels[valid] >= vocab).any() or inputs.min() < 0 or inputs.max() > vocab:
            raise ValueError(f"numpy_training: codes outside the vocabulary (0..{vocab - 1}, and the pad id {vocab})")
        grads: dict[str, np.ndarray] = {}

        # the text, as model.project_text and decoder_context make it
        states = np.asarray(batch.text_states.astype(mx.float32))
        mask = np.asarray(batch.text_mask.astype(mx.float32))
        if batch.unconditioned is not None:
            mask = mask * (1 - np.asarray(batch.unconditioned.astype(mx.float32)))[:, None]
        S = states.shape[1]
        states = states.reshape(B * S, -1)
        middle_text = None
        if self.text_projection is not None:
            projected, middle_text = self.text_projection.forward(states)
        else:
            projected = states
        keep = mask.reshape(B * S, 1)
        text = projected * keep
        attended = np.ones_like(mask) if model.config.attend_text_padding else mask
        text_mask = np.where(attended > 0, np.float32(0), np.finfo(np.float32).min).astype(np.float32)

        # forward
        scale = np.float32(decoder.embed_scale)
        x = sum(np.asarray(table.weight)[inputs[:, k]] for k, table in enumerate(decoder.embed_tokens)) * scale
        x = (x + np.asarray(decoder.position_table(L, mx.float32))[:L]).reshape(B * L, D)
        tapes = []
        for layer in self.layers:
            output, tape = self.layer_forward(layer, x, B, text, text_mask)
            if gradients:
                tapes.append(x if self.checkpoint else tape)  # checkpoint: the input, to run the layer again
            x = output
        del tape
        h, final = self.layer_norm(self.final_norm, x)

        # the loss, each codebook's mean over its predicted codes, averaged; its gradient back to h
        total = 0.0
        grad_h = np.zeros_like(h)
        for k, head in enumerate(self.lm_heads):
            logits, middle = head.forward(h)
            codebook_valid = valid[:, k].reshape(-1)
            row_weights = codebook_valid.astype(np.float32) / np.float32(max(codebook_valid.sum(), 1) * K)
            losses = np.empty(B * L, np.float32)
            targets = np.where(codebook_valid, labels[:, k].reshape(-1), 0).astype(np.int64)
            self.kernels.cross_entropy(logits, targets, row_weights, losses)  # logits := their gradient
            total += float(losses.sum(dtype=np.float64))
            if gradients:
                grad_h += head.backward(h, middle, logits, grads)
        if not gradients:
            return mx.array(np.float32(total)), None

        # backward
        grad = np.zeros_like(x)
        self.layer_norm_backward(self.final_norm, final, grad_h, grad, grads)
        grad_text = np.zeros_like(text)
        # the first layer's input gradient: only for the embeddings' (or its first norm's, on its way)
        first_input_grad = self.embeddings_train or bool(self.layers[0].norms[0].trains)
        for i in reversed(range(len(self.layers))):
            tape = self.layer_forward(self.layers[i], tapes[i], B, text, text_mask)[1] if self.checkpoint \
                else tapes[i]
            tapes[i] = None  # its activations go as soon as they are read
            grad = self.layer_backward(self.layers[i], tape, grad, text, grad_text, grads,
                                       input_grad=i > 0 or first_input_grad)
            del tape
        if self.embeddings_train:
            grad *= scale
            for k, name in enumerate(self.embeddings):
                table = np.zeros_like(np.asarray(decoder.embed_tokens[k].weight))
                np.add.at(table, inputs[:, k].reshape(-1), grad)
                grads[name] = table
        if self.text_projection is not None:
            self.text_projection.backward(states, middle_text, grad_text * keep, grads, input_grad=False)

        missing = [name for name in self.names if name not in grads]
        if missing:
            raise ValueError(f"numpy_training: no gradient for {missing[:3]}")
        # each as MLX's, the numpy one dropped at once (a full fine-tune's are the decoder's size)
        return mx.array(np.float32(total)), tree_unflatten([(name, mx.array(grads.pop(name))) for name in self.names])


def unsupported(model) -> str | None:
    """Why NumpyTraining does not take the model (None: it does). It takes MusicGen (no melody, not MAGNeT) with
    GELU or ReLU, whose linear layers, layer norms and embeddings it reads are MLX's own in float32 (a LoRALinear
    around a Linear: without dropout), and whose trainable weights are all among LoRALinear's A and B and the
    weights and biases of those linear layers (not under a LoRA), layer norms and embeddings."""
    decoder = model.decoder
    if model.config.melody is not None:
        return "a melody model"
    if type(decoder) is not MusicgenDecoder:
        return "not a MusicGen decoder"
    if decoder.config.activation_function not in ACTIVATIONS:
        return f"the activation {decoder.config.activation_function}"
    modules = dict(model.named_modules())
    linears, norms, embeddings = model_paths(model)
    for path in linears:
        module = modules.get(path)
        if isinstance(module, LoRALinear):
            if module.dropout_rate:
                return "LoRA dropout"
            module = module.linear
        if type(module) is not nn.Linear or module.weight.dtype != mx.float32:
            return f"{path} is not a float32 Linear"
    for path, kind in [(path, nn.LayerNorm) for path in norms] + [(path, nn.Embedding) for path in embeddings]:
        module = modules.get(path)
        if type(module) is not kind or module.weight.dtype != mx.float32:
            return f"{path} is not a float32 {kind.__name__}"
        if kind is nn.LayerNorm and (module.eps != 1e-5 or "bias" not in module):
            return f"{path} is not the decoder's LayerNorm"
    names = [name for name, _ in tree_flatten(model.trainable_parameters())]
    linears, norms, embeddings = set(linears), set(norms), set(embeddings)
    for name in names:
        path, _, kind = name.rpartition(".")
        lora = kind in LORA and isinstance(modules.get(path), LoRALinear)
        whole = kind in ("weight", "bias") and (path in norms or path in linears and type(modules[path]) is nn.Linear)
        if not (lora or whole or kind == "weight" and path in embeddings):
            return f"{name} trains, and is not a LoRA, linear layer, layer norm or embedding of the decoder's"
    return None if names else "nothing trains"


def loss_and_grad(model, checkpoint: bool = False) -> Callable | None:
    """The model's loss and gradients in numpy (NumpyTraining), or None where numba's kernels do not load or the
    model is not one it takes (unsupported)."""
    if unsupported(model) is not None:
        return None
    kernels = training_kernels()
    return None if kernels is None else NumpyTraining(model, kernels, checkpoint)
