"""The studio's HTTP API and page (FastAPI). Every id and upload is checked; only the output folder's takes and
the page's own files are served; requests from other sites (an Origin that is not this server's) and, on a
loopback address, other Host names (DNS rebinding) are refused."""

from __future__ import annotations

import io
import json
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from .. import __version__, audio
from ..cli import one_line
from ..prompt import check_extend_stride, check_prompt_fits, check_sampling
from .jobs import ENDED, Job, JobQueue, JobSettings, QueueFull, interleaved, wav_header
from .takes import valid_take_id

STATIC = Path(__file__).parent / "static"
UPLOADS = ("audio_prompt", "melody")
UPLOAD_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".aiff", ".aif")
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": message})


def create_app(jobs: JobQueue, *, max_upload_bytes: int = 50 * 2**20, allowed_origins: tuple[str, ...] = (),
               loopback_only: bool = True) -> FastAPI:
    app = FastAPI(title="mlx-musicgen studio", version=__version__, docs_url=None, redoc_url=None,
                  description="Make music with MusicGen on this machine: queue jobs, follow them, keep takes.")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.middleware("http")
    async def same_site_only(request: Request, call_next):
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if loopback_only and name not in LOOPBACK_NAMES:
            return error(400, f"host {host!r} is not this studio's: open it as http://127.0.0.1 or localhost.")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}" and origin not in allowed_origins:
            return error(403, f"requests from {origin} are refused: start the studio with --allow-origin {origin} "
                              f"to let that site use it.")
        return await call_next(request)

    def find_job(job_id: str) -> Job | None:
        return jobs.find(job_id)

    def no_job(job_id: str) -> JSONResponse:
        return error(404, f"no job {job_id!r}.")

    def no_take(take_id: str) -> JSONResponse:
        return error(404, f"no take {take_id!r}.")

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    @app.get("/api/info")
    def info() -> dict:
        """The model and the limits: what the page's form offers."""
        return {**jobs.model_info, "model": jobs.model_name, "version": __version__,
                "max_upload_bytes": max_upload_bytes, "max_queued": jobs.max_queued, "output": str(jobs.output)}

    @app.post("/api/jobs", status_code=202, openapi_extra=JOB_REQUEST_SCHEMA)
    async def submit(request: Request):
        """Queue a job: JSON, or a multipart form with optional `audio_prompt` / `melody` files. 202 with the job's
        id, status and place in the queue; 422 for a bad value (the CLI's message); 413 for an upload too large;
        429 when the queue is full."""
        if int(request.headers.get("content-length") or 0) > 2 * max_upload_bytes + 2**20:
            return error(413, f"the request is larger than the uploads allowed ({max_upload_bytes // 2**20} MiB "
                              f"a file).")
        kind = request.headers.get("content-type", "")
        uploads: dict[str, UploadFile] = {}
        if kind.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
            form = await request.form(max_files=len(UPLOADS), max_fields=32)
            fields = {}
            for name, value in form.multi_items():
                if isinstance(value, UploadFile):
                    if name not in UPLOADS:
                        return error(422, f"unexpected file field {name!r}; files go in {' or '.join(UPLOADS)}.")
                    uploads[name] = value
                elif name in fields:
                    return error(422, f"{name} is given twice.")
                else:
                    fields[name] = value
        elif kind.startswith("application/json"):
            try:
                fields = await request.json()
            except ValueError:
                return error(422, "the body is not valid JSON.")
            if not isinstance(fields, dict):
                return error(422, "the body must be a JSON object of settings.")
        else:
            return error(415, "send the job as JSON or as a multipart form.")
        job_id = jobs.new_job_id()
        folder = jobs.upload_folder(job_id)
        try:
            settings = JobSettings.from_fields(fields)
            check_for_model(settings, jobs.model_info)
            if "melody" in uploads and not jobs.model_info["melody"]:
                raise ValueError("this model has no melody conditioning: use a melody checkpoint such as "
                                 "facebook/musicgen-melody, or leave the melody out.")
            for name, upload in uploads.items():
                data = await upload.read(max_upload_bytes + 1)
                if len(data) > max_upload_bytes:
                    jobs.forget_uploads(job_id)
                    return error(413, f"{upload.filename} is larger than {max_upload_bytes // 2**20} MiB.")
                # decoding and writing off the event loop, which keeps serving streams meanwhile
                path = await run_in_threadpool(store_upload, folder, name, upload.filename or name, data, settings,
                                               jobs.model_info)
                setattr(settings, name, str(path.relative_to(jobs.output)))
            job = await run_in_threadpool(jobs.submit, job_id, settings)
        except ValueError as e:
            jobs.forget_uploads(job_id)
            return error(422, one_line(e))
        except QueueFull as e:
            jobs.forget_uploads(job_id)
            return error(429, str(e))
        except BaseException:
            jobs.forget_uploads(job_id)
            raise
        view = jobs.view(job)
        return JSONResponse(status_code=202, headers={"Location": f"/api/jobs/{job.id}"},
                            content={"id": job.id, "status": view["status"], "position": view["position"]})

    @app.get("/api/jobs")
    def list_jobs() -> list[dict]:
        """The jobs this run knows, oldest first."""
        return jobs.views()

    @app.get("/api/jobs/{job_id}")
    def job_status(job_id: str):
        """status (queued|running|done|failed|cancelled), position, progress (seconds made, seconds in all, x real
        time), the take's id when done, the error when failed."""
        job = find_job(job_id)
        return jobs.view(job) if job else no_job(job_id)

    @app.delete("/api/jobs/{job_id}")
    def cancel_job(job_id: str):
        """Cancel a queued or running job (nothing of it is written); an ended job is left as it is."""
        job = find_job(job_id)
        if job is None:
            return no_job(job_id)
        jobs.cancel(job)
        return jobs.view(job)

    @app.get("/api/jobs/{job_id}/events")
    def job_events(job_id: str):
        """The job's status as server-sent events, one each time it changes, until it ends."""
        job = find_job(job_id)
        if job is None:
            return no_job(job_id)

        def events():
            seen = -1
            while True:
                version = jobs.wait_change(job, seen, timeout=10.0)
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

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @app.get("/api/jobs/{job_id}/audio")
    def job_audio(job_id: str):
        """The audio as it is made: a 32-bit float WAV streamed chunk by chunk (from the start, whenever it is
        asked for); once the job is done, its take's file."""
        job = find_job(job_id)
        if job is None:
            return no_job(job_id)
        if job.status == "done" and job.take:
            return take_audio(job.take)
        if job.status in ("failed", "cancelled"):
            return error(409, f"the job {job.status}: it has no audio.")
        info = jobs.model_info

        def stream():
            yield wav_header(info["sampling_rate"], info["channels"])
            sent = samples = seen = 0
            while True:
                for chunk in jobs.audio_after(job, sent):
                    sent += 1
                    samples += chunk.shape[-1]
                    yield interleaved(chunk)
                if job.status in ENDED or jobs.stopping:
                    if job.status == "done" and (path := jobs.store.audio_path(job.take or "")) is not None:
                        import soundfile as sf  # the job's audio left memory with its end: the rest is the take's

                        rest = sf.read(str(path), start=samples, dtype="float32", always_2d=True)[0]
                        yield interleaved(rest.T)
                    return
                seen = jobs.wait_change(job, seen, timeout=10.0)

        return StreamingResponse(stream(), media_type="audio/wav", headers={"Cache-Control": "no-cache"})

    @app.get("/api/takes")
    def list_takes() -> list[dict]:
        """Every take in the output folder, newest first."""
        return jobs.store.list()

    @app.get("/api/takes/{take_id}")
    def take_settings(take_id: str):
        """A take's settings: its sidecar JSON, as generate.py writes it."""
        settings = jobs.store.settings(take_id)
        return settings if settings is not None else no_take(take_id)

    @app.get("/api/takes/{take_id}/audio")
    def take_audio(take_id: str):
        path = jobs.store.audio_path(take_id)
        if path is None:
            return no_take(take_id)
        return FileResponse(path, media_type="audio/wav" if path.suffix == ".wav" else "audio/flac",
                            filename=path.name, content_disposition_type="inline")

    @app.get("/api/takes/{take_id}/peaks")
    def take_peaks(take_id: str, points: int = 600):
        """The lowest and highest sample of `points` (1..4000) stretches of the take: its waveform picture."""
        if not 1 <= points <= 4000:
            return error(422, f"points must be from 1 to 4000, got {points}.")
        peaks = jobs.store.peaks(take_id, points)
        return peaks if peaks is not None else no_take(take_id)

    @app.post("/api/takes/{take_id}/again", status_code=202)
    def take_again(take_id: str):
        """The take's settings again, with a new seed: 202 with the new job, as POST /api/jobs answers."""
        record = jobs.store.settings(take_id)
        if record is None or jobs.store.audio_path(take_id) is None:
            return no_take(take_id)
        fields = {name: record.get(name) for name in ("text", "duration", "guidance_scale", "top_k", "top_p",
                                                       "temperature", "extend_stride")}
        fields["format"] = jobs.store.audio_path(take_id).suffix[1:]
        try:
            settings = JobSettings.from_fields({k: v for k, v in fields.items() if v is not None})
            check_for_model(settings, jobs.model_info)
            for name in UPLOADS:
                if record.get(name):
                    setattr(settings, name, jobs.checked_upload(record[name]))
            job = jobs.submit(jobs.new_job_id(), settings)
        except ValueError as e:
            return error(422, one_line(e))
        except QueueFull as e:
            return error(429, str(e))
        view = jobs.view(job)
        return JSONResponse(status_code=202, content={"id": job.id, "status": view["status"],
                                                      "position": view["position"]})

    @app.delete("/api/takes/{take_id}")
    def delete_take(take_id: str):
        if not valid_take_id(take_id) or not jobs.delete_take(take_id):
            return no_take(take_id)
        return Response(status_code=204)

    return app


def check_for_model(settings: JobSettings, info: dict) -> None:
    """The checks that need the model: top_k against its vocabulary, the stride against its window."""
    check_sampling(guidance_scale=settings.guidance_scale, top_k=settings.top_k, top_p=settings.top_p,
                   temperature=settings.temperature, vocab_size=info["vocab_size"])
    check_extend_stride(settings.extend_stride, settings.duration, info["window_seconds"])


def store_upload(folder: Path, field: str, filename: str, data: bytes, settings: JobSettings, info: dict) -> Path:
    """Check an uploaded audio prompt or melody as generate.py checks the file (the message names the user's
    file) and keep it under the job's upload folder as FIELD.SUFFIX."""
    import soundfile as sf

    what = "audio prompt" if field == "audio_prompt" else "melody"
    name = f"{what} {Path(filename).name}"
    suffix = Path(filename).suffix.lower()
    if suffix not in UPLOAD_SUFFIXES:
        raise ValueError(f"{name}: send a wav, flac, ogg, mp3 or aiff file.")
    try:
        samples, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except Exception as e:
        raise ValueError(f"cannot read {name} as audio ({one_line(e)}); use a wav, flac or ogg file.") from None
    audio.check_prompt(samples.T, rate, name)
    if field == "audio_prompt":
        check_prompt_fits(name, samples.shape[0] / rate, info["window_seconds"], settings.duration)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{field}{suffix}"
    path.write_bytes(data)
    return path


JOB_FIELDS = {
    "text": {"type": "string", "description": "what the music should be; empty or absent: unconditional"},
    "duration": {"type": "number", "default": 10, "description": "seconds in all, an audio prompt included"},
    "seed": {"type": "integer", "description": "the same seed gives the same take; drawn when absent"},
    "guidance_scale": {"type": "number", "default": 3},
    "top_k": {"type": "integer", "default": 250},
    "top_p": {"type": "number", "default": 0},
    "temperature": {"type": "number", "default": 1},
    "extend_stride": {"type": "number", "default": 18},
    "format": {"type": "string", "enum": ["wav", "flac"], "default": "wav"},
}
JOB_REQUEST_SCHEMA = {"requestBody": {"content": {
    "application/json": {"schema": {"type": "object", "properties": JOB_FIELDS}},
    "multipart/form-data": {"schema": {"type": "object", "properties": {
        **JOB_FIELDS,
        "audio_prompt": {"type": "string", "format": "binary", "description": "audio to continue"},
        "melody": {"type": "string", "format": "binary", "description": "a tune to follow (melody models)"},
    }}},
}}}
