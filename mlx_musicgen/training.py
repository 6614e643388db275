"""The training objective of MusicGen, as transformers computes it (`MusicgenForConditionalGeneration.forward`
with `labels`), and one optimisation step.

A clip's codes (K, T) are delayed as generation delays them, behind a start column (codebook k: pads for its
first delay + 1 positions, then its codes), T + 1 columns in all. The decoder reads the sequence without its
last column and predicts it without its first (teacher forcing); pads are not predicted (ignored), and the
loss is the cross-entropy of each codebook over its codes, averaged over the codebooks.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import delay
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
