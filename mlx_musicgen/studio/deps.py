"""What the studio's routers share: the app's job queue, upload limit and listener slots (FastAPI dependencies,
read from app.state, which create_app sets), and their answers."""

from __future__ import annotations

from collections import Counter
from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from .job import Job
from .jobs import JobQueue


class ListenerSlots:
    """The open event and audio streams, counted per job and in all against their caps. Used on the event loop
    only (the streams are async), so it needs no lock."""

    def __init__(self, total: int, per_job: int):
        self.total, self.per_job = total, per_job
        self.open: Counter[str] = Counter()  # job id -> its open streams

    def take(self, job_id: str) -> str | None:
        """Take a slot for a stream of the job; None when taken, else why not (the 429's message)."""
        if self.open[job_id] >= self.per_job:
            return f"{self.per_job} streams already follow this job, the most one job may have: close one first."
        if self.open.total() >= self.total:
            return f"{self.total} streams are already open, the most this studio serves: close one first."
        self.open[job_id] += 1
        return None

    def give_back(self, job_id: str) -> None:
        self.open[job_id] -= 1
        if self.open[job_id] <= 0:
            del self.open[job_id]


async def job_queue(request: Request) -> JobQueue:
    return request.app.state.jobs


async def upload_limit(request: Request) -> int:
    return request.app.state.max_upload_bytes


async def listener_slots(request: Request) -> ListenerSlots:
    return request.app.state.listener_slots


Jobs = Annotated[JobQueue, Depends(job_queue)]
MaxUploadBytes = Annotated[int, Depends(upload_limit)]
Slots = Annotated[ListenerSlots, Depends(listener_slots)]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def accepted(jobs: JobQueue, job: Job, headers: dict | None = None) -> JSONResponse:
    """202 with the new job's id, status and place in the queue."""
    view = jobs.view(job)
    return JSONResponse(status_code=202, headers=headers,
                        content={"id": job.id, "status": view["status"], "position": view["position"]})
