"""Fine-tuning MusicGen: the training objective, as transformers computes it
(`MusicgenForConditionalGeneration.forward` with `labels`), and the function a training step computes its loss
and gradients with (`loss_and_grad_for_training`; the training loop is trainer.py's).

A clip's codes (K, T) are delayed as generation delays them, behind a start column (codebook k: pads for its
first delay + 1 positions, then its codes), T + 1 columns in all. The decoder reads the sequence without its
last column and predicts it without its first (teacher forcing); pads are not predicted (ignored), and the
loss is the cross-entropy of each codebook over its codes, averaged over the codebooks.

A batch of examples is `make_batch`'s.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from functools import partial
from typing import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import cpu, delay
from .dataset import Example
from .decoder import TextKV
from .melody import null_chroma



@dataclass
class Batch:
    """Decoder inputs and labels (B, K, L), the text's T5 states (B, S, d_model) and mask (B, S), for melody
    models each clip's chroma (B, frames, 12), and which rows train unconditioned (B,) (condition dropout)."""

    inputs: mx.array
    labels: mx.array
    text_states: mx.array
    text_mask: mx.array
    chroma: np.ndarray | None = None
    unconditioned: mx.array | None = None


def delayed_sequences(codes: list[np.ndarray], pad: int, audio_channels: int) -> tuple[np.ndarray, np.ndarray]:
    """Clips' codes (K, T_i) -> decoder inputs and labels (B, K, max T_i): each clip delayed behind a start
    column (delay.delay_pattern), kept to its first T_i + 1 columns as transformers' build_delay_pattern_mask
    keeps a fully known sequence (so codebook k's last k codes are not predicted, as in the reference), and
    padded at the end with pad ids."""
    K = codes[0].shape[0]
    sequences = []
    for clip in codes:
        start = np.full((1, K, 1), pad, dtype=np.int32)
        prompt = np.concatenate([start, clip[None].astype(np.int32)], axis=2)
        length = clip.shape[-1] + K // audio_channels
        sequences.append(delay.delay_pattern(prompt, length, pad, audio_channels)[0, :, : clip.shape[-1] + 1])
    longest = max(s.shape[-1] for s in sequences)
    batch = np.stack([np.pad(s, ((0, 0), (0, longest - s.shape[-1])), constant_values=pad) for s in sequences])
    return batch[:, :, :-1], batch[:, :, 1:]


def make_batch(model, examples: list[Example], unconditioned: np.ndarray | None = None) -> Batch:
    """Examples -> a padded training batch (texts padded with masked zeros, melody chroma with silence's)."""
    pad = model.config.decoder.pad_token_id
    inputs, labels = delayed_sequences([e.codes for e in examples], pad, model.config.decoder.audio_channels)
    longest = max(e.text_states.shape[0] for e in examples)
    states = np.stack([np.pad(e.text_states, ((0, longest - e.text_states.shape[0]), (0, 0))) for e in examples])
    mask = np.stack([np.pad(e.text_mask, (0, longest - e.text_mask.shape[0])) for e in examples])
    chroma = None
    if model.config.melody is not None:
        frames = max(e.chroma.shape[0] for e in examples)
        chroma = null_chroma(len(examples), frames, model.config.melody.num_chroma)
        for i, e in enumerate(examples):
            chroma[i, : e.chroma.shape[0]] = e.chroma
    return Batch(mx.array(inputs), mx.array(labels), mx.array(states), mx.array(mask), chroma,
                 None if unconditioned is None else mx.array(unconditioned))


def predicted_tokens(batch: Batch, pad: int) -> int:
    """How many codes a batch's loss predicts (its non-pad labels)."""
    return int((batch.labels != pad).sum())


def codebook_loss(logits: mx.array, labels: mx.array, pad: int) -> mx.array:
    """Cross-entropy per codebook over its non-pad labels, averaged over codebooks: logits (B, K, L, V),
    labels (B, K, L)."""
    valid = labels != pad
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(valid, labels, 0), reduction="none")
    per_codebook = (ce * valid).sum(axis=(0, 2)) / mx.maximum(valid.sum(axis=(0, 2)), 1)
    return per_codebook.mean()


class CheckpointedLayer(nn.Module):
    """A decoder layer whose activations are recomputed in the backward pass (the layer's parameters and the
    text's keys and values are the checkpointed function's inputs, so gradients reach them)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def __call__(self, x: mx.array, text: TextKV | None = None, cache=None) -> mx.array:
        layer = self.layer

        def run(params, x, *text_arrays):
            layer.update(params)
            return layer(x, TextKV(*text_arrays) if text_arrays else None)

        text_arrays = () if text is None else (text.keys, text.values, text.mask)
        return mx.checkpoint(run)(layer.trainable_parameters(), x, *text_arrays)


def forward(model, batch: Batch, checkpoint: bool = False) -> mx.array:
    """Teacher-forced logits (B, K, L, vocab) of a batch, the conditioning computed from the cached T5 states
    through the (trainable) projections; unconditioned rows get the null text (and the null melody)."""
    mask, chroma = batch.text_mask, batch.chroma
    if batch.unconditioned is not None:
        mask = mask * (1 - batch.unconditioned[:, None].astype(mask.dtype))
        if chroma is not None:
            dropped = np.array(batch.unconditioned).astype(bool)
            chroma = np.where(dropped[:, None, None], null_chroma(*chroma.shape), chroma)
    context = model.decoder_context(model.project_text(batch.text_states, mask), mask, chroma)
    decoder = model.decoder
    layers = decoder.layers
    if checkpoint:  # for this call only: the model's own layers (and its parameters' names) stay as they are
        decoder.layers = [CheckpointedLayer(layer) for layer in layers]
    try:
        return decoder(batch.inputs, context)
    finally:
        decoder.layers = layers


def loss(model, batch: Batch, checkpoint: bool = False) -> mx.array:
    return codebook_loss(forward(model, batch, checkpoint), batch.labels, model.config.decoder.pad_token_id)


MAX_TRACES = 8  # batch shapes compiled_loss_and_grad traces; later new shapes run uncompiled


def compiled_loss_and_grad(model, checkpoint: bool = False) -> Callable[[object, Batch], tuple]:
    """nn.value_and_grad(model, loss) as one compiled function of the batch's arrays (as mlx-lm's trainer
    compiles its step), the model's and the random generator's state captured: MLX fuses the element-wise work
    of the forward and backward passes, 8-20% off a LoRA step on a CPU (docs/performance.md). Each batch shape
    (clip and text lengths) and mode (train or eval) is traced once, ~1.7 s at musicgen-small's shape; past
    MAX_TRACES shapes, and for batches with melody chroma (whose condition dropout is numpy's), the function runs
    uncompiled."""
    loss_and_grad = nn.value_and_grad(model, lambda m, b: loss(m, b, checkpoint))
    state = [model.state, mx.random.state]
    traced: set[tuple] = set()

    @partial(mx.compile, inputs=state, outputs=state)
    def step(inputs: mx.array, labels: mx.array, text_states: mx.array, text_mask: mx.array,
             unconditioned: mx.array, training: bool) -> tuple[mx.array, dict]:
        # `training` is a key of the trace, not read: a trace made in one mode is not replayed in the other
        return loss_and_grad(model, Batch(inputs, labels, text_states, text_mask, None, unconditioned))

    def run(model_, batch: Batch) -> tuple[mx.array, dict]:
        assert model_ is model, "compiled_loss_and_grad: call it with the model it was made for"
        shape = (batch.inputs.shape, batch.text_states.shape, model.training)
        if batch.chroma is not None or (shape not in traced and len(traced) >= MAX_TRACES):
            return loss_and_grad(model, batch)
        unconditioned = batch.unconditioned
        if unconditioned is None:
            unconditioned = mx.zeros((batch.inputs.shape[0],), dtype=mx.int32)
        model.decoder.position_table(batch.inputs.shape[-1], model.decoder.dtype)  # not grown inside a trace
        # A trace swaps placeholders into the model and the random state, and swaps back only when it returns:
        # on an exception (Ctrl-C: the trainer then saves) the real arrays are put back here.
        held, key = tree_flatten(model.state), mx.random.state[0]
        try:
            result = step(batch.inputs, batch.labels, batch.text_states, batch.text_mask, unconditioned,
                          model.training)
        except BaseException:
            model.update(tree_unflatten(held), strict=False)
            high, low = np.array(key).tolist()
            mx.random.seed(high << 32 | low)  # the key again: mx.random.key(seed) is seed's two 32-bit halves
            raise
        traced.add(shape)
        return result

    return run


def loss_and_grad_for_training(model, checkpoint: bool = False) -> Callable[[object, Batch], tuple]:
    """What the trainer computes a micro-batch's loss and gradients with: on a CPU (unless
    MLX_MUSICGEN_PORTABLE=1), in numpy where cpu.numpy_training takes the model, a LoRA or a full fine-tune
    (faster there: docs/performance.md); else compiled_loss_and_grad."""
    if mx.default_device() == mx.cpu and not cpu.portable_requested():
        numpy_form = cpu.numpy_loss_and_grad(model, checkpoint)
        if numpy_form is not None:
            return numpy_form
        refusal = cpu.numpy_training.unsupported(model)
        if refusal is not None and refusal != "nothing trains":
            warnings.warn(f"this fine-tune trains on MLX here ({refusal}), slower on a CPU than in numpy "
                          f"(docs/finetuning.md)", stacklevel=2)
    return compiled_loss_and_grad(model, checkpoint)


def use_cpu_training_forms(model) -> None:
    """On a CPU (unless MLX_MUSICGEN_PORTABLE=1), the decoder's attention and GELU in their vectorised forms,
    the same functions (cpu.training); elsewhere the model stays as it is."""
    if mx.default_device() == mx.cpu and not cpu.portable_requested():
        cpu.optimize_for_training(model)
