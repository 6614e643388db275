"""Writing audio files: level normalisation and an atomic write (a complete new file or the old one)."""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path

import numpy as np

SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "float": "FLOAT"}


def peak_normalize(audio: np.ndarray, headroom_db: float = 1.0) -> np.ndarray:
    """Scale so the loudest sample sits `headroom_db` below full scale (silence stays silence)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio
    return audio * (10 ** (-headroom_db / 20) / peak)


def write_audio(path: str | Path, audio: np.ndarray, sampling_rate: int, *, bits: str = "16") -> Path:
    """(channels, samples) float -> a WAV or FLAC file (by extension), renamed into place when complete."""
    import soundfile as sf

    path = Path(path)
    kind = {".wav": "WAV", ".flac": "FLAC"}.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: the output must end in .wav or .flac.")
    subtype = SUBTYPES[bits]
    if kind == "FLAC" and subtype == "FLOAT":
        raise ValueError("FLAC holds 16- or 24-bit samples, not float: choose --bits 16 or 24, or a .wav file.")
    data = np.clip(np.asarray(audio, dtype=np.float32).T, -1.0, 1.0)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, data, sampling_rate, subtype=subtype, format=kind)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """A wav/flac/ogg file -> ((channels, samples) float32, sampling rate)."""
    import soundfile as sf

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"audio prompt {path} does not exist.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e}); use a wav, flac or ogg file.") from None
    return data.T, int(rate)


def to_channels(audio: np.ndarray, channels: int) -> np.ndarray:
    """(c, samples) -> (channels, samples): mono is mixed down by averaging, or duplicated up."""
    audio = np.atleast_2d(audio)
    if audio.shape[0] == channels:
        return audio
    if channels == 1:
        return audio.mean(axis=0, keepdims=True)
    if audio.shape[0] == 1:
        return np.repeat(audio, channels, axis=0)
    raise ValueError(f"cannot map audio of {audio.shape[0]} channels to {channels}.")


def resample(audio: np.ndarray, orig_sr: int, target_sr: int, half_width: int = 32) -> np.ndarray:
    """Band-limited resampling along the last axis: a Kaiser-windowed sinc, evaluated polyphase.

    Output sample n sits at input position n * orig_sr / target_sr; it is the sum of the `2 * half_width`
    (scaled by the low-pass ratio when downsampling) nearest inputs weighted by a sinc whose cutoff is the lower
    of the two Nyquist frequencies, so nothing above the new Nyquist folds back.
    """
    if orig_sr == target_sr:
        return audio.astype(np.float32)
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    cutoff = min(1.0, up / down) * 0.97  # just below Nyquist, leaving room for the window's transition band
    width = int(math.ceil(half_width / min(1.0, up / down)))
    offsets = np.arange(-width + 1, width + 1)  # input taps relative to floor(position)

    # One filter per phase (the fractional part of the position), shared by all outputs of that phase.
    phases = np.arange(up)[:, None] / up
    distance = phases - offsets[None, :]
    beta = 8.6
    window = np.i0(beta * np.sqrt(np.clip(1 - (distance / width) ** 2, 0, None))) / np.i0(beta)
    table = (cutoff * np.sinc(cutoff * distance) * window).astype(np.float32)

    samples = audio.shape[-1]
    out_len = int(math.ceil(samples * up / down))
    flat = audio.reshape(-1, samples).astype(np.float32)
    padded = np.pad(flat, ((0, 0), (width, width + 1)))
    out = np.empty((flat.shape[0], out_len), dtype=np.float32)
    for begin in range(0, out_len, 16384):  # in chunks, to bound the gather's memory
        n = np.arange(begin, min(begin + 16384, out_len))
        base = (n * down) // up
        taps = padded[:, base[:, None] + offsets[None, :] + width]  # (rows, chunk, taps)
        out[:, n] = np.einsum("rct,ct->rc", taps, table[(n * down) % up])
    return out.reshape(*audio.shape[:-1], out_len)
