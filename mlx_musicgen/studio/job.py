"""A studio job as the queue keeps it and the API shows it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .settings import JobSettings

ENDED = ("done", "failed", "cancelled")  # a job is queued, then running, then one of these


class Cancelled(Exception):
    pass


class QueueFull(Exception):
    pass


@dataclass
class Job:
    id: str
    settings: JobSettings
    created: float
    status: str = "queued"
    seconds_done: float = 0.0
    seconds_total: float = 0.0
    started: float | None = None
    ended: float | None = None
    take: str | None = None
    error: str | None = None
    version: int = 0  # bumped on every change, for listeners
    chunks: list[np.ndarray] = field(default_factory=list)  # the audio so far (channels, samples), while running
    cancel_requested: bool = False  # by the user, or by a stop
    cancelled_by_user: bool = False

    def view(self, position: int | None) -> dict:
        """The job as the API shows it."""
        elapsed = (self.ended or time.time()) - self.started if self.started else 0.0
        return {
            "id": self.id, "status": self.status, "position": position,
            "progress": {"seconds_done": round(self.seconds_done, 3), "seconds_total": round(self.seconds_total, 3),
                         "realtime_factor": round(self.seconds_done / elapsed, 3) if elapsed > 0 else None},
            "take": self.take, "error": self.error, "settings": self.settings.as_dict(), "created": self.created,
            "started": self.started, "ended": self.ended,
        }
