"""What a generation is asked for, checked once at the boundary: texts, settings, audio prompts.

Every check raises a ValueError whose one-line message says what is wrong and what is allowed; notices
(empty texts) are warnings.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import mlx.core as mx
import numpy as np

from . import audio, delay, longform

if TYPE_CHECKING:
    from .generation import GenerationConfig
    from .model import MusicGen

MAX_DURATION = 3600.0  # seconds: longer requests are refused as mistakes (an hour of music is a day on a laptop)
WINDOW_SECONDS = 30.0  # the window of every MusicGen checkpoint (audiocraft's max_duration)
MAX_GUIDANCE = 100.0  # guidance scales above this only amplify logits towards overflow (3 is typical)
PromptInput = str | Path | np.ndarray  # an audio file, or samples


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_sampling(
    *, guidance_scale: float, top_k: int, top_p: float, temperature: float, vocab_size: int | None = None
) -> None:
    """Reject sampling settings that cannot mean anything, with the valid range in the message.
    Without `vocab_size` (before a model is loaded) top_k is checked against 0 only."""
    if not (is_real(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be between 0 and {MAX_GUIDANCE:g} (3 is typical; 1 or less: no "
                         f"guidance), got {guidance_scale}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be a whole number (0: off), got {top_k!r}.")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        upper = f"the vocabulary size {vocab_size}" if vocab_size is not None else "the vocabulary size"
        raise ValueError(f"top_k must be between 0 (off) and {upper}, got {top_k}.")
    if not (is_real(top_p) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be between 0 (off) and 1, got {top_p}.")
    if not (is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")


def check_duration(duration: float) -> None:
    """A duration in seconds must be a number > 0 and at most MAX_DURATION."""
    if not (is_real(duration) and 0 < duration <= MAX_DURATION):
        raise ValueError(f"duration must be a number of seconds above 0 and at most {MAX_DURATION:g} (one hour), "
                         f"got {duration}.")


def check_extend_stride(extend_stride: float, duration: float | None, window_seconds: float = WINDOW_SECONDS) -> None:
    """The stride of long form: a number of seconds above 0 and, when the duration needs more than one window,
    below the window (30 s: what every MusicGen checkpoint is trained on; the model's own is checked again)."""
    if not (is_real(extend_stride) and math.isfinite(extend_stride) and extend_stride > 0):
        raise ValueError(f"extend_stride must be a number of seconds above 0 (18 is typical), got {extend_stride}.")
    if duration is not None and duration > window_seconds and extend_stride >= window_seconds:
        raise ValueError(f"extend_stride must be below the window ({window_seconds:g} s) for music longer than "
                         f"it, got {extend_stride}.")


def check_texts(texts: list[str] | str | None, num_samples: int) -> tuple[list[str] | None, int]:
    """Validate generate's texts and num_samples -> (texts, num_samples). All texts empty or whitespace:
    unconditional music (None), with a warning; some of them: those rows are unconditional, with a warning."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a whole number >= 1, got {num_samples!r}.")
    if texts is None:
        return None, int(num_samples)
    texts = [texts] if isinstance(texts, str) else list(texts)
    if not texts:
        raise ValueError("texts is an empty list: give at least one text, or None for unconditional music.")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be strings (or None for unconditional music).")
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if len(blank) == len(texts):
        warnings.warn("the text is empty: generating unconditional music." if len(texts) == 1 else
                      "all texts are empty: generating unconditional music.", stacklevel=4)
        return None, len(texts)
    if blank:
        warnings.warn(f"text(s) {', '.join(map(str, blank))} are empty: generated unconditionally.", stacklevel=4)
    return texts, len(texts)


def read_audio_inputs(inputs: PromptInput | list[PromptInput], sampling_rate: int | None, default_rate: int,
                      what: str, plural: str) -> list[tuple[str, np.ndarray, int]]:
    """Audio given as a file path or an array ((samples,) or (channels, samples) at `sampling_rate`, by default
    `default_rate`), a list of them, or an array (batch, channels, samples) -> (name, samples, rate) each, named
    for messages ("melody tune.wav", "the melody", "melody 2").

    Refused: an empty list, unreadable files, odd shapes and sample rates, empty, silent or non-finite audio."""
    items = inputs if isinstance(inputs, list) else [inputs]
    if isinstance(inputs, np.ndarray) and inputs.ndim == 3:
        items = list(inputs)
    if not items:
        raise ValueError(f"the list of {plural} is empty.")
    loaded = []
    for i, item in enumerate(items):
        if isinstance(item, (str, Path)):
            name = f"{what} {item}"
            item, rate = audio.read_audio(item, what)
        else:
            name = f"{what} {i + 1}" if len(items) > 1 else f"the {what}"
            rate = default_rate if sampling_rate is None else sampling_rate
        item = np.asarray(item, dtype=np.float32)
        if item.ndim not in (1, 2):
            raise ValueError(f"{name} has shape {item.shape}: give (samples,) or (channels, samples).")
        audio.check_prompt(item, rate, name)
        loaded.append((name, item, rate))
    return loaded


def check_prompt_fits(name: str, seconds: float, window_seconds: float, duration: float | None = None) -> None:
    """A prompt must leave room to continue it: in the model's window, and (given) in the duration."""
    if seconds >= window_seconds:
        raise ValueError(
            f"{name} is {seconds:.2f} s long, but the model's window is {window_seconds:.2f} s and the prompt "
            f"must leave room in it to continue: trim the prompt to its last few seconds (e.g. 10 s)."
        )
    if duration is not None and seconds >= duration:
        raise ValueError(f"duration {duration} s is not longer than {name} ({seconds:.2f} s): ask for more.")


def load_audio_prompts(
    prompts: PromptInput | list[PromptInput], sampling_rate: int | None, *, model_rate: int, channels: int,
    window_seconds: float,
) -> tuple[np.ndarray, list[int]]:
    """Audio prompt(s) (see read_audio_inputs) -> (batch, channels, samples) at the model's rate, left-padded
    with silence to the longest as the reference's processor pads them, and each item's padding in samples.
    A prompt that does not fit in the model's window with room to continue it is refused."""
    loaded = []
    for name, item, rate in read_audio_inputs(prompts, sampling_rate, model_rate, "audio prompt", "audio prompts"):
        check_prompt_fits(name, item.shape[-1] / rate, window_seconds)
        loaded.append(audio.resample(audio.to_channels(item, channels), rate, model_rate))
    longest = max(p.shape[-1] for p in loaded)
    padding = [longest - p.shape[-1] for p in loaded]
    return np.stack([np.pad(p, ((0, 0), (n, 0))) for p, n in zip(loaded, padding)]), padding


def load_melodies(melodies: PromptInput | list[PromptInput], sampling_rate: int | None, *,
                  rate: int) -> list[np.ndarray]:
    """Melody or melodies (see read_audio_inputs; `sampling_rate` by default `rate`) -> mono melodies
    (samples,) at `rate`, the channels averaged. Longer than MAX_DURATION: refused."""
    loaded = []
    for name, item, item_rate in read_audio_inputs(melodies, sampling_rate, rate, "melody", "melodies"):
        if item.shape[-1] / item_rate > MAX_DURATION:
            raise ValueError(f"{name} is {item.shape[-1] / item_rate:.0f} s long; at most {MAX_DURATION:g} s (one "
                             f"hour) is used: trim it.")
        loaded.append(audio.resample(audio.to_channels(item, 1)[0], item_rate, rate))
    return loaded


def trim_padding(audio: np.ndarray, padding: list[int]) -> np.ndarray | list[np.ndarray]:
    """Unequal prompts: strip each item's leading silence, as the reference's processor does."""
    if not any(padding):
        return audio
    return [item[:, pad:] for item, pad in zip(audio, padding)]


@dataclass
class Request:
    """A checked generation request: the texts (None: unconditional), the batch size, the prompt's codes
    (batch, codebooks, frames) and each item's prompt padding in samples, and how long to generate: the
    windows that make it and, when given that way, the number of decoder steps of its one window; with a melody,
    each item's (mono, at the chroma's rate)."""

    texts: list[str] | None
    num_samples: int
    prompt_codes: mx.array | None = None
    padding: tuple[int, ...] = ()
    windows: list[longform.Window] = field(default_factory=list)
    max_new_tokens: int | None = None
    melody: list[np.ndarray] | None = None

    @property
    def prompt_frames(self) -> int:
        return 0 if self.prompt_codes is None else self.prompt_codes.shape[-1]

    @property
    def total_frames(self) -> int:
        """Frames in all, the prompt's included."""
        return self.windows[-1].offset + self.windows[-1].span


def prepare(
    model: MusicGen,
    config: GenerationConfig,
    texts: list[str] | str | None,
    *,
    num_samples: int = 1,
    audio_prompt: PromptInput | list[PromptInput] | None = None,
    audio_prompt_sr: int | None = None,
    prompt_codes: mx.array | np.ndarray | None = None,
    total_frames: int | None = None,
    melody: PromptInput | list[PromptInput] | None = None,
    melody_sr: int | None = None,
) -> Request:
    """Check a generation request, once, before any generation work, and say how long to generate.

    A duration gives round(duration * frame_rate) frames in all, the prompt included; max_new_tokens counts
    decoder steps as the reference does (frames out = prompt frames + steps + 1 - codebooks per channel);
    `total_frames` (codes in, codes out) is a frame count. None of them: one window of the checkpoint's
    max_length positions.

    A melody (melody checkpoints only) is one for every item or one per item; without texts or prompts, a
    list of melodies makes one item each."""
    texts, num_samples = check_texts(texts, num_samples)
    config.check(model.config.decoder.vocab_size)
    melodies = None
    if melody is not None:
        if model.config.melody is None:
            raise ValueError("this model has no melody conditioning: use a melody checkpoint such as "
                             "facebook/musicgen-melody, or leave the melody out.")
        melodies = load_melodies(melody, melody_sr, rate=model.config.melody.features.sampling_rate)
        if texts is None and audio_prompt is None and prompt_codes is None and num_samples == 1:
            num_samples = len(melodies)
    lengths = {"duration": config.duration, "max_new_tokens": config.max_new_tokens, "total_frames": total_frames}
    given = [name for name, value in lengths.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"Give {' or '.join(given)}, not both.")
    if config.duration is not None:
        check_duration(config.duration)
    request = Request(texts, num_samples)
    if audio_prompt is not None:
        window_seconds = model.window_frames / model.frame_rate
        prompt_audio, padding = load_audio_prompts(audio_prompt, audio_prompt_sr, model_rate=model.sampling_rate,
                                                   channels=model.audio_channels, window_seconds=window_seconds)
        if texts is not None and len(texts) != len(prompt_audio):
            raise ValueError(f"{len(texts)} texts for {len(prompt_audio)} audio prompts: give one text per prompt.")
        request = Request(texts, len(prompt_audio), mx.array(model.encode_audio(prompt_audio)), tuple(padding))
    elif prompt_codes is not None:
        if texts is not None and len(texts) != prompt_codes.shape[0]:
            raise ValueError(f"{len(texts)} texts for {prompt_codes.shape[0]} prompts: give one text per prompt.")
        request = Request(texts, prompt_codes.shape[0], mx.array(prompt_codes))
    if melodies is not None:
        if len(melodies) not in (1, request.num_samples):
            raise ValueError(f"{len(melodies)} melodies for {request.num_samples} items: give one melody for all, "
                             f"or one per item.")
        request.melody = melodies * request.num_samples if len(melodies) == 1 else melodies
    prompt_frames, frame_rate, window = request.prompt_frames, model.frame_rate, model.window_frames
    if total_frames is None and config.duration is None:
        steps = config.max_new_tokens
        steps = model.config.max_length - 1 - prompt_frames if steps is None else steps
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
            raise ValueError(f"max_new_tokens must be a whole number of decoder steps, got {steps!r}.")
        if steps < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {steps}.")
        request.max_new_tokens = int(steps)
        frames = delay.frames_out(1 + prompt_frames + steps, model.num_codebooks, model.audio_channels)
        request.windows = [longform.Window(0, prompt_frames, frames)]
        return request
    total = int(total_frames) if total_frames is not None else round(config.duration * frame_rate)
    if total <= prompt_frames:
        asked = f"total_frames {total}" if total_frames is not None else f"duration {config.duration} s"
        raise ValueError(f"{asked} is not longer than the prompt ({prompt_frames} frames, "
                         f"{prompt_frames / frame_rate:.2f} s): ask for more.")
    check_extend_stride(config.extend_stride, total / frame_rate, window / frame_rate)
    stride = longform.stride_frames(config.extend_stride, frame_rate)
    if total > window and stride < 1:
        raise ValueError(f"extend_stride {config.extend_stride} s is less than a frame: give at least "
                         f"{1 / frame_rate:g} s.")
    request.windows = longform.plan_windows(total, window, stride, prompt_frames)
    return request
