"""The settings of a generation (GenerationConfig): the one source of their defaults (per kind of model:
ModelDefaults) and checks for the API, the CLI and the studio, and what the commands offer of them.

Every check raises a ValueError whose one-line message says what is wrong and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from .limits import FAMILIES, MAX_DURATION, MAX_GUIDANCE, SPAN_ARRANGEMENTS, WINDOW_SECONDS

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
