"""What the studio's routers share: the app's job queue and upload limit (FastAPI dependencies, read from
app.state, which create_app sets), and their answers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from .job import Job
from .jobs import JobQueue


async def job_queue(request: Request) -> JobQueue:
    return request.app.state.jobs


async def upload_limit(request: Request) -> int:
    return request.app.state.max_upload_bytes


Jobs = Annotated[JobQueue, Depends(job_queue)]
MaxUploadBytes = Annotated[int, Depends(upload_limit)]


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def accepted(jobs: JobQueue, job: Job, headers: dict | None = None) -> JSONResponse:
    """202 with the new job's id, status and place in the queue."""
    view = jobs.view(job)
    return JSONResponse(status_code=202, headers=headers,
                        content={"id": job.id, "status": view["status"], "position": view["position"]})
