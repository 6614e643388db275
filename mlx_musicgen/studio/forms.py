"""A job request's body: its fields from JSON or a form, and its uploaded audio prompt and melody, checked as
generate.py checks the files before they are kept."""

from __future__ import annotations

import io
from pathlib import Path

import soundfile as sf
from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import audio
from ..cli import one_line
from ..request import check_prompt_fits
from .queue_store import QueueStore
from .settings import UPLOADS, JobSettings


async def read_fields(request: Request) -> tuple[dict, dict[str, UploadFile]]:
    """The request's fields and files (HTTPException 415 for another kind of body, 422 for a bad one)."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=len(UPLOADS), max_fields=32)
        fields, uploads = {}, {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in UPLOADS:
                    raise HTTPException(422, f"unexpected file field {name!r}; files go in {' or '.join(UPLOADS)}.")
                uploads[name] = value
            elif name in fields:
                raise HTTPException(422, f"{name} is given twice.")
            else:
                fields[name] = value
        return fields, uploads
    if kind.startswith("application/json"):
        try:
            fields = await request.json()
        except ValueError:
            raise HTTPException(422, "the body is not valid JSON.") from None
        if not isinstance(fields, dict):
            raise HTTPException(422, "the body must be a JSON object of settings.")
        return fields, {}
    raise HTTPException(415, "send the job as JSON or as a multipart form.")


async def keep_uploads(uploads: dict[str, UploadFile], job_id: str, settings: JobSettings, store: QueueStore,
                       model_info: dict, max_bytes: int) -> None:
    """Read, check and keep a job's uploads under its upload folder, named in its settings by their path in the
    output folder (ValueError: the CLI's message; HTTPException 413 for a file above `max_bytes`)."""
    if "melody" in uploads and not model_info["melody"]:
        raise ValueError("this model has no melody conditioning: use a melody checkpoint such as "
                         "facebook/musicgen-melody, or leave the melody out.")
    for name, upload in uploads.items():
        data = await upload.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"{upload.filename} is larger than {max_bytes // 2**20} MiB.")
        # decoding and writing off the event loop, which keeps serving streams meanwhile
        path = await run_in_threadpool(store_upload, store.upload_folder(job_id), name, upload.filename or name,
                                       data, settings, model_info)
        setattr(settings, name, str(path.relative_to(store.output)))


def store_upload(folder: Path, field: str, filename: str, data: bytes, settings: JobSettings, info: dict) -> Path:
    """Check an uploaded audio prompt or melody as generate.py checks the file (the message names the user's
    file) and keep it under the job's upload folder as FIELD.SUFFIX."""
    what = "audio prompt" if field == "audio_prompt" else "melody"
    name = f"{what} {Path(filename).name}"
    suffix = Path(filename).suffix.lower()
    if suffix not in audio.READABLE_SUFFIXES:
        raise ValueError(f"{name}: send a wav, flac, ogg, mp3 or aiff file.")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {name} as audio ({one_line(e)}); use a wav, flac or ogg file.") from None
    audio.check_prompt(samples.T, rate, name)
    if field == "audio_prompt":
        check_prompt_fits(name, samples.shape[0] / rate, info["window_seconds"], settings.config.duration)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{field}{suffix}"
    path.write_bytes(data)
    return path
