"""/api/jobs: queue a job, follow it (status, server-sent events, the audio as it is made), cancel it.

The event and audio streams are listeners: each waits on the event loop for the job's next change (no thread is
held while it waits), and they are counted against caps per job and in all (429 beyond)."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf
from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from ..cli import one_line
from .deps import Jobs, ListenerSlots, MaxUploadBytes, Slots, accepted, error
from .forms import keep_uploads, read_fields
from .job import ENDED, Job, QueueFull
from .jobs import JobQueue
from .settings import JobForm, JobRequest, JobSettings, quoted
from .takes_api import take_file

router = APIRouter(prefix="/api/jobs")
STILL_HERE = 10.0  # seconds between comments on an event stream whose job does not change (they keep proxies open)

# the request body that submit reads itself, as OpenAPI shows it: the settings models' schemas
REQUEST_BODY = {"requestBody": {"content": {
    "application/json": {"schema": JobRequest.model_json_schema()},
    "multipart/form-data": {"schema": JobForm.model_json_schema()},
}}}


@router.post("", status_code=202, openapi_extra=REQUEST_BODY)
async def submit(request: Request, jobs: Jobs, max_upload_bytes: MaxUploadBytes):
    """Queue a job: JSON, or a multipart form with optional `audio_prompt` / `melody` files. 202 with the job's
    id, status and place in the queue; 422 for a bad value (the CLI's message); 413 for an upload too large;
    429 when the queue is full (a body past its limit is answered 413 by body_limit.BodyLimit, as it streams)."""
    fields, uploads = await read_fields(request)
    job_id = jobs.new_job_id()
    try:
        settings = JobSettings.from_fields(fields, jobs.model_info)
        await keep_uploads(uploads, job_id, settings, jobs.queue_store, jobs.model_info, max_upload_bytes)
        job = await run_in_threadpool(jobs.submit, job_id, settings)
    except ValueError as e:
        jobs.queue_store.forget_uploads(job_id)
        return error(422, one_line(e))
    except QueueFull as e:
        jobs.queue_store.forget_uploads(job_id)
        return error(429, str(e))
    except BaseException:
        jobs.queue_store.forget_uploads(job_id)
        raise
    return accepted(jobs, job, headers={"Location": f"/api/jobs/{job.id}"})


@router.get("")
def list_jobs(jobs: Jobs) -> list[dict]:
    """The jobs this run knows, oldest first."""
    return jobs.views()


def no_job(job_id: str):
    return error(404, f"no job {quoted(job_id)}.")


@router.get("/{job_id}")
def job_status(job_id: str, jobs: Jobs):
    """status (queued|running|done|failed|cancelled), position, progress (seconds made, seconds in all, x real
    time), the take's id when done, the error when failed."""
    job = jobs.find(job_id)
    return jobs.view(job) if job else no_job(job_id)


@router.delete("/{job_id}")
def cancel_job(job_id: str, jobs: Jobs):
    """Cancel a queued or running job (nothing of it is written); an ended job is left as it is."""
    job = jobs.find(job_id)
    if job is None:
        return no_job(job_id)
    jobs.cancel(job)
    return jobs.view(job)


@router.get("/{job_id}/events")
async def job_events(job_id: str, jobs: Jobs, slots: Slots):
    """The job's status as server-sent events, one each time it changes, until it ends; 429 when too many
    listen already."""
    job = jobs.find(job_id)
    if job is None:
        return no_job(job_id)
    return listening(slots, job.id, lambda: events(jobs, job), media_type="text/event-stream")


@router.get("/{job_id}/audio")
async def job_audio(job_id: str, jobs: Jobs, slots: Slots):
    """The audio as it is made: a 32-bit float WAV streamed chunk by chunk (from the start, whenever it is
    asked for); once the job is done, its take's file; 429 when too many listen already."""
    job = jobs.find(job_id)
    if job is None:
        return no_job(job_id)
    if job.status == "done" and job.take:
        return take_file(jobs, job.take)
    if job.status in ("failed", "cancelled"):
        return error(409, f"the job {job.status}: it has no audio.")
    return listening(slots, job.id, lambda: audio_stream(jobs, job), media_type="audio/wav")


def listening(slots: ListenerSlots, job_id: str, make_stream, media_type: str):
    """The stream (made by `make_stream()`) as the answer, holding a listener's slot until it ends, however it
    ends; 429 when the job or the studio has all the listeners it takes."""
    refusal = slots.take(job_id)
    if refusal is not None:
        return error(429, refusal)
    return SlotStream(slots, job_id, make_stream(), media_type=media_type, headers={"Cache-Control": "no-cache"})


class SlotStream(StreamingResponse):
    """A StreamingResponse that gives its listener's slot back when it ends, even if the client left before
    the stream began (when the generator's own `finally` never runs)."""

    def __init__(self, slots: ListenerSlots, job_id: str, stream, **kwargs):
        super().__init__(stream, **kwargs)
        self.slots, self.job_id = slots, job_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slots.give_back(self.job_id)
            await self.body_iterator.aclose()


async def events(jobs: JobQueue, job: Job):
    """The job's view each time it changes, and a comment every STILL_HERE seconds that it has not, until it
    ends or the studio stops."""
    seen = -1
    while True:
        version = await jobs.wait_change(job, seen, timeout=STILL_HERE)
        if version == seen:
            if jobs.stopping:
                return
            yield ": still here\n\n"
            continue
        seen = version
        view = jobs.view(job)
        yield f"data: {json.dumps(view)}\n\n"
        if view["status"] in ENDED or jobs.stopping:
            return


async def audio_stream(jobs: JobQueue, job: Job):
    """A float WAV of the job's audio from its start: the chunks made so far, then each as it comes."""
    info = jobs.model_info
    yield wav_header(info["sampling_rate"], info["channels"])
    sent = samples = seen = 0
    while True:
        for chunk in jobs.audio_after(job, sent):
            sent += 1
            samples += chunk.shape[-1]
            yield interleaved(chunk)
        if job.status in ENDED or jobs.stopping:
            if job.status == "done" and (path := jobs.takes.audio_path(job.take or "")) is not None:
                # the job's audio left memory with its end: the rest is the take's (read off the event loop)
                rest = await run_in_threadpool(read_after, path, samples)
                yield interleaved(rest)
            return
        seen = await jobs.wait_change(job, seen, timeout=STILL_HERE)


def read_after(path, start: int) -> np.ndarray:
    """A take's audio from sample `start` on, (channels, samples) float32."""
    return sf.read(str(path), start=start, dtype="float32", always_2d=True)[0].T


def wav_header(sampling_rate: int, channels: int) -> bytes:
    """A 32-bit float WAV header for a stream of unknown length (its sizes at the maximum, as streams do)."""
    block = 4 * channels
    fmt = (b"fmt " + (18).to_bytes(4, "little") + (3).to_bytes(2, "little") + channels.to_bytes(2, "little")
           + sampling_rate.to_bytes(4, "little") + (sampling_rate * block).to_bytes(4, "little")
           + block.to_bytes(2, "little") + (32).to_bytes(2, "little") + (0).to_bytes(2, "little"))
    fact = b"fact" + (4).to_bytes(4, "little") + (0xFFFFFFFF).to_bytes(4, "little")
    return (b"RIFF" + (0xFFFFFFFF).to_bytes(4, "little") + b"WAVE" + fmt + fact + b"data"
            + (0xFFFFFFFF - 4 - len(fmt) - len(fact) - 8).to_bytes(4, "little"))


def interleaved(chunk: np.ndarray) -> bytes:
    """(channels, samples) float -> little-endian float32 frames, channels interleaved."""
    return np.ascontiguousarray(chunk.T, dtype="<f4").tobytes()
