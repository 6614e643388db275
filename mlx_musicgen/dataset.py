"""A folder of music with captions -> training examples: EnCodec codes of windows of at most the model's
30 s, the T5 states of their captions, and (melody models) their chroma.

Captions: a `.txt` beside each audio file, or a `metadata.jsonl` with `file_name` and `text` (the layout of
Hugging Face `audiofolder` datasets), or one caption for all. The encoding is cached in
FOLDER/.mlx_musicgen_cache/, keyed by each file's content and the model, so a second run starts at once.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import atomic, audio
from .audio import READABLE_SUFFIXES

MIN_SECONDS = 1.0  # shorter windows (and clips) teach nothing: skipped, with a count
CACHE_FOLDER = ".mlx_musicgen_cache"


@dataclass
class Example:
    """One window of a clip: its codes (K, T), its caption and its T5 states (S, d_model) with mask (S,), and
    for melody models its chroma (frames, 12)."""

    name: str
    codes: np.ndarray
    text: str
    text_states: np.ndarray
    text_mask: np.ndarray
    chroma: np.ndarray | None = None


def read_captions(folder: Path, files: list[Path], caption: str | None) -> dict[Path, str]:
    """Each file's caption: metadata.jsonl, else FILE.txt, else `caption`; a file with none is an error."""
    captions: dict[Path, str] = {}
    metadata = folder / "metadata.jsonl"
    if metadata.is_file():
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                captions[(folder / entry["file_name"]).resolve()] = str(entry["text"])
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"{metadata} line {number} is not a JSON object with file_name and text.") from None
    found = {}
    for file in files:
        text = captions.get(file.resolve())
        if text is None and file.with_suffix(".txt").is_file():
            text = file.with_suffix(".txt").read_text(encoding="utf-8").strip()
        if text is None:
            text = caption
        if text is None:
            raise ValueError(f"{file} has no caption: add {file.with_suffix('.txt').name}, a metadata.jsonl line "
                             f"for it, or give --caption for every clip.")
        found[file] = text
    return found


def model_fingerprint(model) -> str:
    """Identifies what the cache holds the output of: the model's EnCodec and T5, its codebooks and channels,
    its window and (melody models) its chroma settings."""
    digest = hashlib.sha256()
    melody = model.config.melody
    digest.update(json.dumps([repr(model.config.text_encoder), repr(model.config.audio_encoder),
                              model.num_codebooks, model.audio_channels, model.window_frames,
                              None if melody is None else repr(melody)]).encode())
    for codebook in model.audio_encoder.quantizer.layers[:2]:
        digest.update(np.array(codebook.embed[:64]).tobytes())
    digest.update(np.array(model.text_encoder.embed_tokens.weight[:64]).tobytes())
    return digest.hexdigest()[:16]


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:24]


def encode_clip(model, samples: np.ndarray, rate: int) -> tuple[list[np.ndarray], list[np.ndarray | None], int]:
    """A clip (channels, samples) -> the codes (K, T) of each window of at most the model's window (shorter
    than MIN_SECONDS: dropped), their chroma for melody models, and how many windows were dropped."""
    samples = audio.resample(audio.to_channels(samples, model.audio_channels), rate, model.sampling_rate)
    window = int(model.shape.window_seconds * model.sampling_rate)
    codes, chroma, dropped = [], [], 0
    for start in range(0, samples.shape[-1], window):
        piece = samples[:, start : start + window]
        if piece.shape[-1] < MIN_SECONDS * model.sampling_rate:
            dropped += 1
            continue
        codes.append(model.encode_audio(piece[None])[0].astype(np.int32))
        if model.config.melody is not None:
            from .chroma import batch_melodies, extract

            settings = model.config.melody.features
            mono = audio.resample(piece.mean(axis=0), model.sampling_rate, settings.sampling_rate)
            chroma.append(extract(batch_melodies([mono], settings), settings)[0])
        else:
            chroma.append(None)
    return codes, chroma, dropped


def text_states(model, text: str) -> tuple[np.ndarray, np.ndarray]:
    """A caption's T5 states (S, d_model) and mask (S,); an empty caption is the null text."""
    tokens = model.tokenizer([text], return_tensors="np")
    mask = tokens["attention_mask"] * (1 if text.strip() else 0)
    states = model.t5(mx.array(tokens["input_ids"]), mx.array(mask))
    return np.array(states[0]), mask[0].astype(np.int32)


def load_examples(model, folder: Path, caption: str | None = None, log=print) -> list[Example]:
    """Every window of every readable audio file under `folder` (unreadable files and short windows are skipped
    and counted), encoded once and cached."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ValueError(f"the data folder {folder} does not exist.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in READABLE_SUFFIXES and p.is_file()
                   and CACHE_FOLDER not in p.parts)
    if not files:
        raise ValueError(f"{folder} holds no audio files ({', '.join(READABLE_SUFFIXES)}).")
    captions = read_captions(folder, files, caption)
    cache = folder / CACHE_FOLDER / model_fingerprint(model)
    cache.mkdir(parents=True, exist_ok=True)
    examples, unreadable, short, cached = [], 0, 0, 0
    texts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for file in files:
        entry = cache / f"{file_digest(file)}.npz"
        if entry.is_file():
            stored = np.load(entry)
            codes = [stored[f"codes{i}"] for i in range(int(stored["windows"]))]
            chroma = [stored[f"chroma{i}"] if f"chroma{i}" in stored else None for i in range(len(codes))]
            dropped = int(stored["dropped"])
            cached += 1
        else:
            try:
                samples, rate = audio.read_audio(file, "audio file")
                audio.check_prompt(samples, rate, f"audio file {file}")
            except (OSError, ValueError) as e:
                warnings.warn(f"skipped {file}: {e}", stacklevel=2)
                unreadable += 1
                continue
            codes, chroma, dropped = encode_clip(model, samples, rate)
            arrays = {f"codes{i}": c for i, c in enumerate(codes)}
            arrays.update({f"chroma{i}": c for i, c in enumerate(chroma) if c is not None})
            write_npz(entry, windows=len(codes), dropped=dropped, **arrays)
        short += dropped
        text = captions[file]
        if text not in texts:
            texts[text] = text_states(model, text)
        for i, (window_codes, window_chroma) in enumerate(zip(codes, chroma)):
            examples.append(Example(f"{file.relative_to(folder)}#{i}", window_codes, text, *texts[text],
                                    window_chroma))
    log(f"data: {len(examples)} windows from {len(files) - unreadable} files ({cached} from the cache); skipped: "
        f"{unreadable} unreadable file(s), {short} window(s) under {MIN_SECONDS:g} s")
    if not examples:
        raise ValueError(f"no clip in {folder} is {MIN_SECONDS:g} s or longer (and readable): nothing to train on.")
    return examples


def write_npz(path: Path, **arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    atomic.write_bytes(path, buffer.getvalue())


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded shuffle cut into training and validation examples (at least one of each when asked and possible)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    count = int(round(val_fraction * len(examples)))
    if val_fraction > 0 and len(examples) > 1:
        count = min(max(count, 1), len(examples) - 1)
    else:
        count = 0
    val = [examples[i] for i in order[:count]]
    train = [examples[i] for i in order[count:]]
    return train, val
