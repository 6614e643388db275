"""Music longer than the model's window, by audiocraft's extension (`MusicGen._generate_tokens`): windows of
int(max_duration * frame_rate) frames (1500: 30 s at 50 Hz), one window for anything that fits in one; each next
window starts extend_stride later and continues the last (window - stride) frames of the codes so far, and only
its new frames are kept. The plan is integer arithmetic on frames, where audiocraft's float seconds can miscount
a window by a frame (at 45.3 s it plans a window with negative length and trips its own assertion)."""

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


def stride_frames(extend_stride: float, frame_rate: float) -> int:
    """The stride in frames, truncated as audiocraft truncates it."""
    return int(frame_rate * extend_stride)


def plan_windows(total_frames: int, window_frames: int, stride: int, prompt_frames: int = 0) -> list[Window]:
    """The windows that make `total_frames` frames, the first continuing `prompt_frames` of prompt:
    Window(0, prompt, min(total, window)), then each next one `stride` frames later, continuing the last
    (span - stride) frames of the one before, while frames are left to make."""
    if total_frames > window_frames:
        if not 0 < stride < window_frames:
            raise ValueError(f"the stride must be between 0 and {window_frames} frames, got {stride}.")
        if prompt_frames >= window_frames:
            raise ValueError(f"a prompt of {prompt_frames} frames leaves no room in a window of {window_frames}.")
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
