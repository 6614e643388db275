"""What a studio job asks for. The generation settings are the core's GenerationConfig, the one source of their
types, defaults, help and checks: the request's schema (JobRequest, JobForm: pydantic models made from its
fields) and the job's settings (JobSettings: a GenerationConfig and the studio's own fields) are both made from
it, and a job is checked by GenerationConfig.check(), as generate.py checks its options."""

from __future__ import annotations

import reprlib
import unicodedata
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import ConfigDict, Field, create_model

from ..request import check_clip_length
from ..settings import COMMAND_SETTINGS, GenerationConfig, command_settings, is_real
from .takes import FORMATS

UPLOADS = ("audio_prompt", "melody")
DEFAULT_FORMAT = FORMATS[0]  # wav
MAX_TEXT = 2000  # characters: T5 reads at most 512 tokens
MAX_QUOTED = 80  # characters of a bad value that a message shows
MAX_WHOLE = 2**63  # whole numbers at or past it are refused: no setting means anything there (a seed is below it)
TEXT_SPACE = "\t\n\v\f\r\x85"  # the control characters a text may hold: the whitespace ones (Unicode's)


GENERATION = command_settings()  # the settings a job may set, as the CLI's options offer them

# The request body, as JSON: the studio's text and format around the offered settings (what OpenAPI shows).
JobRequest = create_model(
    "JobRequest",
    __config__=ConfigDict(extra="forbid"),
    text=(str | None, Field(None, description="what the music should be; empty or absent: unconditional")),
    **{name: (s.kind if s.default is not None else s.kind | None, Field(s.default, description=s.help))
       for name, s in GENERATION.items()},
    format=(Literal[FORMATS], Field(DEFAULT_FORMAT, description="the take's file: wav (32-bit float) or flac "
                                                                "(24-bit)")),
)
# ... and as a multipart form, which may carry the uploads too.
JobForm = create_model(
    "JobForm",
    __base__=JobRequest,
    audio_prompt=(bytes, Field(None, description="audio to continue")),
    melody=(bytes, Field(None, description="a tune to follow (melody models)")),
)
KNOWN = tuple(JobForm.model_fields)


def command_config(kind: str = "musicgen", window_seconds: float | None = None, **settings) -> GenerationConfig:
    """A GenerationConfig with the commands' defaults for the model's kind (settings.MODEL_DEFAULTS), the window
    (`window_seconds`: a MAGNeT model's clip) where the kind's default length is one window."""
    return GenerationConfig(**settings).for_model(kind, command=True, window_seconds=window_seconds)


@dataclass
class JobSettings:
    """What a job asks for: its generation settings (a GenerationConfig), its text and format; uploaded files
    are kept under the output folder and named by their path relative to it. As JSON (`as_dict`, the API's
    and the queue's files'), one flat object of JobForm's fields."""

    config: GenerationConfig = field(default_factory=command_config)
    text: str | None = None
    format: str = DEFAULT_FORMAT
    audio_prompt: str | None = None
    melody: str | None = None

    @classmethod
    def from_fields(cls, fields: dict, model_info: dict | None = None) -> JobSettings:
        """Form or JSON fields -> settings, numbers parsed and checked (ValueError: the CLI's message), against
        the model too when its info is given."""
        uploads = sorted(set(UPLOADS) & set(fields))
        if uploads:
            raise ValueError(f"{' and '.join(uploads)}: send the audio as a file, in a multipart form.")
        unknown = sorted(set(fields) - set(KNOWN))
        if unknown:
            raise ValueError(f"unknown field(s) {shortened(', '.join(unknown))}; known: {', '.join(sorted(KNOWN))}.")
        numbers, texts = {}, {}
        for name, value in fields.items():
            if name in GENERATION and value is not None and value != "":
                numbers[name] = parse_number(name, value, GENERATION[name].kind)
            elif name in ("text", "format") and value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be text, got {quoted(value)}.")
                texts[name] = value
        info = model_info or {}
        settings = cls(command_config(info.get("kind", "musicgen"), info.get("window_seconds"), **numbers), **texts)
        settings.check(model_info)
        return settings

    @classmethod
    def from_dict(cls, values: dict) -> JobSettings:
        """`as_dict`'s object back (TypeError for anything else); not checked again."""
        if not isinstance(values, dict):
            raise TypeError(f"settings must be an object, got {quoted(values)}.")
        values = dict(values)
        generation = {name: values.pop(name) for name in COMMAND_SETTINGS if name in values}
        return cls(command_config(**generation), **values)

    def as_dict(self) -> dict:
        generation = {name: getattr(self.config, name) for name in COMMAND_SETTINGS}
        return {"text": self.text, **generation, "format": self.format,
                "audio_prompt": self.audio_prompt, "melody": self.melody}

    def check(self, model_info: dict | None = None) -> None:
        """The studio's own checks, then GenerationConfig.check() as generate.py makes it before it loads a
        model; with the model's info, again against its vocabulary and window."""
        if self.text is not None:
            check_text(self.text)
        if self.format not in FORMATS:
            raise ValueError(f"format must be wav or flac, got {quoted(self.format)}.")
        self.config.check()
        if model_info is not None:
            self.config.check(model_info["vocab_size"], model_info["window_seconds"])
            check_frames(self.config, model_info["frame_rate"])
            if model_info.get("kind") == "magnet" and self.config.duration is not None:  # at submit, not at run
                rate = model_info["frame_rate"]
                check_clip_length(round(self.config.duration * rate), round(model_info["window_seconds"] * rate),
                                  rate)


def check_text(text: str) -> None:
    """A job's text: at most MAX_TEXT characters, encodable as UTF-8 (no lone surrogate, which JSON can carry
    but no answer or tokenizer can), and no control characters but whitespace (TEXT_SPACE)."""
    if len(text) > MAX_TEXT:
        raise ValueError(f"text is {len(text)} characters long; at most {MAX_TEXT}.")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"text holds a lone surrogate {text[e.start]!r} at character {e.start}: send it as UTF-8 "
                         f"text.") from None
    bad = next((i for i, c in enumerate(text) if unicodedata.category(c) == "Cc" and c not in TEXT_SPACE), None)
    if bad is not None:
        raise ValueError(f"text holds the control character {text[bad]!r} at character {bad}: remove it.")


def parse_number(name: str, value, kind: type):
    """A form's text or a JSON number -> int or float; anything else is refused with the field's name."""
    want = "a whole number" if kind is int else "a number"
    try:
        number = kind(value) if isinstance(value, str) else value
        if kind is int and isinstance(number, float) and number.is_integer():
            number = int(number)
        if not is_real(number) or (kind is int and not isinstance(number, (int, np.integer))):
            raise ValueError
        parsed = kind(number)  # as the CLI's argparse types make them: -1 and "-1" are both -1.0 for a duration
    except (ValueError, OverflowError):  # not a number, or one past a double
        raise ValueError(f"{name} must be {want}, got {quoted(value)}.") from None
    if kind is int and abs(parsed) >= MAX_WHOLE:  # its checks' messages would show all its digits
        raise ValueError(f"{name} must be {want} below 2**63, got {quoted(value)}.")
    return parsed


def check_frames(config: GenerationConfig, frame_rate: float) -> None:
    """Refuse, at submit, a duration that makes no frame (round(duration * frame_rate) is 0) and a long-form
    stride of less than a frame (the model would refuse both only when the job runs)."""
    if config.duration is not None and round(config.duration * frame_rate) < 1:
        raise ValueError(f"duration {config.duration:g} s makes no audio (a frame is {1 / frame_rate:g} s): "
                         f"ask for at least {1 / frame_rate:g} s.")
    if config.extend_stride is not None and int(config.extend_stride * frame_rate) < 1:
        raise ValueError(f"extend_stride {config.extend_stride:g} s is less than a frame: give at least "
                         f"{1 / frame_rate:g} s.")


# reprlib abbreviates big and deep values as it goes: showing one costs little, whatever its size or depth
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxlong, _REPR.maxother = 3, MAX_QUOTED, MAX_QUOTED, MAX_QUOTED


def quoted(value, limit: int = MAX_QUOTED) -> str:
    """A value as a message shows it: its repr, at most `limit` characters ('...' where cut)."""
    try:
        text = _REPR.repr(value)
    except Exception:  # e.g. an int past Python's 4300 printable digits
        text = f"<{type(value).__name__}>"
    return shortened(text, limit)


def shortened(text: str, limit: int = MAX_QUOTED) -> str:
    """Text of at most `limit` characters, '...' ending it where cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
