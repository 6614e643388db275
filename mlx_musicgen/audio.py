"""Writing audio files: level normalisation and an atomic write (a complete new file or the old one)."""

from __future__ import annotations

import math
import numbers
import os
import warnings
from pathlib import Path
from typing import BinaryIO, NamedTuple

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


MAX_CHANNELS = 8  # more than a music file has (7.1): a header claiming more is refused where a limit is asked for


class AudioHeader(NamedTuple):
    """What a file's header says, before anything is decoded: frames (samples per channel), channels, rate (Hz)."""

    frames: int
    channels: int
    rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.rate if self.rate > 0 else 0.0


def read_header(source: str | Path | BinaryIO) -> AudioHeader:
    """What soundfile.info reads of a path or a seekable binary file (rewound after): nothing is decoded.
    Opened for reading explicitly: soundfile.info takes a file object's own mode, read-write for a temporary
    file, which libsndfile refuses for FLAC. Raises what soundfile raises for a file that is not audio."""
    import soundfile as sf

    try:
        with sf.SoundFile(str(source) if isinstance(source, Path) else source, "r") as f:
            return AudioHeader(int(f.frames), int(f.channels), int(f.samplerate))
    finally:
        if hasattr(source, "seek"):
            source.seek(0)


def frames_allowed(header: AudioHeader, name: str, *, max_seconds: float,
                   max_channels: int = MAX_CHANNELS) -> int:
    """Refuse, from its header alone, audio with an odd rate, too many channels, or longer than `max_seconds`;
    return the most frames that may be decoded of it (what the limit allows: a header may lie). The messages
    are built from numbers only, so that no refused audio is kept alive by an exception."""
    check_rate(header.rate, name)
    if not 1 <= header.channels <= max_channels:
        raise ValueError(f"{name} has {header.channels} channels; at most {max_channels} are read: mix it down to "
                         f"stereo or mono.")
    if header.seconds > max_seconds:
        raise ValueError(f"{name} is {header.seconds:.2f} s long; at most {max_seconds:g} s of it is used here: "
                         f"trim it.")
    return math.floor(max_seconds * header.rate)


def read_audio(path: str | Path, what: str = "audio prompt", *, max_seconds: float | None = None,
               max_channels: int = MAX_CHANNELS) -> tuple[np.ndarray, int]:
    """A wav/flac/ogg file -> ((channels, samples) float32, sampling rate); `what` it is names it in errors.

    With `max_seconds`, its header is checked first (frames_allowed: rate, channels, length) and at most the
    frames allowed are decoded, so that a small file that claims or holds hours of audio (a decompression bomb)
    costs no memory; without it, the whole file is decoded."""
    import soundfile as sf

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist.")
    if not path.is_file():
        raise IsADirectoryError(f"{what} {path} is not a file.")
    frames = -1
    try:
        header = read_header(path)
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e}); use a wav, flac or ogg file.") from None
    if max_seconds is not None:
        frames = frames_allowed(header, f"{what} {path}", max_seconds=max_seconds, max_channels=max_channels) + 1
    try:
        data, rate = sf.read(str(path), frames=frames, dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {path} as audio ({e}); use a wav, flac or ogg file.") from None
    if frames != -1 and len(data) == frames:  # more than its header said, and than allowed
        seconds = len(data) / rate
        del data
        raise ValueError(f"{what} {path} is over {seconds:.2f} s long; at most {max_seconds:g} s of it is used here: "
                         f"trim it.")
    return data.T, int(rate)


def scan_audio(source: str | Path | BinaryIO, header: AudioHeader, max_frames: int, name: str,
               block_frames: int = 2**16) -> int:
    """Decode at most `max_frames` + 1 frames block by block (memory: one block of (block_frames, channels)
    float32, none kept) and refuse what check_prompt refuses: no samples, NaN/inf, silence. Returns the frames
    decoded: more than `max_frames` means the header understated the length."""
    import soundfile as sf

    frames, peak = 0, 0.0
    source = str(source) if isinstance(source, Path) else source
    for block in sf.blocks(source, blocksize=block_frames, frames=max_frames + 1, dtype="float32", always_2d=True):
        frames += len(block)
        block_peak = float(np.max(np.abs(block))) if block.size else 0.0
        peak = block_peak if not math.isfinite(block_peak) else max(peak, block_peak)
        if not math.isfinite(peak):
            break
    block = None  # an exception below keeps this frame alive: not the audio
    if hasattr(source, "seek"):
        source.seek(0)
    # one value stands for the audio: check_prompt judges it by emptiness, finiteness and peak only
    check_prompt(np.full((1, min(frames, 1)), peak, dtype=np.float32), header.rate, name)
    return frames


def check_rate(rate, name: str) -> None:
    """Refuse a sample rate that is not a whole number from MIN_RATE to MAX_RATE."""
    if isinstance(rate, bool) or not isinstance(rate, numbers.Integral) or not MIN_RATE <= rate <= MAX_RATE:
        raise ValueError(
            f"{name} has a sample rate of {rate} Hz; supported are whole numbers from {MIN_RATE} to {MAX_RATE} Hz "
            "(it is resampled to the model's rate): convert it to e.g. 44100 or 48000 Hz."
        )


def check_prompt(samples: np.ndarray, rate, name: str = "the audio prompt") -> None:
    """Refuse audio (a prompt to continue, a melody to follow) that cannot be used: an odd sample rate, no
    samples, NaN/inf, or silence."""
    check_rate(rate, name)
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
