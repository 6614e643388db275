"""The studio's jobs: requests checked as the CLI checks them, queued in order, run one at a time on the one
model by a worker thread (which also loads the model: MLX work stays on one thread), their audio kept as it
is made for listeners, and each finished one written into the output folder as a take.

Accepted jobs are written to OUTPUT/.studio/queue/ until they end, so that a job accepted before a restart
(or a Ctrl-C that cancelled it mid-way) runs after it: the studio loses no job it accepted.
"""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from .. import atomic
from ..prompt import check_duration, check_extend_stride, check_sampling, is_real
from .takes import FORMATS, TakeStore, new_take_id

STATUSES = ("queued", "running", "done", "failed", "cancelled")
ENDED = ("done", "failed", "cancelled")
MAX_TEXT = 2000  # characters: T5 reads at most 512 tokens
KEPT_JOBS = 200  # ended jobs remembered for status queries (their takes stay on disk)
STATE_FOLDER = ".studio"


class Cancelled(Exception):
    pass


@dataclass
class JobSettings:
    """What a job asks for: the CLI's options, by the API's names. Uploaded files are kept under the output
    folder and named by their path relative to it."""

    text: str | None = None
    duration: float = 10.0
    seed: int | None = None
    guidance_scale: float = 3.0
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    extend_stride: float = 18.0
    format: str = "wav"
    audio_prompt: str | None = None
    melody: str | None = None

    @classmethod
    def from_fields(cls, fields: dict) -> JobSettings:
        """Form or JSON fields -> settings, numbers parsed and checked (ValueError: the CLI's message)."""
        uploads = sorted({"audio_prompt", "melody"} & set(fields))
        if uploads:
            raise ValueError(f"{' and '.join(uploads)}: send the audio as a file, in a multipart form.")
        unknown = sorted(set(fields) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(unknown)}; known: "
                             f"{', '.join(sorted(cls.__dataclass_fields__))}.")
        kinds = {"duration": float, "seed": int, "guidance_scale": float, "top_k": int, "top_p": float,
                 "temperature": float, "extend_stride": float}
        values = {}
        for name, value in fields.items():
            if name in kinds and value is not None and value != "":
                values[name] = parse_number(name, value, kinds[name])
            elif name in ("text", "format") and value is not None:
                if not isinstance(value, str):
                    raise ValueError(f"{name} must be text, got {value!r}.")
                values[name] = value
        settings = cls(**values)
        settings.check_alone()
        return settings

    def check_alone(self) -> None:
        """The checks that need no model (those of generate.py before it loads one)."""
        if self.text is not None and len(self.text) > MAX_TEXT:
            raise ValueError(f"text is {len(self.text)} characters long; at most {MAX_TEXT}.")
        check_duration(self.duration)
        check_extend_stride(self.extend_stride, self.duration)
        check_sampling(guidance_scale=self.guidance_scale, top_k=self.top_k, top_p=self.top_p,
                       temperature=self.temperature)
        if self.format not in FORMATS:
            raise ValueError(f"format must be wav or flac, got {self.format!r}.")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be a whole number from 0 to 2**63 - 1, got {self.seed}.")


def parse_number(name: str, value, kind: type):
    """A form's text or a JSON number -> int or float; anything else is refused with the field's name."""
    want = "a whole number" if kind is int else "a number"
    try:
        number = kind(value) if isinstance(value, str) else value
        if kind is int and isinstance(number, float) and number.is_integer():
            number = int(number)
        if not is_real(number) or (kind is int and not isinstance(number, (int, np.integer))):
            raise ValueError
        return kind(number)  # as the CLI's argparse types make them: -1 and "-1" are both -1.0 for a duration
    except (ValueError, OverflowError):  # not a number, or one past a double
        raise ValueError(f"{name} must be {want}, got {value!r}.") from None


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
            "take": self.take, "error": self.error, "settings": asdict(self.settings), "created": self.created,
            "started": self.started, "ended": self.ended,
        }


class QueueFull(Exception):
    pass


class JobQueue:
    """Jobs in order, run one at a time by a worker thread that owns the model."""

    def __init__(self, load_model: Callable[[], object], output: Path, model_name: str, *, max_queued: int = 16,
                 chunk_seconds: float = 1.0, adapter: str | None = None):
        self.output = output
        self.store = TakeStore(output)
        self.state = output / STATE_FOLDER
        self.model_name = model_name
        self.adapter = adapter
        self.max_queued = max_queued
        self.chunk_seconds = chunk_seconds
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[str] = deque()
        self.changed = threading.Condition()
        self.stopping = False
        self.model = None
        self.model_info: dict = {}
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.worker = threading.Thread(target=self.work, args=(load_model,), name="studio-worker", daemon=True)

    # ---- the API's side

    def start(self) -> None:
        """Load the model (on the worker thread) and wait for it; then run the jobs left from the last run."""
        (self.state / "queue").mkdir(parents=True, exist_ok=True)
        (self.state / "uploads").mkdir(parents=True, exist_ok=True)
        with self.changed:
            self.resume()
        self.worker.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def new_job_id(self) -> str:
        return uuid.uuid4().hex

    def upload_folder(self, job_id: str) -> Path:
        return self.state / "uploads" / job_id

    def forget_uploads(self, job_id: str) -> None:
        shutil.rmtree(self.upload_folder(job_id), ignore_errors=True)

    def delete_take(self, take_id: str) -> bool:
        """Remove a take, and the uploads it was made from once no other take or waiting job names them."""
        record = self.store.settings(take_id) or {}
        if not self.store.delete(take_id):
            return False
        named = {record.get(name) for name in ("audio_prompt", "melody")} - {None}
        if named:
            with self.changed:
                waiting = {getattr(j.settings, name) for j in self.jobs.values() if j.status in ("queued", "running")
                           for name in ("audio_prompt", "melody")}
            still = {t["settings"].get(name) for t in self.store.list() for name in ("audio_prompt", "melody")}
            for relative in named - still - waiting:
                try:
                    folder = Path(self.checked_upload(relative)).parent
                except ValueError:
                    continue
                shutil.rmtree(self.output / folder, ignore_errors=True)
        return True

    def checked_upload(self, relative: str) -> str:
        """An upload a take names (its path relative to the output folder), if it is one of ours and is still
        there: a sidecar cannot point the studio at another file."""
        path = (self.output / relative).resolve()
        uploads = (self.state / "uploads").resolve()
        if not path.is_relative_to(uploads) or not path.is_file():
            raise ValueError(f"{relative} is not an upload of this studio's (or it was removed): upload it again.")
        return str(path.relative_to(self.output.resolve()))

    def submit(self, job_id: str, settings: JobSettings) -> Job:
        """Queue a checked job (QueueFull when max_queued are waiting); its seed is drawn now if not given, so
        that its take can be made again."""
        if settings.seed is None:
            settings.seed = secrets.randbits(31)
        job = Job(job_id, settings, time.time(), seconds_total=settings.duration)
        with self.changed:
            if len(self.queue) >= self.max_queued:
                raise QueueFull(f"{len(self.queue)} jobs are waiting, the most this studio queues: try again when "
                                f"one has finished.")
            self.write_spec(job, started=False)
            self.jobs[job_id] = job
            self.queue.append(job_id)
            self.touch(job)
        return job

    def position(self, job: Job) -> int | None:
        """0 for the running job, 1.. for those waiting, None once ended."""
        if job.status == "running":
            return 0
        if job.status == "queued":
            return self.queue.index(job.id) + 1 if job.id in self.queue else None
        return None

    def view(self, job: Job) -> dict:
        with self.changed:
            return job.view(self.position(job))

    def views(self) -> list[dict]:
        """Every job this run knows, oldest first."""
        with self.changed:
            return [job.view(self.position(job)) for job in self.jobs.values()]

    def find(self, job_id: str) -> Job | None:
        """The job of an id (32 hex digits), or None."""
        if not (isinstance(job_id, str) and len(job_id) == 32 and all(c in "0123456789abcdef" for c in job_id)):
            return None
        with self.changed:
            return self.jobs.get(job_id)

    def cancel(self, job: Job) -> None:
        with self.changed:
            if job.status == "queued":
                self.queue.remove(job.id)
                self.end(job, "cancelled")
            elif job.status == "running":
                job.cancel_requested = job.cancelled_by_user = True
                self.touch(job)

    def wait_change(self, job: Job, seen: int, timeout: float) -> int:
        """Wait until the job changes after version `seen` (or the timeout); return its version."""
        with self.changed:
            self.changed.wait_for(lambda: job.version != seen or self.stopping, timeout)
            return job.version

    def audio_after(self, job: Job, index: int) -> list[np.ndarray]:
        with self.changed:
            return job.chunks[index:]

    def request_stop(self) -> None:
        """Cancel the running job (its spec stays queued on disk, to run after a restart), stop the worker
        after it and end every listener's stream; returns at once."""
        with self.changed:
            self.stopping = True
            for job in self.jobs.values():
                if job.status == "running":
                    job.cancel_requested = True
            self.changed.notify_all()

    def stop(self) -> None:
        """request_stop, then wait for the worker."""
        self.request_stop()
        if self.worker.is_alive():
            self.worker.join(timeout=60)

    def pending(self) -> int:
        """Jobs accepted and not ended: they run at the next start."""
        return len(list((self.state / "queue").glob("*.json")))

    # ---- the worker's side

    def touch(self, job: Job) -> None:
        job.version += 1
        self.changed.notify_all()

    def end(self, job: Job, status: str, *, error: str | None = None, take: str | None = None) -> None:
        """Record a job's end (under the lock) and forget its spec on disk; a failed or cancelled job's uploads
        go too (a take keeps those it was made from, for "again")."""
        job.status, job.error, job.take, job.ended = status, error, take, time.time()
        job.chunks = []  # listeners still streaming read the rest from the take's file
        if status != "done":
            self.forget_uploads(job.id)
        (self.state / "queue" / f"{job.id}.json").unlink(missing_ok=True)
        self.touch(job)
        ended = [j for j in self.jobs.values() if j.status in ENDED]
        for old in ended[: max(0, len(ended) - KEPT_JOBS)]:
            del self.jobs[old.id]

    def write_spec(self, job: Job, started: bool) -> None:
        """The job's spec on disk, until it ends; `started` marks one being run (if the process dies with it,
        the next start does not run it again: it may be what killed the process)."""
        spec = {"id": job.id, "created": job.created, "settings": asdict(job.settings), "started": started}
        atomic.write_text(self.state / "queue" / f"{job.id}.json", json.dumps(spec))

    def resume(self) -> None:
        """The jobs accepted by an earlier run that did not end, back in the queue in their order; one that was
        running when the process died is reported failed instead."""
        specs = []
        for file in (self.state / "queue").glob("*.json"):
            try:
                spec = json.loads(file.read_text())
                specs.append((spec["created"], spec["id"], JobSettings(**spec["settings"]), spec.get("started")))
            except (OSError, ValueError, KeyError, TypeError):
                file.unlink(missing_ok=True)  # not a spec this version wrote
        for created, job_id, settings, started in sorted(specs):
            job = Job(job_id, settings, created, seconds_total=settings.duration)
            self.jobs[job_id] = job
            if started:
                self.end(job, "failed", error="the studio stopped while running this job (did it crash?): "
                                               "submit it again.")
            else:
                self.queue.append(job_id)

    def work(self, load_model: Callable[[], object]) -> None:
        try:
            self.model = load_model()
            model = self.model
            self.model_info = {"sampling_rate": model.sampling_rate, "channels": model.audio_channels,
                               "melody": model.config.melody is not None, "vocab_size": model.config.decoder.vocab_size,
                               "window_seconds": model.window_frames / model.frame_rate}
        except BaseException as e:  # reported by start()
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        while True:
            with self.changed:
                self.changed.wait_for(lambda: self.queue or self.stopping)
                if self.stopping:
                    return
                job = self.jobs[self.queue.popleft()]
                job.status, job.started = "running", time.time()
                self.write_spec(job, started=True)
                self.touch(job)
            try:
                take = self.run(job)
            except Cancelled:
                with self.changed:
                    if self.stopping and not job.cancelled_by_user:  # Ctrl-C: it runs again after a restart
                        self.write_spec(job, started=False)
                        job.status, job.chunks = "cancelled", []
                        self.touch(job)
                    else:
                        self.end(job, "cancelled")
            except Exception as e:  # a job's failure is its own; the studio goes on
                from ..cli import USER_ERRORS, one_line

                if not isinstance(e, USER_ERRORS):
                    traceback.print_exc()
                with self.changed:
                    self.end(job, "failed", error=one_line(e))
            else:
                with self.changed:
                    self.end(job, "done", take=take)

    def run(self, job: Job) -> str:
        """Generate a job's audio, kept chunk by chunk for listeners, then write it as a take."""
        from ..generate import clip_settings, write_clip

        model, s = self.model, job.settings
        rate = model.sampling_rate

        def progress(done: int, total: int) -> None:
            if job.cancel_requested:
                raise Cancelled()
            with self.changed:
                job.seconds_done = done / model.frame_rate
                self.touch(job)

        def path(name: str | None) -> str | None:
            return None if name is None else str(self.output / name)

        chunks = []
        for chunk in model.generate_stream(
            [s.text] if s.text and s.text.strip() else None, duration=s.duration, seed=s.seed,
            guidance_scale=s.guidance_scale, top_k=s.top_k, top_p=s.top_p, temperature=s.temperature,
            extend_stride=s.extend_stride, audio_prompt=path(s.audio_prompt), melody=path(s.melody),
            chunk_duration=self.chunk_seconds, progress=progress,
        ):
            item = chunk[0]
            chunks.append(item)
            with self.changed:
                if job.cancel_requested:
                    raise Cancelled()
                job.chunks.append(item)
                self.touch(job)
        if job.cancel_requested:  # asked for after the last chunk: still nothing is written
            raise Cancelled()
        audio = np.concatenate(chunks, axis=-1)
        take = new_take_id(s.text)
        settings = clip_settings(
            model=self.model_name, adapter=self.adapter, duration=s.duration, seed=s.seed, batch=[s.text],
            audio_prompt=s.audio_prompt, melody=s.melody, do_sample=True, guidance_scale=s.guidance_scale,
            top_k=s.top_k, top_p=s.top_p, temperature=s.temperature, extend_stride=s.extend_stride,
            normalize="none", sampling_rate=rate,
        )
        record = {"text": s.text, "batch_index": 0, **settings, "studio_job": job.id}
        # float WAV (24-bit FLAC) and no normalisation: the take is, sample for sample, what was streamed
        write_clip(self.output / f"{take}.{s.format}", audio, record, rate,
                   bits="float" if s.format == "wav" else "24", normalization="none")
        return take


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
