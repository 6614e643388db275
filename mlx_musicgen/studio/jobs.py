"""The studio's scheduler: checked jobs queued in order, run one at a time on the one model by a worker thread
(which also loads the model: MLX work stays on one thread), their audio kept as it is made for listeners, and
each finished one written into the output folder as a take.

Accepted jobs are kept on disk until they end (QueueStore), so that the studio loses no job it accepted: those
left by the last run are queued again at start; one that was running when the process died is reported failed
(it may be what killed it); one that a Ctrl-C cancelled runs again.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
import traceback
import uuid
from collections import OrderedDict, deque
from pathlib import Path
from typing import Callable

import numpy as np

from ..cli import USER_ERRORS, one_line
from ..clips import clip_settings, write_clip
from .job import ENDED, Cancelled, Job, QueueFull
from .queue_store import QueueStore, log, some_names, upload_owner, valid_job_id
from .settings import UPLOADS, JobSettings
from .takes import TakeStore, new_take_id
from .waiters import Waiters

KEPT_JOBS = 200  # ended jobs remembered for status queries (their takes stay on disk)


class JobQueue:
    """Jobs in order, run one at a time by a worker thread that owns the model."""

    def __init__(self, load_model: Callable[[], object], output: Path, model_name: str, *, max_queued: int = 16,
                 chunk_seconds: float = 1.0, adapter: str | None = None):
        self.output = output
        self.takes = TakeStore(output)
        self.queue_store = QueueStore(output)
        self.model_name = model_name
        self.adapter = adapter
        self.max_queued = max_queued
        self.chunk_seconds = chunk_seconds
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.queue: deque[str] = deque()
        self.changed = threading.Condition()
        # listeners waiting on the event loop for a job's change: job id -> their (loop, event); guarded by a lock
        # of its own, which is never held for I/O, as the event loop takes it
        self.waiters = Waiters()  # the listeners of each job, on the event loop
        self.stopping = False
        self.model = None
        self.model_info: dict = {}
        self.load_error: BaseException | None = None
        self.ready = threading.Event()
        self.worker_done = threading.Event()  # the worker ran its last job (its thread stays: see stop)
        self.worker = threading.Thread(target=self.work, args=(load_model,), name="studio-worker", daemon=True)

    # ---- the API's side

    def start(self) -> None:
        """Check what the last run left (tidy_up, and each queued job's spec, as resume reads them), load the
        model (on the worker thread) and wait for it; then run the jobs left from the last run."""
        self.queue_store.prepare()
        tidy_up(self.queue_store, self.takes)
        with self.changed:
            self.resume()
        self.worker.start()
        self.ready.wait()
        if self.load_error is not None:
            raise self.load_error

    def new_job_id(self) -> str:
        return uuid.uuid4().hex

    def submit(self, job_id: str, settings: JobSettings) -> Job:
        """Queue a checked job (QueueFull when max_queued are waiting); its seed is drawn now if not given, so
        that its take can be made again."""
        if settings.config.seed is None:
            settings.config.seed = secrets.randbits(31)
        job = Job(job_id, settings, time.time(), seconds_total=settings.config.duration)
        with self.changed:
            if len(self.queue) >= self.max_queued:
                raise QueueFull(f"{len(self.queue)} jobs are waiting, the most this studio queues: try again when "
                                f"one has finished.")
            self.queue_store.write(job, started=False)
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

    async def wait_change(self, job: Job, seen: int, timeout: float) -> int:
        """Wait on the event loop, holding no thread, until the job changes after version `seen`, the studio
        stops, or `timeout` seconds pass; returns the job's version (`seen` when nothing changed)."""
        await self.waiters.wait(job.id, lambda: job.version != seen or self.stopping, timeout)
        return job.version

    def audio_after(self, job: Job, index: int) -> list[np.ndarray]:
        with self.changed:
            return job.chunks[index:]

    def delete_take(self, take_id: str) -> bool:
        """Remove a take's own files (its audio and sidecar) and its own uploads (own_uploads), once no other
        take and no waiting job needs them; nothing else."""
        record = self.takes.settings(take_id) or {}
        if not self.takes.delete(take_id):
            return False
        with self.changed:  # no job is queued meanwhile (submit takes the lock)
            for job_id in own_uploads(record) - upload_users(self.jobs.values(), self.takes, self.queue_store):
                self.queue_store.forget_uploads(job_id)
        return True

    def request_stop(self) -> None:
        """Cancel the running job (its spec stays queued on disk, to run after a restart), stop the worker
        after it and end every listener's stream; returns at once."""
        with self.changed:
            self.stopping = True
            for job in self.jobs.values():
                if job.status == "running":
                    job.cancel_requested = True
            self.changed.notify_all()
        self.waiters.wake()

    def stop(self) -> None:
        """request_stop, then wait for the worker to end its last job. Its thread is left parked, not ended: MLX
        keeps a compile cache per thread, and a thread's end releases the Python objects its entries hold (the
        compiled functions this thread traced), which needs the interpreter; an end that races the interpreter's
        own shutdown aborts the process (std::terminate), after a clean stop."""
        self.request_stop()
        if self.worker.is_alive():
            self.worker_done.wait(timeout=60)

    def pending(self) -> int:
        """Jobs accepted and not ended: they run at the next start."""
        return self.queue_store.pending()

    # ---- the worker's side

    def touch(self, job: Job) -> None:
        """Mark a change of the job (under the lock): a new version, and its listeners woken."""
        job.version += 1
        self.changed.notify_all()
        self.waiters.wake(job.id)

    def end(self, job: Job, status: str, *, error: str | None = None, take: str | None = None) -> None:
        """Record a job's end (under the lock) and forget its spec on disk; a failed or cancelled job's uploads
        go too (a take keeps those it was made from, for "again")."""
        job.status, job.error, job.take, job.ended = status, error, take, time.time()
        job.chunks = []  # listeners still streaming read the rest from the take's file
        if status != "done":
            self.queue_store.forget_uploads(job.id)
        self.queue_store.forget(job.id)
        self.touch(job)
        ended = [j for j in self.jobs.values() if j.status in ENDED]
        for old in ended[: max(0, len(ended) - KEPT_JOBS)]:
            del self.jobs[old.id]

    def resume(self) -> None:
        """The jobs accepted by an earlier run that did not end, back in the queue in their order; one that was
        running when the process died is reported failed instead. Specs that fail the checks a submission
        passes are moved to .studio/rejected/ (QueueStore.read)."""
        for job, started in self.queue_store.read():
            self.jobs[job.id] = job
            if started:
                self.end(job, "failed", error="the studio stopped while running this job (did it crash?): "
                                               "submit it again.")
            else:
                self.queue.append(job.id)

    def work(self, load_model: Callable[[], object]) -> None:
        try:
            self.model = load_model()
            self.model_info = describe(self.model)
        except BaseException as e:  # reported by start()
            self.load_error = e
            self.ready.set()
            return
        self.ready.set()
        try:
            self.serve_jobs()
        finally:  # (an error of the worker's own ends its thread, as before: stop does not wait for it)
            self.model = None  # the model's own compiled layers go now, while the interpreter runs
            self.worker_done.set()
        threading.Event().wait()  # parked until the process ends (stop says why)

    def serve_jobs(self) -> None:
        """Run each job as it comes, until the studio stops."""
        while (job := self.next_job()) is not None:
            try:
                take = self.run(job)
            except Cancelled:
                with self.changed:
                    if self.stopping and not job.cancelled_by_user:  # Ctrl-C: it runs again after a restart
                        self.queue_store.write(job, started=False)
                        job.status, job.chunks = "cancelled", []
                        self.touch(job)
                    else:
                        self.end(job, "cancelled")
            except Exception as e:  # a job's failure is its own; the studio goes on
                if not isinstance(e, USER_ERRORS):
                    traceback.print_exc()
                with self.changed:
                    self.end(job, "failed", error=job_error(e, self.output))
            else:
                with self.changed:
                    self.end(job, "done", take=take)

    def next_job(self) -> Job | None:
        """Wait for the next job and mark it running (None: the studio is stopping)."""
        with self.changed:
            self.changed.wait_for(lambda: self.queue or self.stopping)
            if self.stopping:
                return None
            job = self.jobs[self.queue.popleft()]
            job.status, job.started = "running", time.time()
            self.queue_store.write(job, started=True)
            self.touch(job)
            return job

    def run(self, job: Job) -> str:
        """Generate a job's audio, kept chunk by chunk for listeners, then write it as a take."""
        model, s = self.model, job.settings

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
            [s.text] if s.text and s.text.strip() else None, config=s.config, audio_prompt=path(s.audio_prompt),
            melody=path(s.melody), chunk_duration=self.chunk_seconds, progress=progress,
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
        return write_take(self.output, job, np.concatenate(chunks, axis=-1), model.sampling_rate,
                          model_name=self.model_name, adapter=self.adapter)


def tidy_up(store: QueueStore, takes: TakeStore) -> None:
    """What a process killed outright (kill -9, power loss) left in the output folder: its temporaries are
    removed (a live writer's are kept), and audio without its sidecar is named and left (it may be the user's
    own); one line on stderr each."""
    removed = store.clean_temporaries()
    if removed:
        log(f"removed {len(removed)} temporary file(s) left by a killed writer: "
            f"{some_names([p.name for p in removed])}")
    unpaired = takes.unpaired()
    if unpaired:
        log(f"{len(unpaired)} audio file(s) in {takes.folder} have no sidecar (NAME.json), so they are not listed "
            f"as takes: {some_names(unpaired)}; left as they are: remove them if they are not yours.")


def own_uploads(record: dict) -> set[str]:
    """The jobs whose upload folders (.studio/uploads/JOB/) a take owns, by its sidecar: the job that made it
    (studio_job), and the job whose uploads it reused ("again": it names .studio/uploads/JOB/FILE). Any other
    path a sidecar (a file anyone may edit) names is not the take's."""
    owners = {record.get("studio_job")} | {upload_owner(record.get(name)) for name in UPLOADS}
    return {job_id for job_id in owners if valid_job_id(job_id)}


def upload_users(jobs, takes: TakeStore, store: QueueStore) -> set:
    """The jobs whose upload folders are still needed (called under the queue's lock): each of `jobs` waiting,
    running or kept to run after a stop, and those whose uploads they or a take left (for "again") name."""
    waiting = [j for j in jobs if j.status in ("queued", "running") or store.has_spec(j.id)]
    users = {j.id for j in waiting} | {upload_owner(getattr(j.settings, n)) for j in waiting for n in UPLOADS}
    for take in takes.list():
        users |= {take["settings"].get("studio_job")} | {upload_owner(take["settings"].get(n)) for n in UPLOADS}
    return users


def describe(model) -> dict:
    """What the API and the checks need to know of the loaded model."""
    melody = model.config.melody
    return {"family": model.family, "kind": model.shape.kind, "sampling_rate": model.sampling_rate,
            "channels": model.audio_channels,
            "melody": melody is not None, "vocab_size": model.config.decoder.vocab_size,
            "window_seconds": model.shape.window_seconds, "frame_rate": model.frame_rate,
            # the seconds of a melody one window follows (audiocraft's chunk_length: 30)
            "melody_seconds": melody.features.chunk_length if melody is not None else None}


def job_error(error: BaseException, output: Path) -> str:
    """A failed job's error as the API shows it: one line, files in the output folder named by their path in it
    (as the job's settings name its uploads), other absolute paths by their last part, no object addresses, at
    most 500 characters."""
    message = one_line(error)
    for folder in sorted({str(output.absolute()), str(output.resolve())}, key=len, reverse=True):
        message = message.replace(folder.rstrip("/") + "/", "").replace(folder, "the output folder")
    message = re.sub(r"(?<![\w./:])/(?:[^\s'\"/:]+/)+([^\s'\"/:]+)", r"\1", message)
    message = re.sub(r" (object )?at 0x[0-9a-fA-F]+", "", message)
    return message if len(message) <= 500 else message[:497] + "..."


def write_take(output: Path, job: Job, audio: np.ndarray, rate: int, *, model_name: str, adapter: str | None) -> str:
    """A job's audio (channels, samples) as a take in the output folder, with its sidecar as generate.py writes
    it; returns the take's id."""
    s = job.settings
    take = new_take_id(s.text)
    settings = clip_settings(model=model_name, adapter=adapter, config=s.config, batch=[s.text],
                             audio_prompt=s.audio_prompt, melody=s.melody, normalize="none", sampling_rate=rate)
    record = {"text": s.text, "batch_index": 0, **settings, "studio_job": job.id}
    # float WAV (24-bit FLAC) and no normalisation: the take is, sample for sample, what was streamed
    write_clip(output / f"{take}.{s.format}", audio, record, rate, bits="float" if s.format == "wav" else "24",
               normalization="none")
    return take
