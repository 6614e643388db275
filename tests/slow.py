"""Code that a test runs first in a CLI's or the studio's process to make each decoder step take a while, so that
"it is still generating" holds however fast the machine is (tests never race the generation's speed)."""

from __future__ import annotations

from pathlib import Path


def slow_steps(seconds: float) -> str:
    """Python source: every decoder step sleeps `seconds` longer (the sampler is wrapped)."""
    return f"""
import time
from mlx_musicgen import generation
_make_sampler = generation.make_sampler
def _slow_make_sampler(config):
    sampler = _make_sampler(config)
    def slow(logits, key):
        time.sleep({seconds!r})
        return sampler(logits, key)
    return slow
generation.make_sampler = _slow_make_sampler
"""


def runner(code: str, *, script: str | None = None, module: str | None = None) -> str:
    """Python source that runs `code`, then a script (by path) or a module as __main__, with the command line's
    arguments after `python -c SOURCE`."""
    run = f"runpy.run_path({script!r}, run_name='__main__')" if script else \
        f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)"
    argv0 = Path(script).name if script else module
    return f"{code}\nimport runpy, sys\nsys.argv = [{argv0!r}] + sys.argv[1:]\n{run}\n"
