"""What the command-line tools share: one-line errors instead of tracebacks, and a progress bar."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import warnings
from typing import Callable

from tqdm import tqdm

from .limits import SPAN_ARRANGEMENTS
from .checkpoint_files import CheckpointError
from .hub import CHECKPOINT_FORMATS
from .model import DTYPES
from .settings import COMMAND_SETTINGS, MODEL_KINDS, GenerationConfig, command_settings

# CheckpointError is a ValueError; OSError covers missing, existing, unwritable files; FloatingPointError is
# NaN/inf in the model's output (sampling.NonFiniteLogitsError, audio.write_audio).
USER_ERRORS = (CheckpointError, ValueError, OSError, FloatingPointError)


class Terminated(KeyboardInterrupt):
    """SIGTERM (plain `kill`), raised like Ctrl-C so that the same clean-up runs on the way out."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def one_line(error: BaseException) -> str:
    """An exception's message on one line (some libraries' messages span several); an OSError made with an
    errno and our own message, without the "[Errno N]" in front."""
    message = str(error)
    if isinstance(error, OSError) and error.strerror and error.filename is None:
        message = error.strerror
    text = " ".join(part.strip() for part in message.splitlines() if part.strip())
    return text or type(error).__name__


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line `warning: ...`, printed above a running progress bar rather than into it."""
    tqdm.write(f"warning: {one_line(message) if isinstance(message, BaseException) else message}", file=sys.stderr)


def run_main(main: Callable[[], None], debug: bool) -> None:
    """Run a CLI body; a user error becomes one line `error: ...` on stderr and exit code 2 (a traceback with
    --debug); Ctrl-C and SIGTERM end it with exit code 130 / 143 after the same clean-up; warnings are one line."""
    signal.signal(signal.SIGTERM, _terminate)
    if not debug:
        warnings.showwarning = _show_warning
    try:
        main()
    except KeyboardInterrupt as e:
        print("error: terminated" if isinstance(e, Terminated) else "error: interrupted", file=sys.stderr)
        sys.exit(143 if isinstance(e, Terminated) else 130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)


KIND_NAMES = {"audiogen": "AudioGen", "magnet": "MAGNeT"}  # the kinds whose defaults differ from MusicGen's
GENERATION_FIELDS = {f.name: f.default for f in dataclasses.fields(GenerationConfig)}


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """--duration, --seed, --guidance-scale, --top-k, --top-p, --temperature, --extend-stride and --greedy, made
    from GenerationConfig's fields (settings.command_settings): their types, help and each kind of model's
    defaults (filled in once the model loads); and MAGNeT's --decoding-steps, --span-arrangement, --max-cfg and
    --min-cfg."""
    defaults = {kind: command_settings(kind) for kind in MODEL_KINDS}
    for name, setting in command_settings(None).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=setting.kind, default=setting.default,
                            help=setting.help + shown_defaults(name, defaults))
    parser.add_argument("--greedy", action="store_true", help="always take the most likely code")
    parser.add_argument("--decoding-steps", type=passes, help="MAGNeT: passes per codebook (default 20,10,10,10)")
    parser.add_argument("--span-arrangement", choices=SPAN_ARRANGEMENTS, default=GENERATION_FIELDS["span_arrangement"],
                        help="MAGNeT: mask non-overlapping spans (default) or overlapping ones (stride1)")
    parser.add_argument("--max-cfg", type=float, default=GENERATION_FIELDS["max_cfg"],
                        help="MAGNeT: guidance when all is masked, annealed to --min-cfg (default 10)")
    parser.add_argument("--min-cfg", type=float, default=GENERATION_FIELDS["min_cfg"],
                        help="MAGNeT: guidance at the end (default 1)")


def shown_defaults(name: str, defaults: dict) -> str:
    """" (default 10; AudioGen 5; MAGNeT its clip)": MusicGen's default, then the kinds' that differ."""
    def shown(value) -> str:
        if value is None:
            return "its clip" if name == "duration" else "none"
        return f"{value:g}"

    music = defaults["musicgen"][name].default
    if music is None:
        return ""
    others = [f"{KIND_NAMES[kind]} {shown(settings[name].default)}" for kind, settings in defaults.items()
              if kind != "musicgen" and settings[name].default != music]
    return f" (default {shown(music)}" + "".join(f"; {other}" for other in others) + ")"


def passes(text: str) -> tuple[int, ...]:
    """--decoding-steps: whole numbers separated by commas."""
    try:
        return tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"give passes per codebook as whole numbers separated by commas, such as "
                                         f"20,10,10,10, not {text!r}") from None


def generation_config(args: argparse.Namespace) -> GenerationConfig:
    """The settings that add_generation_options' options give."""
    return GenerationConfig(do_sample=not args.greedy, decoding_steps=args.decoding_steps,
                            span_arrangement=args.span_arrangement, max_cfg=args.max_cfg, min_cfg=args.min_cfg,
                            **{name: getattr(args, name) for name in COMMAND_SETTINGS})


def add_checkpoint_options(parser: argparse.ArgumentParser) -> None:
    """--checkpoint-format and --text-encoder: which files of a repository to read, and where an audiocraft
    checkpoint's T5 comes from."""
    parser.add_argument("--checkpoint-format", choices=list(CHECKPOINT_FORMATS), default="auto",
                        help="auto (default): transformers' files where a repository has both; audiocraft: its "
                             "state_dict.bin and compression_state_dict.bin")
    parser.add_argument("--text-encoder",
                        help="audiocraft checkpoints: a T5 folder (or Hub id) instead of the one the checkpoint "
                             "names (t5-base, t5-large), which otherwise comes from the Hub or its cache")


def add_dtype_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dtype", choices=list(DTYPES), help="decoder precision when loading an unconverted model")


class Bar(tqdm):
    """tqdm that erases itself when left by an exception, so an error line never follows a half-drawn bar."""

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is not None:
            self.leave = False
        return super().__exit__(exc_type, exc_value, traceback)


def progress_bar(seconds_of_audio: float, description: str, disable: bool = False
                 ) -> tuple[tqdm, Callable[[int, int], None]]:
    """A bar counted in seconds of audio made, with the rate shown as x real time (none when `disable`)."""
    bar = Bar(total=round(seconds_of_audio, 2), unit="s audio", desc=description, dynamic_ncols=True, disable=disable,
              bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}{postfix}]")

    def update(done: int, total: int) -> None:
        made = round(seconds_of_audio * done / max(total, 1), 2)
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(f"{made / elapsed:.2f}x real time", refresh=False)
        bar.update(made - bar.n)  # tqdm redraws at most every mininterval

    return bar, update


class Player:
    """Plays chunks on the default output device as they come (blocking writes keep them in order)."""

    def __init__(self, stream):
        self.stream = stream

    def play(self, audio) -> None:
        """(channels, samples) float."""
        import numpy as np

        self.stream.write(np.ascontiguousarray(np.clip(audio.T, -1, 1), dtype=np.float32))

    def close(self) -> None:
        self.stream.stop()
        self.stream.close()


def player(sampling_rate: int, channels: int) -> Player | None:
    """A Player, or None with a one-line warning when sounddevice or an output device is missing."""
    try:
        import sounddevice
    except (ImportError, OSError):
        warnings.warn("--play needs the sounddevice package (pip install sounddevice); not playing.")
        return None
    try:
        stream = sounddevice.OutputStream(samplerate=sampling_rate, channels=channels, dtype="float32")
        stream.start()
    except Exception as e:  # no device, no permission, no audio server
        warnings.warn(f"no audio output device to play on ({one_line(e)}); not playing.")
        return None
    return Player(stream)
