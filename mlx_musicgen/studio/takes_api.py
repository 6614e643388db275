"""/api/takes: the takes in the output folder, their settings, audio and waveform; make one again; delete one."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from ..cli import one_line
from ..settings import COMMAND_SETTINGS
from .deps import Jobs, accepted, error
from .job import QueueFull
from .jobs import JobQueue
from .settings import UPLOADS, JobSettings, quoted
from .takes import valid_take_id

router = APIRouter(prefix="/api/takes")
AGAIN = ("text", *(name for name in COMMAND_SETTINGS if name != "seed"))  # a take's settings that "again" keeps


def no_take(take_id: str):
    return error(404, f"no take {quoted(take_id)}.")


def take_file(jobs: JobQueue, take_id: str):
    """The take's audio file as the answer (404 for no such take)."""
    path = jobs.takes.audio_path(take_id)
    if path is None:
        return no_take(take_id)
    return FileResponse(path, media_type="audio/wav" if path.suffix == ".wav" else "audio/flac",
                        filename=path.name, content_disposition_type="inline")


@router.get("")
def list_takes(jobs: Jobs) -> list[dict]:
    """Every take in the output folder, newest first."""
    return jobs.takes.list()


@router.get("/{take_id}")
def take_settings(take_id: str, jobs: Jobs):
    """A take's settings: its sidecar JSON, as generate.py writes it."""
    settings = jobs.takes.settings(take_id)
    return settings if settings is not None else no_take(take_id)


@router.get("/{take_id}/audio")
def take_audio(take_id: str, jobs: Jobs):
    return take_file(jobs, take_id)


@router.get("/{take_id}/peaks")
def take_peaks(take_id: str, jobs: Jobs, points: int = 600):
    """The lowest and highest sample of `points` (1..4000) stretches of the take: its waveform picture."""
    if not 1 <= points <= 4000:
        return error(422, f"points must be from 1 to 4000, got {points}.")
    peaks = jobs.takes.peaks(take_id, points)
    return peaks if peaks is not None else no_take(take_id)


@router.post("/{take_id}/again", status_code=202)
def take_again(take_id: str, jobs: Jobs):
    """The take's settings again, with a new seed: 202 with the new job, as POST /api/jobs answers."""
    record = jobs.takes.settings(take_id)
    path = jobs.takes.audio_path(take_id)
    if record is None or path is None:
        return no_take(take_id)
    fields = {name: record[name] for name in AGAIN if record.get(name) is not None}
    try:
        settings = JobSettings.from_fields({**fields, "format": path.suffix[1:]}, jobs.model_info)
        for name in UPLOADS:
            if record.get(name):
                setattr(settings, name, jobs.queue_store.checked_upload(record[name]))
        job = jobs.submit(jobs.new_job_id(), settings)
    except ValueError as e:
        return error(422, one_line(e))
    except QueueFull as e:
        return error(429, str(e))
    return accepted(jobs, job)


@router.delete("/{take_id}")
def delete_take(take_id: str, jobs: Jobs):
    if not valid_take_id(take_id) or not jobs.delete_take(take_id):
        return no_take(take_id)
    return Response(status_code=204)
