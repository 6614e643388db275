"""What the command-line tools share: one-line errors instead of tracebacks, and a progress bar."""

from __future__ import annotations

import sys
from typing import Callable

from tqdm import tqdm

from .loading import CheckpointError

USER_ERRORS = (CheckpointError, ValueError, FileExistsError, FileNotFoundError, PermissionError, OSError)


def run_main(main: Callable[[], None], debug: bool) -> None:
    """Run a CLI body; a user error becomes one line on stderr and exit code 2 (a traceback with --debug)."""
    try:
        main()
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except USER_ERRORS as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def progress_bar(seconds_of_audio: float, description: str) -> tuple[tqdm, Callable[[int, int], None]]:
    """A bar counted in seconds of audio made, with the rate shown as x real time."""
    bar = tqdm(total=round(seconds_of_audio, 2), unit="s audio", desc=description, dynamic_ncols=True,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.1f} s audio [{elapsed}<{remaining}{postfix}]")

    def update(done: int, total: int) -> None:
        made = round(seconds_of_audio * done / max(total, 1), 2)
        elapsed = bar.format_dict["elapsed"] or 1e-9
        bar.set_postfix_str(f"{made / elapsed:.2f}x real time", refresh=False)
        bar.update(made - bar.n)  # tqdm redraws at most every mininterval

    return bar, update
