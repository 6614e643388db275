"""Writing audio files: level normalisation and an atomic write (a complete new file or the old one)."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path

import numpy as np

from . import atomic

SUBTYPES = {"16": "PCM_16", "24": "PCM_24", "float": "FLOAT"}
FORMATS = {".wav": "WAV", ".flac": "FLAC"}  # what outputs are written as
READABLE_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")  # what prompts, melodies and data are read from
MIN_RATE, MAX_RATE = 8_000, 384_000  # audio-prompt sample rates accepted (and resampled to the model's)
SILENCE = 1e-5  # a prompt whose peak is below this (-100 dBFS) holds nothing to continue


def peak_normalize(audio: np.ndarray, headroom_db: float = 1.0) -> np.ndarray:
    """Scale so the loudest sample sits `headroom_db` below full scale (silence stays silence)."""
    peak = float(np.max(np.abs(audio))) if audio.size else 0.0
    if peak == 0.0:
        return audio
    return audio * (10 ** (-headroom_db / 20) / peak)


NORMALIZATIONS = ("peak", "loudness", "none")
MAX_COMMENT = 2000  # characters libsndfile keeps in a WAV comment; longer metadata lives in the sidecar only


def normalize(audio: np.ndarray, sampling_rate: int, strategy: str = "peak") -> np.ndarray:
    """audiocraft's strategies: 'peak' (to -1 dBFS), 'loudness' (to -14 LUFS, BS.1770), or 'none'."""
    if strategy == "peak":
        return peak_normalize(audio)
    if strategy == "loudness":
        from .loudness import loudness_normalize

        return loudness_normalize(audio, sampling_rate, -14.0)
    if strategy == "none":
        return audio
    raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {strategy!r}.")


def write_audio(
    path: str | Path, audio: np.ndarray, sampling_rate: int, *, bits: str = "16", comment: str | None = None
) -> Path:
    """(channels, samples) float -> a WAV or FLAC file (by extension), renamed into place when complete.
    `comment` goes into the file's metadata (WAV INFO / FLAC Vorbis comment) when it fits."""
    import soundfile as sf

    path = Path(path)
    kind = check_format(path, bits)
    data = np.asarray(audio, dtype=np.float32)
    if not np.isfinite(data).all():
        raise FloatingPointError(
            "the generated audio holds NaN or infinite samples (corrupt weights, or a dtype too narrow: try "
            "float32); nothing was written."
        )
    data = fit_to_format(data, bits).T
    atomic.clean_stale(path)
    tmp = atomic.temp_file(path)
    with atomic.removed_on_error(lambda: tmp.unlink(missing_ok=True), path.parent):
        with sf.SoundFile(str(tmp), "w", sampling_rate, data.shape[1], SUBTYPES[bits], format=kind) as out:
            out.software = "mlx-musicgen"
            if comment is not None and len(comment) <= MAX_COMMENT:
                out.comment = comment
            out.write(data)
        atomic.give_normal_mode(tmp)
        os.replace(tmp, path)
    return path


def fit_to_format(audio: np.ndarray, bits: str) -> np.ndarray:
    """Integer samples end at full scale: clip there, and say so. Float files keep peaks above it."""
    if bits == "float":
        return audio
    if np.abs(audio).max(initial=0.0) > 1.0:
        warnings.warn("peaks above full scale were clipped: use --normalize peak, or --bits float to keep them.")
    return np.clip(audio, -1.0, 1.0)


class ProgressiveWriter:
    """Writes a WAV or FLAC file chunk by chunk, its header brought up to date after every chunk, so the file is
    a valid, playable (shorter) file at every moment while it grows."""

    def __init__(self, path: str | Path, sampling_rate: int, channels: int, bits: str = "16"):
        import soundfile as sf

        self.path = Path(path)
        kind = check_format(self.path, bits)
        self.file = sf.SoundFile(str(self.path), "w", sampling_rate, channels, SUBTYPES[bits], format=kind)

    def write(self, audio: np.ndarray) -> None:
        """(channels, samples) float."""
        with atomic.removed_on_error(lambda: None, self.path.parent):  # the file stays: a valid, shorter WAV
            self.file.write(np.clip(np.asarray(audio, dtype=np.float32), -1.0, 1.0).T)
            self.file.flush()  # libsndfile rewrites the header's sizes on flush

    def close(self) -> None:
        self.file.close()


def check_format(path: Path, bits: str = "16") -> str:
    """The soundfile format for an output path, or a ValueError naming what is wrong."""
    kind = FORMATS.get(Path(path).suffix.lower())
    if kind is None:
        raise ValueError(f"{path}: the output must end in .wav or .flac.")
    if bits not in SUBTYPES:
        raise ValueError(f"bits must be one of {', '.join(SUBTYPES)}, got {bits!r}.")
    if kind == "FLAC" and bits == "float":
        raise ValueError("FLAC holds 16- or 24-bit samples, not float: choose --bits 16 or 24, or a .wav file.")
    return kind


def check_output(path: str | Path, *, overwrite: bool, bits: str = "16") -> Path:
    """Refuse, before any work, an output that could not be written: a wrong extension, an existing file without
    `overwrite`, a folder that is missing, not a folder, or not writable (probed by creating a file there)."""
    path = Path(path)
    check_format(path, bits)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder: give a file name ending in .wav or .flac.")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists: pass --overwrite to replace it, or choose another --output.")
    folder = path.parent
    if not folder.exists():
        raise FileNotFoundError(f"the folder {folder} does not exist: create it or choose another --output.")
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder: choose another --output.")
    try:
        atomic.temp_file(path).unlink()
    except OSError as e:
        raise PermissionError(f"cannot write in the folder {folder} ({e.strerror}): choose another --output.") from None
    return path


def read_audio(path: str | Path, what: str = "audio prompt") -> tuple[np.ndarray, int]:
    """A wav/flac/ogg file -> ((channels, samples) float32, sampling rate); `what` it is names it in errors."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise IsADirectoryError(f"{what} {path} is not a file.")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e}); use a wav, flac or ogg file.") from None
    return data.T, int(rate)


def check_prompt(samples: np.ndarray, rate, name: str = "the audio prompt") -> None:
    """Refuse audio (a prompt to continue, a melody to follow) that cannot be used: an odd sample rate, no
    samples, NaN/inf, or silence."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(
            f"{name} has a sample rate of {rate} Hz; supported are whole numbers from {MIN_RATE} to {MAX_RATE} Hz "
            "(it is resampled to the model's rate): convert it to e.g. 44100 or 48000 Hz."
        )
    samples = np.asarray(samples)
    if samples.size == 0:
        raise ValueError(f"{name} is empty (no samples).")
    if not np.isfinite(samples).all():
        raise ValueError(f"{name} holds NaN or infinite samples.")
    if np.max(np.abs(samples)) < SILENCE:
        raise ValueError(
            f"{name} is silent (its peak is below -100 dBFS): give audio with sound in it, or leave it out."
        )


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


RESAMPLE_QUALITY = "VHQ"  # soxr's 28-bit setting: as fast as its 20-bit HQ here, and finer than float32's 24 bits


def resample(audio: np.ndarray, orig_sr: int, target_sr: int, quality: str = RESAMPLE_QUALITY) -> np.ndarray:
    """Band-limited resampling along the last axis by soxr (libsoxr), float32 in and out.

    Output sample n sits at input position n * orig_sr / target_sr; there are ceil(samples * target_sr / orig_sr)
    of them (soxr alone gives the nearest whole number: a few zeros after the input make up the last one, as
    they are what a band-limited signal holds past its end). At VHQ the passband is flat within 0.01 dB to 0.9 of
    the lower Nyquist, and what lies above the new Nyquist is attenuated by over 150 dB (docs/performance.md).
    """
    import soxr

    if orig_sr == target_sr:
        return audio.astype(np.float32)
    samples = audio.shape[-1]
    out_len = -(-samples * target_sr // orig_sr)  # ceil, in whole numbers
    flat = audio.reshape(-1, samples).astype(np.float32)
    padded = np.pad(flat, ((0, 0), (0, math.ceil(2 * orig_sr / target_sr) + 1)))
    out = soxr.resample(np.ascontiguousarray(padded.T), orig_sr, target_sr, quality=quality)[:out_len]
    return np.ascontiguousarray(out.T).reshape(*audio.shape[:-1], out_len)
