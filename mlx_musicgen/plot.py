"""The fine-tune's loss curve as a PNG, drawn with matplotlib (the `train` extra: pip install
"mlx-musicgen[train]"): training loss in blue, validation loss in orange, loss against step.

matplotlib is imported inside plot_losses, on its Agg backend (a figure of its own, never pyplot's global state
or a window), so that nothing but a fine-tune's records ever imports it.
"""

from __future__ import annotations

import io
from pathlib import Path

from . import atomic

TITLE = "mlx-musicgen fine-tuning loss"
TRAIN, VAL = "#1f77b4", "#ff7f0e"  # blue, orange


def plot_losses(path: Path, train: list[tuple[int, float]], val: list[tuple[int, float]]) -> bool:
    """Write the loss curves (step, loss) to `path` as a PNG, atomically; False (and nothing written) when
    matplotlib is not installed."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return False
    figure = Figure(figsize=(6.4, 3.6), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for points, color, label in ((train, TRAIN, "training loss"), (val, VAL, "validation loss")):
        if points:
            steps, losses = zip(*points)
            axes.plot(steps, losses, color=color, label=label, marker="o" if len(points) == 1 else None)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(TITLE if train or val else f"{TITLE} (no steps yet)")
    axes.set_xlim(left=0)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # whole steps
    axes.set_ylim(bottom=0)  # cross-entropy: the curve's fall to 0 in proportion
    axes.grid(True, color="#e1e1e1")
    if train or val:
        axes.legend()
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format="png")
    atomic.write_bytes(path, png.getvalue())
    return True
