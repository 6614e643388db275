"""Music longer than the model's window, by audiocraft's extension: each next window continues the last
(window - stride) frames of the codes so far, and only its new frames are kept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx


@dataclass(frozen=True)
class Window:
    """One generation window: its first frame in the whole output, the frames it continues (the audio prompt's,
    or the previous window's last ones) and the frames it holds in all, those included."""

    offset: int
    known: int
    span: int


def plan_windows(total_frames: int, window_frames: int, stride: int, prompt_frames: int = 0) -> list[Window]:
    """The windows that make `total_frames` frames, the first continuing `prompt_frames` of prompt."""
    if total_frames > window_frames and not 0 < stride < window_frames - prompt_frames:
        raise ValueError(f"the stride must be between 0 and {window_frames - prompt_frames} frames, got {stride}.")
    windows, offset, known = [], 0, prompt_frames
    while offset + known < total_frames:
        span = min(total_frames - offset, window_frames)
        windows.append(Window(offset, known, span))
        offset, known = offset + stride, span - stride
    return windows


WindowGenerator = Callable[[int, "mx.array | None", Window], Iterator[mx.array]]


def extend(generate: WindowGenerator, windows: list[Window], prompt_codes: mx.array | None) -> Iterator[mx.array]:
    """Codes (B, K, n) in order: the prompt's, then each window's new frames as `generate(index, context,
    window)` yields them, where context is what the window continues (B, K, window.known)."""
    context = prompt_codes
    if prompt_codes is not None:
        yield prompt_codes
    for index, window in enumerate(windows):
        new = []
        for frames in generate(index, context, window):
            new.append(frames)
            yield frames
        if index + 1 < len(windows):
            codes = mx.concatenate(([] if context is None else [context]) + new, axis=2)
            context = codes[:, :, windows[index + 1].offset - window.offset :]
