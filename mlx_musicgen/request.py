"""What a generation is asked for, checked once at the boundary: its settings (settings.GenerationConfig), texts,
audio prompts and melodies, and how long to generate (Request).

Every check raises a ValueError whose one-line message says what is wrong and what is allowed; notices
(empty texts) are warnings.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import audio, delay, longform
from .limits import MAX_DURATION
from .settings import GenerationConfig, check_extend_stride, check_steps

PromptInput = str | Path | np.ndarray  # an audio file, or samples

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



@dataclass(frozen=True)
class ModelShape:
    """What checking and planning a request needs to know of the model: its rates, channels, codebooks, window
    (frames) and positions (max_length), vocabulary, and the melody's sampling rate (None: no melody
    conditioning)."""

    sampling_rate: int
    frame_rate: float
    audio_channels: int
    num_codebooks: int
    window_frames: int
    max_length: int
    vocab_size: int
    melody_rate: int | None = None
    family: str = "musicgen"
    magnet_frames: int | None = None  # a MAGNeT model's clip (it makes that, whole, and no more)

    @property
    def window_seconds(self) -> float:
        return self.window_frames / self.frame_rate

    @property
    def kind(self) -> str:
        """Which defaults its generations take (MODEL_DEFAULTS)."""
        return "magnet" if self.magnet_frames is not None else self.family


@dataclass
class Request:
    """A checked generation request: the texts (None: unconditional), the batch size, the prompt's codes
    (batch, codebooks, frames) and each item's prompt padding in samples, and how long to generate: the
    windows that make it and, when given that way, the number of decoder steps of its one window; with a melody,
    each item's (mono, at the chroma's rate)."""

    texts: list[str] | None
    num_samples: int
    prompt_codes: np.ndarray | None = None
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


AudioEncoder = Callable[[np.ndarray], np.ndarray]  # (batch, channels, samples) -> codes (batch, codebooks, frames)


def prepare(
    model: ModelShape,
    encode_audio: AudioEncoder,
    config: GenerationConfig,
    texts: list[str] | str | None,
    *,
    num_samples: int = 1,
    audio_prompt: PromptInput | list[PromptInput] | None = None,
    audio_prompt_sr: int | None = None,
    prompt_codes: np.ndarray | None = None,
    total_frames: int | None = None,
    melody: PromptInput | list[PromptInput] | None = None,
    melody_sr: int | None = None,
) -> Request:
    """Check a generation request, once, before any generation work, and say how long to generate.

    A duration gives round(duration * frame_rate) frames in all, the prompt included; max_new_tokens counts
    decoder steps as the reference does (frames out = prompt frames + steps + 1 - codebooks per channel);
    `total_frames` (codes in, codes out) is a frame count. None of them: the family's duration (AudioGen's 5 s),
    or one window of the checkpoint's max_length positions (MusicGen's), or a MAGNeT model's clip.

    A melody (melody checkpoints only) is one for every item or one per item; without texts or prompts, a
    list of melodies makes one item each."""
    texts, num_samples = check_texts(texts, num_samples)
    config = config.for_model(model.kind, length=total_frames is None)
    config.check(model.vocab_size)  # the model's own window is checked with the length (by_frames)
    check_one_length(config, total_frames)
    melodies = None if melody is None else model_melodies(model, melody, melody_sr)
    if melodies is not None and texts is None and audio_prompt is None and prompt_codes is None \
            and num_samples == 1:
        num_samples = len(melodies)
    num_samples, codes, padding = prompted(model, encode_audio, texts, num_samples, audio_prompt, audio_prompt_sr,
                                           prompt_codes)
    if melodies is not None:
        melodies = melodies_per_item(melodies, num_samples)
    prompt_frames = 0 if codes is None else codes.shape[-1]
    steps = None
    if model.magnet_frames is not None:
        windows = magnet_clip(model, config, total_frames, prompt_frames)
    elif total_frames is None and config.duration is None:
        steps, windows = by_steps(model, config.max_new_tokens, prompt_frames)
    else:
        total = int(total_frames) if total_frames is not None else round(config.duration * model.frame_rate)
        asked = f"total_frames {total}" if total_frames is not None else f"duration {config.duration} s"
        windows = by_frames(model, total, asked, config.extend_stride, prompt_frames)
    return Request(texts, num_samples, codes, padding, windows, steps, melodies)


def check_one_length(config: GenerationConfig, total_frames: int | None) -> None:
    lengths = {"duration": config.duration, "max_new_tokens": config.max_new_tokens, "total_frames": total_frames}
    given = [name for name, value in lengths.items() if value is not None]
    if len(given) > 1:
        raise ValueError(f"Give {' or '.join(given)}, not both.")


def model_melodies(model: ModelShape, melody: PromptInput | list[PromptInput], melody_sr: int | None
                   ) -> list[np.ndarray]:
    if model.melody_rate is None:
        raise ValueError("this model has no melody conditioning: use a melody checkpoint such as "
                         "facebook/musicgen-melody, or leave the melody out.")
    return load_melodies(melody, melody_sr, rate=model.melody_rate)


def melodies_per_item(melodies: list[np.ndarray], items: int) -> list[np.ndarray]:
    if len(melodies) not in (1, items):
        raise ValueError(f"{len(melodies)} melodies for {items} items: give one melody for all, or one per item.")
    return melodies * items if len(melodies) == 1 else melodies


def prompted(model: ModelShape, encode_audio: AudioEncoder, texts: list[str] | None, num_samples: int,
             audio_prompt, audio_prompt_sr: int | None, prompt_codes: np.ndarray | None
             ) -> tuple[int, np.ndarray | None, tuple[int, ...]]:
    """The request's items, its prompt's codes and each item's padding in samples: from an audio prompt
    (encoded), from codes, or none."""
    if audio_prompt is not None:
        prompt_audio, padding = load_audio_prompts(audio_prompt, audio_prompt_sr, model_rate=model.sampling_rate,
                                                   channels=model.audio_channels,
                                                   window_seconds=model.window_seconds)
        if texts is not None and len(texts) != len(prompt_audio):
            raise ValueError(f"{len(texts)} texts for {len(prompt_audio)} audio prompts: give one text per prompt.")
        return len(prompt_audio), encode_audio(prompt_audio), tuple(padding)
    if prompt_codes is not None:
        if texts is not None and len(texts) != prompt_codes.shape[0]:
            raise ValueError(f"{len(texts)} texts for {prompt_codes.shape[0]} prompts: give one text per prompt.")
        return prompt_codes.shape[0], np.asarray(prompt_codes), ()
    return num_samples, None, ()


def magnet_clip(model: ModelShape, config: GenerationConfig, total_frames: int | None, prompt_frames: int
                ) -> list[longform.Window]:
    """A MAGNeT model's one window: its whole clip is made, and cut to a shorter length asked for; a longer one,
    or a length in decoder steps, is refused."""
    clip = model.magnet_frames
    seconds = clip / model.frame_rate
    if config.max_new_tokens is not None:
        raise ValueError(f"a MAGNeT model makes a whole clip in passes, not steps: give a duration (at most "
                         f"{seconds:g} s) instead of max_new_tokens.")
    if config.decoding_steps is not None and len(config.decoding_steps) != model.num_codebooks:
        raise ValueError(f"decoding_steps must give passes for each of the model's {model.num_codebooks} codebooks, "
                         f"got {len(config.decoding_steps)} ({','.join(map(str, config.decoding_steps))}).")
    total = clip if total_frames is None and config.duration is None else (
        int(total_frames) if total_frames is not None else round(config.duration * model.frame_rate))
    check_clip_length(total, clip, model.frame_rate)
    if total <= prompt_frames:
        raise ValueError(f"the length asked for is not longer than the prompt ({prompt_frames / model.frame_rate:.2f} "
                         f"s): ask for more.")
    return [longform.Window(0, prompt_frames, total)]


def check_clip_length(frames: int, clip: int, frame_rate: float) -> None:
    """A MAGNeT model makes its clip of `clip` frames and no more: a longer request is refused."""
    if frames > clip:
        seconds = clip / frame_rate
        raise ValueError(f"this MAGNeT model makes clips of {seconds:g} s, and not longer: ask for at most "
                         f"{seconds:g} s.")


def by_steps(model: ModelShape, steps: int | None, prompt_frames: int) -> tuple[int, list[longform.Window]]:
    """A length in decoder steps (None: the checkpoint's max_length positions) -> the steps and the one window
    they make."""
    steps = model.max_length - 1 - prompt_frames if steps is None else steps
    check_steps(steps)
    frames = delay.frames_out(1 + prompt_frames + steps, model.num_codebooks, model.audio_channels)
    return int(steps), [longform.Window(0, prompt_frames, frames)]


def by_frames(model: ModelShape, total: int, asked: str, extend_stride: float, prompt_frames: int
              ) -> list[longform.Window]:
    """A length of `total` frames in all -> the windows that make it (see longform.plan_windows)."""
    frame_rate, window = model.frame_rate, model.window_frames
    if total <= prompt_frames:
        raise ValueError(f"{asked} is not longer than the prompt ({prompt_frames} frames, "
                         f"{prompt_frames / frame_rate:.2f} s): ask for more.")
    check_extend_stride(extend_stride, total / frame_rate, window / frame_rate)
    stride = longform.stride_frames(extend_stride, frame_rate)
    if total > window and stride < 1:
        raise ValueError(f"extend_stride {extend_stride} s is less than a frame: give at least "
                         f"{1 / frame_rate:g} s.")
    return longform.plan_windows(total, window, stride, prompt_frames)
