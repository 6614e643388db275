"""What a generation is asked for, checked once at the boundary: the settings (GenerationConfig, the one source of
their defaults and checks for the API, the CLI and the studio), texts, audio prompts and melodies, and how long
to generate (Request).

Every check raises a ValueError whose one-line message says what is wrong and what is allowed; notices
(empty texts) are warnings.
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from . import audio, delay, longform
from .limits import FAMILIES, MAX_DURATION, MAX_GUIDANCE, SPAN_ARRANGEMENTS, WINDOW_SECONDS

PromptInput = str | Path | np.ndarray  # an audio file, or samples
COMMAND_DURATION = 10.0  # seconds: the commands' (CLI, studio) default length of music; the API's is one window


@dataclass(frozen=True)
class ModelDefaults:
    """What a kind of model's generations take where the request leaves the choice to the model: the API's
    duration (None: one window, a MAGNeT model's clip), the commands' (CLI, studio; None: the same), the long
    form's stride (None: no long form), and sampling."""

    duration: float | None
    command_duration: float | None
    extend_stride: float | None
    top_k: int
    top_p: float
    temperature: float


MODEL_DEFAULTS = {
    # transformers' sampling, audiocraft's stride
    "musicgen": ModelDefaults(None, COMMAND_DURATION, 18.0, 250, 0.0, 1.0),
    "audiogen": ModelDefaults(5.0, 5.0, 2.0, 250, 0.0, 1.0),  # audiocraft's AudioGen
    "magnet": ModelDefaults(None, None, None, 0, 0.9, 3.0),  # audiocraft's MAGNeT: its clip, annealed sampling
}
MODEL_KINDS = tuple(MODEL_DEFAULTS)  # the families (limits.FAMILIES) and MAGNeT, whose decoding differs
assert set(FAMILIES) <= set(MODEL_KINDS)
MAGNET_STEPS = (20, 10, 10, 10)  # audiocraft's MAGNeT: passes per codebook


def is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)


def check_sampling(
    *, guidance_scale: float, top_k: int | None, top_p: float | None, temperature: float | None,
    vocab_size: int | None = None
) -> None:
    """Reject sampling settings that cannot mean anything, with the valid range in the message (None: the
    model's default, not checked). Without `vocab_size` (before a model is loaded) top_k is checked against 0
    only."""
    check_guidance("guidance_scale", guidance_scale)
    if top_k is not None:
        if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
            raise ValueError(f"top_k must be a whole number (0: off), got {top_k!r}.")
        if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
            upper = f"the vocabulary size {vocab_size}" if vocab_size is not None else "the vocabulary size"
            raise ValueError(f"top_k must be between 0 (off) and {upper}, got {top_k}.")
    if top_p is not None and not (is_real(top_p) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be between 0 (off) and 1, got {top_p}.")
    if temperature is not None and not (is_real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")


def check_guidance(name: str, scale: float, typical: float = 3) -> None:
    if not (is_real(scale) and 0 <= scale <= MAX_GUIDANCE):
        raise ValueError(f"{name} must be between 0 and {MAX_GUIDANCE:g} ({typical:g} is typical; 1 or less: no "
                         f"guidance), got {scale}.")


def check_magnet(config) -> None:
    """MAGNeT's settings: passes per codebook (whole numbers from 1 to 1000), the span arrangement, and the
    guidance it anneals between."""
    steps = config.decoding_steps
    if steps is not None and not (isinstance(steps, (tuple, list)) and 0 < len(steps) <= 64 and all(
            isinstance(n, (int, np.integer)) and not isinstance(n, bool) and 1 <= n <= 1000 for n in steps)):
        raise ValueError(f"decoding_steps must be passes per codebook, each a whole number from 1 to 1000 (20,10,10,10 "
                         f"is typical), got {steps!r}.")
    if config.span_arrangement not in SPAN_ARRANGEMENTS:
        raise ValueError(f"span_arrangement must be {' or '.join(SPAN_ARRANGEMENTS)}, got {config.span_arrangement!r}.")
    check_guidance("max_cfg", config.max_cfg, typical=10)
    check_guidance("min_cfg", config.min_cfg, typical=1)


def check_duration(duration: float) -> None:
    """A duration in seconds must be a number > 0 and at most MAX_DURATION."""
    if not (is_real(duration) and 0 < duration <= MAX_DURATION):
        raise ValueError(f"duration must be a number of seconds above 0 and at most {MAX_DURATION:g} (one hour), "
                         f"got {duration}.")


def check_extend_stride(extend_stride: float, duration: float | None, window_seconds: float = WINDOW_SECONDS) -> None:
    """The stride of long form: a number of seconds above 0 and, when the duration needs more than one window,
    below the window (30 s: what every MusicGen checkpoint is trained on; the model's own is checked again)."""
    if not (is_real(extend_stride) and math.isfinite(extend_stride) and extend_stride > 0):
        raise ValueError(f"extend_stride must be a number of seconds above 0 (18 is typical for MusicGen, 2 for "
                         f"AudioGen), got {extend_stride}.")
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


def check_seed(seed) -> None:
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, got {seed!r}.")


def check_steps(steps) -> None:
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)):
        raise ValueError(f"max_new_tokens must be a whole number of decoder steps, got {steps!r}.")
    if steps < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {steps}.")


def setting(default, help: str):
    """A GenerationConfig field with the help text that the CLI's options and the studio's schema show."""
    return field(default=default, metadata={"help": help})


@dataclass
class GenerationConfig:
    """The sampling and length settings of a generation, with their defaults and checks: the API's keywords,
    the CLI's options and the studio's job fields are all made from these fields.

    duration: seconds of audio in all, the prompt included (round(duration * frame_rate) frames); one window
        up to the model's (MusicGen's 30 s, AudioGen's 10 s), beyond it audiocraft's windows, each continuing the
        last (window - extend_stride) s.
    max_new_tokens: decoder steps, as the reference counts them (give this or duration; neither: MusicGen makes
        one window, as transformers does, AudioGen 5 s, as audiocraft does).
    do_sample / temperature / top_k / top_p: sampling (greedy when do_sample is False or temperature is 0).
    guidance_scale: classifier-free guidance; 1 or less is none. seed: the same seed gives the same audio.
    """

    duration: float | None = setting(None, "seconds of audio in all, an audio prompt included")
    max_new_tokens: int | None = setting(None, "decoder steps, as transformers counts them (instead of duration)")
    do_sample: bool = setting(True, "sample (False: always take the most likely code)")
    guidance_scale: float = setting(3.0, "classifier-free guidance (1 or less: none; MAGNeT anneals from "
                                         "max_cfg to min_cfg instead)")
    top_k: int | None = setting(None, "sample from the k most likely codes (0: off)")
    top_p: float | None = setting(None, "nucleus sampling threshold (0: off)")
    temperature: float | None = setting(None, "sampling temperature (0: greedy)")
    seed: int | None = setting(None, "the same seed gives the same music")
    extend_stride: float | None = setting(None, "beyond the model's window, seconds each next window moves on")
    # MAGNeT's own (the model's defaults are audiocraft's)
    decoding_steps: tuple[int, ...] | None = setting(None, "MAGNeT: passes per codebook")
    span_arrangement: str = setting("nonoverlap", "MAGNeT: masking by non-overlapping spans, or stride1")
    max_cfg: float = setting(10.0, "MAGNeT: guidance when all is masked, annealed to min_cfg")
    min_cfg: float = setting(1.0, "MAGNeT: guidance when nothing is masked")

    @classmethod
    def with_settings(cls, config: GenerationConfig | None, settings: dict) -> GenerationConfig:
        """`config` (or the defaults) with keyword settings applied over it; a length given as a keyword
        (duration or max_new_tokens) replaces the config's length of either kind."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        lengths = {"duration", "max_new_tokens"}
        if config is not None and any(settings.get(name) is not None for name in lengths):
            settings = {**{name: None for name in lengths}, **settings}
        return dataclasses.replace(config or cls(), **settings)

    def for_model(self, kind: str, command: bool = False, length: bool = True,
                  window_seconds: float | None = None) -> GenerationConfig:
        """These settings with the defaults of the model's kind (MODEL_DEFAULTS: "musicgen", "audiogen" or
        "magnet") where they leave the choice to the model: sampling, the stride, MAGNeT's passes, and
        (`length`) the duration when no length is given (the commands' with `command`, where a default of one
        window is `window_seconds`, a MAGNeT model's clip)."""
        defaults = MODEL_DEFAULTS[kind]
        changes = {name: getattr(defaults, name) for name in ("top_k", "top_p", "temperature", "extend_stride")
                   if getattr(self, name) is None}
        if self.decoding_steps is None and kind == "magnet":
            changes["decoding_steps"] = MAGNET_STEPS
        if length and self.duration is None and self.max_new_tokens is None:
            changes["duration"] = defaults.command_duration if command else defaults.duration
            if command and changes["duration"] is None:
                changes["duration"] = window_seconds
        return dataclasses.replace(self, **changes)

    def check(self, vocab_size: int | None = None, window_seconds: float = WINDOW_SECONDS) -> None:
        """Every setting in its range (top_k against `vocab_size` when the model is known): what can be checked
        before a model loads is checked here, once, for the API, the CLI and the studio alike."""
        check_sampling(guidance_scale=self.guidance_scale, top_k=self.top_k, top_p=self.top_p,
                       temperature=self.temperature, vocab_size=vocab_size)
        check_magnet(self)
        if self.duration is not None and self.max_new_tokens is not None:
            raise ValueError("Give duration or max_new_tokens, not both.")
        if self.duration is not None:
            check_duration(self.duration)
        if self.max_new_tokens is not None:
            check_steps(self.max_new_tokens)
        if self.extend_stride is not None:
            check_extend_stride(self.extend_stride, self.duration, window_seconds)
        check_seed(self.seed)


# GenerationConfig's fields that the commands (CLI options, studio fields) offer; do_sample is the CLI's --greedy
COMMAND_SETTINGS = ("duration", "seed", "guidance_scale", "top_k", "top_p", "temperature", "extend_stride")


class Setting(NamedTuple):
    kind: type  # int or float
    default: object
    help: str


def command_settings(kind: str | None = "musicgen") -> dict[str, Setting]:
    """The type, default and help of each setting the commands offer, from GenerationConfig's fields, the
    defaults those of the model's kind (MODEL_DEFAULTS; None: not yet known, left to the model)."""
    fields = {f.name: f for f in dataclasses.fields(GenerationConfig)}
    hints = typing.get_type_hints(GenerationConfig)
    defaults = None if kind is None else MODEL_DEFAULTS[kind]
    settings = {}
    for name in COMMAND_SETTINGS:
        type_ = next(k for k in typing.get_args(hints[name]) or (hints[name],) if k is not type(None))
        default = fields[name].default
        if defaults is not None and hasattr(defaults, name):
            default = defaults.command_duration if name == "duration" else getattr(defaults, name)
        settings[name] = Setting(type_, default, fields[name].metadata["help"])
    return settings


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
