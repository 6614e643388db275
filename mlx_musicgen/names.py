"""Tensor names mapped between checkpoint layouts by regular expressions, as (pattern, replacement) pairs."""

from __future__ import annotations

import re

Patterns = tuple[tuple[re.Pattern, str], ...]


def compile_names(pairs) -> Patterns:
    """(pattern text, replacement) pairs -> compiled, for `renamed`."""
    return tuple((re.compile(pattern), replacement) for pattern, replacement in pairs)


def renamed(weights: dict, names: Patterns) -> dict:
    """Each tensor renamed by the first pattern of `names` that matches its whole name; others pass through
    unchanged, for strict loading to report."""
    out = {}
    for key, value in weights.items():
        for pattern, replacement in names:
            if match := pattern.fullmatch(key):
                key = match.expand(replacement)
                break
        out[key] = value
    return out
