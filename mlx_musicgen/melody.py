"""MusicGen-Melody (Copet et al., 2023, section 2.3): the decoder conditioned on a melody's chroma as well as the
text, both as a prefix of its input rather than through cross-attention.

The prefix is [chroma_length frames of projected one-hot chroma | the projected T5 states of the text (zero at
padding)]; the codes follow it in one causal sequence, with sinusoidal positions counted from the prefix's first
frame. The prefix is computed once per window and enters the KV cache on the first step. Guidance's
unconditional rows get the null chroma (one-hot of bin 0 in every frame) and zero text.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import chroma
from .chroma import ChromaSettings
from .decoder import Context, DecoderLayer, MusicgenDecoder, cache_position


@dataclass
class MelodyConfig:
    """config.json's `num_chroma` (pitch classes, 12) and `chroma_length` (prefix frames: 235, 30 s at 32 kHz
    with a hop of 4096), and the features' settings (preprocessor_config.json)."""

    num_chroma: int
    chroma_length: int
    features: ChromaSettings

    @classmethod
    def from_dict(cls, config: dict, preprocessor: dict) -> MelodyConfig:
        return cls(config["num_chroma"], config["chroma_length"], ChromaSettings.from_dict(preprocessor))

    def check(self) -> None:
        self.features.check()
        if self.features.num_chroma != self.num_chroma:
            raise ValueError(f"the preprocessor's feature_size {self.features.num_chroma} is not the model's "
                             f"num_chroma {self.num_chroma}")


class MelodyDecoderLayer(DecoderLayer):
    """Pre-LN, self-attention only: x += SelfAttn(LN(x)); x += fc2(act(fc1(LN(x))))."""

    cross_attention = False


class MelodyDecoder(MusicgenDecoder):
    """The decoder of MusicGen-Melody: MusicgenDecoder's parts, with the conditioning prepended to the codes."""

    Layer = MelodyDecoderLayer

    def __call__(self, codes: mx.array, context: Context, cache: list | None = None) -> mx.array:
        """codes (B, K, T), the context's prefix (B, S, D) -> logits of the codes' positions (B, K, T, vocab). The
        prefix is read on the first call of a cache (or without one) and held in the cache from then on."""
        x = self.embed(codes)
        if (not cache or cache[0].offset == 0) and context.prefix is not None:  # a first step is never compiled
            x = mx.concatenate([context.prefix.astype(x.dtype), x], axis=1)
        x = self.add_positions(x, cache_position(cache))
        for i, layer in enumerate(self.layers):
            x = layer(x, cache=cache[i] if cache else None)
        return self.logits(x[:, -codes.shape[2] :])


def null_chroma(rows: int, frames: int, num_chroma: int) -> np.ndarray:
    """The null melody (rows, frames, num_chroma): one-hot of bin 0 in every frame, as silence gives."""
    null = np.zeros((rows, frames, num_chroma), dtype=np.float32)
    null[..., 0] = 1
    return null


def chroma_rows(features: np.ndarray | None, rows: int, guided: bool, num_chroma: int) -> np.ndarray:
    """The chroma of every decoder row (rows or 2 * rows, frames, num_chroma): the melody's (the null chroma when
    there is none) and, when guided, the null chroma for the unconditional rows."""
    if features is None:
        features = null_chroma(rows, 1, num_chroma)
    if guided:
        features = np.concatenate([features, null_chroma(*features.shape[:2], num_chroma)])
    return features


def fit_frames(states: mx.array, length: int) -> mx.array:
    """(B, F, D) -> (B, length, D): repeated whole (F shorter than length) and cut, as the reference fits chroma."""
    if states.shape[1] < length:
        states = mx.concatenate([states] * math.ceil(length / states.shape[1]), axis=1)
    return states[:, :length]


def prefix_context(chroma_states: mx.array, text_states: mx.array, chroma_length: int) -> Context:
    """Projected chroma (B, F, D) and text (B, S, D) -> the decoder's prefix (B, chroma_length + S, D)."""
    chroma_states = fit_frames(chroma_states, chroma_length).astype(text_states.dtype)
    return Context(prefix=mx.concatenate([chroma_states, text_states], axis=1))


def window_features(melodies: list[np.ndarray], settings: ChromaSettings, time_offset: float | None,
                    window_seconds: float) -> np.ndarray:
    """The chroma (B, frames, num_chroma) of mono melodies (T_i,) at settings.sampling_rate for one window.

    time_offset None (music that fits one window): each melody's first chunk_length seconds, batched as the
    reference batches them. Long form: `window_seconds` of each melody from the window's time offset, wrapped
    round where it ends, as audiocraft re-slices a melody for each window it extends."""
    if time_offset is None:
        return chroma.extract(chroma.batch_melodies(melodies, settings), settings)
    rate = settings.sampling_rate
    return chroma.extract(np.stack([chroma.melody_at(m, time_offset, window_seconds, rate) for m in melodies]),
                          settings)
