"""A job request's body: its fields from JSON or a form, and its uploaded audio prompt and melody, checked as
generate.py checks the files before they are kept."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import BinaryIO

from fastapi import HTTPException, Request
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import audio
from ..cli import one_line
from ..request import check_prompt_fits
from .queue_store import QueueStore
from .settings import UPLOADS, JobSettings, quoted, shortened


MAX_DECODED_BYTES = 512 * 2**20  # an upload's samples as float32, what the worker decodes of it: bounds its memory
COPY_BLOCK = 2**20  # bytes copied at a time from the received file to the uploads folder


async def read_fields(request: Request) -> tuple[dict, dict[str, UploadFile]]:
    """The request's fields and files (HTTPException 415 for another kind of body, 422 for a bad one). The
    body's size is body_limit's to bound, as it streams."""
    kind = request.headers.get("content-type", "")
    if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        form = await request.form(max_files=len(UPLOADS), max_fields=32)
        fields, uploads = {}, {}
        for name, value in form.multi_items():
            if isinstance(value, UploadFile):
                if name not in UPLOADS:
                    raise HTTPException(422, f"unexpected file field {quoted(name)}; files go in "
                                             f"{' or '.join(UPLOADS)}.")
                uploads[name] = value
            elif name in fields:
                raise HTTPException(422, f"{quoted(name)} is given twice.")
            else:
                fields[name] = value
        return fields, uploads
    if kind.startswith("application/json"):
        return await read_json(request), {}
    raise HTTPException(415, "send the job as JSON or as a multipart form.")


async def read_json(request: Request) -> dict:
    """A JSON body's object of settings (HTTPException 422 for anything else, nesting too deep included)."""
    try:
        fields = await request.json()
    except RecursionError:  # nested deeper than the interpreter's limit (1000): settings are one flat object
        raise HTTPException(422, "the body nests too deep: send one flat JSON object of settings.") from None
    except ValueError:
        raise HTTPException(422, "the body is not valid JSON.") from None
    if not isinstance(fields, dict):
        raise HTTPException(422, "the body must be a JSON object of settings.")
    return fields


async def keep_uploads(uploads: dict[str, UploadFile], job_id: str, settings: JobSettings, store: QueueStore,
                       model_info: dict, max_bytes: int) -> None:
    """Check and keep a job's uploads under its upload folder, named in its settings by their path in the
    output folder (ValueError: the CLI's message; HTTPException 413 for a file above `max_bytes`). Each is
    read from the file the form was received into, never whole into memory."""
    if "melody" in uploads and not model_info["melody"]:
        raise ValueError("this model has no melody conditioning: use a melody checkpoint such as "
                         "facebook/musicgen-melody, or leave the melody out.")
    for name, upload in uploads.items():
        if (upload.size or 0) > max_bytes:
            raise HTTPException(413, f"{display_name(upload.filename or name)} is larger than "
                                     f"{max_bytes / 2**20:g} MiB.")
        # decoding and writing off the event loop, which keeps serving streams meanwhile
        path = await run_in_threadpool(store_upload, store.upload_folder(job_id), name, upload.filename or name,
                                       upload.file, settings, model_info)
        setattr(settings, name, str(path.relative_to(store.output)))


def display_name(filename: str) -> str:
    """An uploaded file's name as messages show it: its last part, at most 60 characters."""
    return shortened(Path(filename).name, 60)


def store_upload(folder: Path, field: str, filename: str, file: BinaryIO, settings: JobSettings,
                 info: dict) -> Path:
    """Check an uploaded audio prompt or melody as generate.py checks the file (the message names the user's
    file) and keep it under the job's upload folder as FIELD.SUFFIX. Its header is checked before anything is
    decoded, and only the frames a job may use are decoded, a block at a time."""
    what = "audio prompt" if field == "audio_prompt" else "melody"
    name = f"{what} {display_name(filename)}"
    suffix = Path(filename).suffix.lower()
    if suffix not in audio.READABLE_SUFFIXES:
        raise ValueError(f"{name}: send a wav, flac, ogg, mp3 or aiff file.")
    header, max_frames = check_header(file, name, field, settings, info)
    try:
        frames = audio.scan_audio(file, header, max_frames, name)
    except ValueError:  # the audio cannot be used: check_prompt's message
        raise
    except Exception as e:
        raise unreadable(name, e) from None
    if frames > max_frames:  # its header understated its length
        raise ValueError(f"{name} is over {max_frames / header.rate:.2f} s long; at most "
                         f"{allowed_seconds(field, settings, info):g} s of it is used here: trim it.")
    if field == "audio_prompt":
        check_prompt_fits(name, frames / header.rate, info["window_seconds"], settings.config.duration)
    return copy_upload(file, folder / f"{field}{suffix}")


def check_header(file: BinaryIO, name: str, field: str, settings: JobSettings, info: dict
                 ) -> tuple[audio.AudioHeader, int]:
    """An upload's header, refused on what it says (rate, channels, length, the samples it would decode to)
    before anything is decoded; returns it and the most frames that may be decoded."""
    try:
        header = audio.read_header(file)
    except Exception as e:
        raise unreadable(name, e) from None
    if field == "audio_prompt":
        check_prompt_fits(name, header.seconds, info["window_seconds"], settings.config.duration)
    max_frames = audio.frames_allowed(header, name, max_seconds=allowed_seconds(field, settings, info))
    decoded = min(header.frames, max_frames) * header.channels * 4
    if decoded > MAX_DECODED_BYTES:
        raise ValueError(f"{name} holds {decoded / 2**20:.0f} MiB of samples ({header.channels} channels at "
                         f"{header.rate} Hz); at most {MAX_DECODED_BYTES // 2**20} MiB: mix it down to stereo or "
                         f"convert it to 48 kHz.")
    return header, max_frames


def unreadable(name: str, error: Exception) -> ValueError:
    return ValueError(f"cannot read {name} as audio ({shortened(one_line(error))}); use a wav, flac or ogg file.")


def allowed_seconds(field: str, settings: JobSettings, info: dict) -> float:
    """The seconds of an upload that a job uses, beyond which it is refused: an audio prompt must fit in the
    model's window; a melody is followed for its first melody_seconds (30) in one window, and in long form
    each window follows it from its own time on, so up to the job's duration."""
    if field == "audio_prompt":
        return info["window_seconds"]
    return max(info["melody_seconds"], settings.config.duration or 0.0)


def copy_upload(file: BinaryIO, path: Path) -> Path:
    """The received file, a block at a time, into `path` (its folder made)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file.seek(0)
    with path.open("wb") as out:
        shutil.copyfileobj(file, out, COPY_BLOCK)
    return path
