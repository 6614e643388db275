"""Writing audio files: level normalisation and an atomic write (a complete new file or the old one)."""

from __future__ import annotations

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
