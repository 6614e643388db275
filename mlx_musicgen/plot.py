"""A loss curve as a PNG, with numpy and zlib only (no plotting library at run time): training loss in blue,
validation loss in orange, steps along x, loss along y (its range in the file's tEXt chunk and in
metrics.jsonl)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from . import atomic

WIDTH, HEIGHT, MARGIN = 640, 360, 30
BACKGROUND, AXES, GRID = (255, 255, 255), (60, 60, 60), (225, 225, 225)
TRAIN, VAL = (31, 119, 180), (255, 127, 14)


def png(image: np.ndarray, text: dict[str, str]) -> bytes:
    """(height, width, 3) uint8 -> PNG bytes, with tEXt entries."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, _ = image.shape
    rows = b"".join(b"\x00" + image[y].tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    texts = b"".join(chunk(b"tEXt", k.encode("latin-1") + b"\x00" + v.encode("latin-1")) for k, v in text.items())
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + texts + chunk(b"IDAT", zlib.compress(rows, 6)) + \
        chunk(b"IEND", b"")


def draw_line(image: np.ndarray, points: np.ndarray, color: tuple[int, int, int]) -> None:
    """Join (x, y) pixel points with 2-pixel-wide segments."""
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
        xs = np.linspace(x0, x1, n).round().astype(int)
        ys = np.linspace(y0, y1, n).round().astype(int)
        for dy in (0, 1):
            image[np.clip(ys + dy, 0, image.shape[0] - 1), np.clip(xs, 0, image.shape[1] - 1)] = color
    if len(points) == 1:
        x, y = points[0].round().astype(int)
        image[max(0, y - 2) : y + 3, max(0, x - 2) : x + 3] = color


def plot_losses(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> None:
    """Write the loss curves (step, loss) to `path`, atomically."""
    image = np.full((HEIGHT, WIDTH, 3), BACKGROUND, dtype=np.uint8)
    series = [s for s in (train, val) if s]
    if series:
        steps = np.array([p[0] for s in series for p in s], dtype=float)
        losses = np.array([p[1] for s in series for p in s], dtype=float)
        x0, x1 = 0.0, max(steps.max(), 1.0)
        y0, y1 = min(losses.min(), 0.0) if losses.min() < 0 else 0.0, max(losses.max(), 1e-6) * 1.05
        for i in range(1, 5):  # horizontal grid at quarters of the range
            image[MARGIN + (HEIGHT - 2 * MARGIN) * i // 4, MARGIN : WIDTH - MARGIN] = GRID

        def to_pixels(points):
            p = np.array(points, dtype=float)
            x = MARGIN + (p[:, 0] - x0) / (x1 - x0) * (WIDTH - 2 * MARGIN)
            y = HEIGHT - MARGIN - (p[:, 1] - y0) / (y1 - y0) * (HEIGHT - 2 * MARGIN)
            return np.stack([x, y], axis=1)

        for points, color in ((train, TRAIN), (val, VAL)):
            if points:
                draw_line(image, to_pixels(points), color)
        text = {"Title": "mlx-musicgen fine-tuning loss", "x": f"step 0 .. {x1:g}", "y": f"loss {y0:g} .. {y1:.4g}",
                "Legend": "blue: training loss, orange: validation loss"}
    else:
        text = {"Title": "mlx-musicgen fine-tuning loss (no steps yet)"}
    image[MARGIN : HEIGHT - MARGIN, MARGIN] = AXES
    image[HEIGHT - MARGIN, MARGIN : WIDTH - MARGIN] = AXES
    atomic.write_bytes(path, png(image, text))
