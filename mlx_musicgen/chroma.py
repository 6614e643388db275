"""Chroma features of a melody, as MusicGen-Melody is conditioned on them (transformers'
MusicgenMelodyFeatureExtractor; audiocraft's ChromaExtractor, without its Demucs stem separation).

A power spectrogram (STFT of n_fft samples every hop, periodic Hann window, centred with reflect padding,
divided by sqrt(sum(window^2))) is folded onto the 12 pitch classes by librosa's chroma filter bank, each
frame is scaled by its largest class, and only that class is kept: a one-hot (frames, 12), C first.
Everything here is numpy and pure. Written here rather than taken from librosa: the one-hot must equal the
reference extractor's frame for frame (a near-tie decides a class), and librosa's chroma_stft pads, normalises
and tunes differently; only its filter bank is rebuilt, equal to it to 1e-12.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np


@dataclass
class ChromaSettings:
    """The checkpoint's preprocessor_config.json: rate of the audio the features are computed at, STFT size and
    hop, the longest melody used in one window (seconds) and the number of pitch classes."""

    sampling_rate: int = 32000
    n_fft: int = 16384
    hop_length: int = 4096
    chunk_length: int = 30
    num_chroma: int = 12

    @classmethod
    def from_dict(cls, d: dict) -> ChromaSettings:
        names = {f.name for f in fields(cls)} - {"num_chroma"}
        return cls(**{name: d[name] for name in names if name in d}, num_chroma=d.get("feature_size", 12))

    @property
    def max_samples(self) -> int:
        return self.chunk_length * self.sampling_rate

    def check(self) -> None:
        """Raise ValueError for settings that make no features (types are the loader's to check)."""
        if self.n_fft % 2 or self.n_fft > 2**20:
            raise ValueError(f"n_fft must be even and at most 2**20, got {self.n_fft}")
        if self.hop_length > self.n_fft:
            raise ValueError(f"hop_length {self.hop_length} is longer than n_fft {self.n_fft}")
        if self.chunk_length > 3600 or self.sampling_rate > 384_000:
            raise ValueError(f"chunk_length {self.chunk_length} s at {self.sampling_rate} Hz is beyond an hour at "
                             f"384 kHz")


def filter_bank(num_chroma: int, n_fft: int, sampling_rate: int) -> np.ndarray:
    """librosa's chroma filters (tuning 0, C first), (num_chroma, n_fft // 2 + 1) float64: each FFT bin's pitch in
    chroma bins (octaves above A440/16 times num_chroma) spreads over the classes as a Gaussian as wide as the
    bin, each bin's column has unit L2 norm, and bins are weighted by a Gaussian over octaves centred on 5
    (about 900 Hz) with half-width 2."""
    frequencies = np.linspace(0, sampling_rate, n_fft, endpoint=False)[1:]
    pitch = num_chroma * np.log2(frequencies / (440.0 / 16))
    pitch = np.concatenate([[pitch[0] - 1.5 * num_chroma], pitch])  # DC: 1.5 octaves below the first bin
    width = np.concatenate([np.maximum(np.diff(pitch), 1.0), [1.0]])
    half = np.round(num_chroma / 2)
    # each bin's distance to each class, wrapped into [-num_chroma / 2, num_chroma / 2)
    distance = np.remainder(pitch[None, :] - np.arange(num_chroma)[:, None] + half + 10 * num_chroma,
                            num_chroma) - half
    filters = np.exp(-0.5 * (2 * distance / width[None, :]) ** 2)
    filters /= np.sqrt(np.sum(filters**2, axis=0, keepdims=True))
    filters *= np.exp(-0.5 * ((pitch / num_chroma - 5.0) / 2.0) ** 2)[None, :]
    filters = np.roll(filters, -3 * (num_chroma // 12), axis=0)  # A first -> C first
    return np.ascontiguousarray(filters[:, : n_fft // 2 + 1])


def power_spectrogram(wav: np.ndarray, n_fft: int, hop_length: int) -> np.ndarray:
    """wav (B, T) -> |STFT|^2 / sum(window^2), (B, 1 + T // hop, n_fft // 2 + 1) float64: periodic Hann, frames
    centred (reflect padding of n_fft // 2 either side)."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    padded = np.pad(wav.astype(np.float64), ((0, 0), (n_fft // 2, n_fft // 2)), mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft, axis=-1)[:, ::hop_length]
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return (spectrum.real**2 + spectrum.imag**2) / np.sum(window**2)


def chroma_energy(wav: np.ndarray, settings: ChromaSettings) -> np.ndarray:
    """Mono melodies (B, T) at settings.sampling_rate -> the energy of each pitch class, scaled by each frame's
    largest, (B, 1 + max(T, n_fft) // hop, num_chroma) float64. Shorter than n_fft: zero-padded on both sides
    first, as the reference pads it."""
    n_fft = settings.n_fft
    if wav.shape[-1] < n_fft:
        pad = n_fft - wav.shape[-1]
        wav = np.pad(wav, ((0, 0), (pad // 2, pad - pad // 2)))
    filters = filter_bank(settings.num_chroma, n_fft, settings.sampling_rate).astype(np.float32)  # as the reference's
    raw = power_spectrogram(wav, n_fft, settings.hop_length) @ filters.T.astype(np.float64)
    return raw / np.maximum(np.max(np.abs(raw), axis=-1, keepdims=True), 1e-6)


def extract(wav: np.ndarray, settings: ChromaSettings) -> np.ndarray:
    """Mono melodies (B, T) -> one-hot chroma (B, frames, num_chroma) float32: each frame's strongest pitch class
    (bin 0, C, for silence)."""
    return np.eye(settings.num_chroma, dtype=np.float32)[np.argmax(chroma_energy(wav, settings), axis=-1)]


def batch_melodies(melodies: list[np.ndarray], settings: ChromaSettings) -> np.ndarray:
    """Mono melodies (T_i,) -> (B, T): each cut to its first settings.chunk_length seconds, right-padded with
    silence to the longest, as the reference's extractor batches them."""
    cut = [m[: settings.max_samples] for m in melodies]
    longest = max(len(m) for m in cut)
    return np.stack([np.pad(m, (0, longest - len(m))) for m in cut]).astype(np.float32)


def melody_at(melody: np.ndarray, time_offset: float, seconds: float, sampling_rate: int) -> np.ndarray:
    """The `seconds` of a mono melody (T,) from `time_offset` seconds on, wrapped round to its start where it
    ends: audiocraft's melody for a long-form window (its sample arithmetic, int(seconds * rate) samples)."""
    start = int(time_offset * sampling_rate)
    return melody[np.arange(start, start + int(seconds * sampling_rate)) % len(melody)]
