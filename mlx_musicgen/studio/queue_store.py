"""The queue on disk: every accepted job's spec in OUTPUT/.studio/queue/ until it ends, so that a job accepted
before a restart (or a Ctrl-C that cancelled it mid-way) runs after it, and the uploads of the jobs in
OUTPUT/.studio/uploads/JOB/ (kept while a take names them)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .. import atomic
from .job import Job
from .settings import JobSettings

STATE_FOLDER = ".studio"


class QueueStore:
    def __init__(self, output: Path):
        self.output = output
        self.state = output / STATE_FOLDER
        self.specs = self.state / "queue"
        self.uploads = self.state / "uploads"

    def prepare(self) -> None:
        self.specs.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    # ---- the specs

    def write(self, job: Job, started: bool) -> None:
        """The job's spec, until it ends; `started` marks one being run (if the process dies with it, the next
        start does not run it again: it may be what killed the process)."""
        spec = {"id": job.id, "created": job.created, "settings": job.settings.as_dict(), "started": started}
        atomic.write_text(self.specs / f"{job.id}.json", json.dumps(spec))

    def read(self) -> list[tuple[Job, bool]]:
        """The jobs of the specs left by an earlier run, in the order they were accepted, each with whether it
        was running; a file that is not a spec this version wrote is removed."""
        jobs = []
        for file in self.specs.glob("*.json"):
            try:
                spec = json.loads(file.read_text())
                settings = JobSettings.from_dict(spec["settings"])
                job = Job(spec["id"], settings, spec["created"], seconds_total=settings.config.duration)
                jobs.append((job, bool(spec.get("started"))))
            except (OSError, ValueError, KeyError, TypeError):
                file.unlink(missing_ok=True)
        return sorted(jobs, key=lambda item: (item[0].created, item[0].id))

    def forget(self, job_id: str) -> None:
        (self.specs / f"{job_id}.json").unlink(missing_ok=True)

    def pending(self) -> int:
        """Jobs accepted and not ended: they run at the next start."""
        return len(list(self.specs.glob("*.json")))

    # ---- the uploads

    def upload_folder(self, job_id: str) -> Path:
        return self.uploads / job_id

    def forget_uploads(self, job_id: str) -> None:
        shutil.rmtree(self.upload_folder(job_id), ignore_errors=True)

    def checked_upload(self, relative: str) -> str:
        """An upload a take names (its path relative to the output folder), if it is one of ours and is still
        there: a sidecar cannot point the studio at another file."""
        path = (self.output / relative).resolve()
        if not path.is_relative_to(self.uploads.resolve()) or not path.is_file():
            raise ValueError(f"{relative} is not an upload of this studio's (or it was removed): upload it again.")
        return str(path.relative_to(self.output.resolve()))

    def remove_upload(self, relative: str) -> None:
        """The upload a take names, and its job's other uploads with it; nothing if it is not one of ours."""
        try:
            folder = Path(self.checked_upload(relative)).parent
        except ValueError:
            return
        shutil.rmtree(self.output / folder, ignore_errors=True)
