"""The queue on disk: every accepted job's spec in OUTPUT/.studio/queue/JOB.json until it ends, so that a job
accepted before a restart (or a Ctrl-C that cancelled it mid-way) runs after it, and the uploads of the jobs in
OUTPUT/.studio/uploads/JOB/ (kept while a take names them).

Whatever is found in these folders at start is checked as a submission is, and never trusted: a spec that is
not one this version wrote (a folder or link by its name, unreadable, too large, not JSON, an id that is not
its file's name, settings a submission would refuse, an upload outside the uploads folder) is moved to
OUTPUT/.studio/rejected/, with a line on stderr saying why; links are moved, never followed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import secrets
import shutil
import stat
import sys
import time
from pathlib import Path

from .. import atomic
from ..cli import one_line
from ..settings import GenerationConfig, is_real
from .job import Job
from .settings import GENERATION, UPLOADS, JobSettings, parse_number

# settings whose null means "the model's own" (a MAGNeT job's stride): kept null in a spec
MODEL_CHOSEN = {f.name for f in dataclasses.fields(GenerationConfig) if f.default is None}

STATE_FOLDER = ".studio"
JOB_ID = re.compile(r"[0-9a-f]{32}")  # uuid4().hex: what new_job_id makes and the API accepts
MAX_SPEC_BYTES = 64 * 2**10  # a spec this version writes is under 30 KB: 2000 characters of text, escaped
SPEC_KEYS = ("id", "created", "settings", "started")
SHOWN = 80  # characters of a bad value quoted in a message
MAX_REASON = 200  # characters of a rejection's reason in the log line


def valid_job_id(value) -> bool:
    return isinstance(value, str) and bool(JOB_ID.fullmatch(value))


def shown(value) -> str:
    """A value as a message quotes it: its repr, cut to SHOWN characters."""
    text = repr(value)
    return text if len(text) <= SHOWN else f"{text[: SHOWN - 3]}..."


def log(message: str) -> None:
    """One line on stderr (names read from the disk are quoted with ascii(), so even theirs stays one line)."""
    print(f"studio: {message}", file=sys.stderr, flush=True)


def upload_owner(relative) -> str | None:
    """The job whose upload folder holds `relative` (a path relative to the output folder, exactly as
    keep_uploads names an upload: .studio/uploads/JOB/FILE), or None for any other path or value."""
    if not isinstance(relative, str):
        return None
    parts = relative.split("/")
    if len(parts) == 4 and parts[:2] == [STATE_FOLDER, "uploads"] and valid_job_id(parts[2]) \
            and parts[3] and not parts[3].startswith("."):
        return parts[2]
    return None


def is_kind(path: Path, kind: int) -> bool:
    """Whether `path` itself (a link is not followed) is of `kind` (stat.S_IFREG, stat.S_IFDIR)."""
    try:
        return stat.S_IFMT(os.lstat(path).st_mode) == kind
    except (OSError, ValueError):  # missing, unreadable, or a name holding NUL
        return False


def read_small_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused (ValueError) if it is a link (never followed), a folder, a pipe or
    anything but a plain file, or larger than `limit` bytes."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise ValueError("it is a symbolic link (never followed)")
    if not stat.S_ISREG(info.st_mode):
        raise ValueError("it is not a plain file (a folder, a pipe or a device)")
    # O_NOFOLLOW, O_NONBLOCK: it may have been swapped for a link or a pipe since the lstat
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("it is not a plain file")
        data = file.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"it is larger than {limit // 1024} KiB, more than a spec ever is")
    return data


class QueueStore:
    def __init__(self, output: Path):
        self.output = output
        self.state = output / STATE_FOLDER
        self.specs = self.state / "queue"
        self.uploads = self.state / "uploads"
        self.rejected = self.state / "rejected"

    def prepare(self) -> None:
        """The studio's folders, made if missing. One that is not a real folder (a link, which could lead the
        studio's writes and removals out of the output folder, or a file) is moved aside first."""
        for folder in (self.state, self.specs, self.uploads, self.rejected):
            if os.path.lexists(folder) and not is_kind(folder, stat.S_IFDIR):
                aside = folder.with_name(f"{folder.name}.not-a-folder-{time.strftime('%Y%m%d-%H%M%S')}-"
                                         f"{secrets.token_hex(3)}")
                os.rename(folder, aside)  # the link itself moves; what it points to is not touched
                log(f"{folder.relative_to(self.output)} was not a folder (a link or a file): moved to "
                    f"{aside.relative_to(self.output)}")
            folder.mkdir(exist_ok=True)

    def clean_temporaries(self) -> list[Path]:
        """Remove the temporaries (.NAME.PID.RANDOM.part) that writers killed outright (kill -9, power loss)
        left in the output and queue folders, those of live processes kept; returns what was removed."""
        return [path for folder in (self.output, self.specs) for path in atomic.clean_stale_in(folder)]

    # ---- the specs

    def write(self, job: Job, started: bool) -> None:
        """The job's spec, until it ends; `started` marks one being run (if the process dies with it, the next
        start does not run it again: it may be what killed the process)."""
        spec = {"id": job.id, "created": job.created, "settings": job.settings.as_dict(), "started": started}
        atomic.write_text(self.specs / f"{job.id}.json", json.dumps(spec))

    def read(self) -> list[tuple[Job, bool]]:
        """The jobs of the specs left by an earlier run, in the order they were accepted, each with whether it
        was running. Anything else in the queue folder is rejected (moved to .studio/rejected/, and logged);
        hidden names are atomic's temporaries, left to clean_temporaries (a live writer's are kept)."""
        jobs = []
        for name in sorted(os.listdir(self.specs)):
            if name.startswith("."):
                continue
            try:
                jobs.append(self.read_spec(name))
            except Exception as e:  # whatever a hostile file makes the checks raise, the file is refused
                self.reject(name, e)
        return sorted(jobs, key=lambda item: (item[0].created, item[0].id))

    def read_spec(self, name: str) -> tuple[Job, bool]:
        """The job of the spec file `name` in the queue folder and whether it was running, checked as a
        submission is (ValueError, or whatever the checks raise, with the reason)."""
        job_id = name.removesuffix(".json")
        if not name.endswith(".json") or not valid_job_id(job_id):
            raise ValueError("its name is not JOB.json, JOB a job id of 32 lowercase hex digits")
        try:
            spec = json.loads(read_small_file(self.specs / name, MAX_SPEC_BYTES).decode("utf-8"))
        except UnicodeDecodeError:
            raise ValueError("it is not UTF-8 text") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"it is not JSON ({e})") from None
        if not isinstance(spec, dict) or not set(SPEC_KEYS[:3]) <= set(spec) <= set(SPEC_KEYS):
            raise ValueError(f"it is not a spec: a JSON object of {', '.join(SPEC_KEYS)}")
        if spec["id"] != job_id:
            raise ValueError(f"its id {shown(spec['id'])} is not its file's name")
        created, started = spec["created"], spec.get("started", False)
        if not (is_real(created) and math.isfinite(created)):
            raise ValueError(f"its created must be a number (a time), got {shown(created)}")
        if not isinstance(started, bool):
            raise ValueError(f"its started must be true or false, got {shown(started)}")
        settings = self.checked_settings(spec["settings"])
        return Job(job_id, settings, float(created), seconds_total=settings.config.duration), started

    def checked_settings(self, values) -> JobSettings:
        """A spec's settings (as_dict's object), checked as a submission's are: each number of its setting's
        type (a string is refused: a spec holds numbers), the text a string, the ranges by check(), and each
        upload one of this studio's (ValueError, TypeError for an unknown setting)."""
        if not isinstance(values, dict):
            raise ValueError(f"its settings must be an object, got {shown(values)}")
        values = dict(values)
        for name, value in values.items():
            if name in GENERATION and (value is not None or name not in MODEL_CHOSEN):
                if isinstance(value, str):
                    raise ValueError(f"{name} must be a number, got {shown(value)}")
                values[name] = parse_number(name, value, GENERATION[name].kind)
        if values.get("text") is not None and not isinstance(values["text"], str):
            raise ValueError(f"text must be text, got {shown(values['text'])}")
        settings = JobSettings.from_dict(values)
        settings.check()
        for name in UPLOADS:
            if getattr(settings, name) is not None:
                setattr(settings, name, self.checked_upload(getattr(settings, name)))
        return settings

    def reject(self, name: str, error: BaseException) -> None:
        """Move the queue folder's entry `name` (a file, folder or link: moved, never followed) to
        .studio/rejected/ under a new name that cannot leave it, and say why in one line."""
        reason = one_line(error)[:MAX_REASON]
        safe = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]  # no separator, and it cannot be "." or ".."
        target = self.rejected / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(4)}-{safe}"
        try:
            os.rename(self.specs / name, target)  # both under .studio: one filesystem, and nothing is copied
        except OSError as e:
            log(f"queue file {ascii(name)} is not a job ({reason}) and could not be moved ({one_line(e)}): "
                f"it is ignored; remove it.")
            return
        log(f"queue file {ascii(name)} rejected: {reason}; moved to {target.relative_to(self.output)}")

    def forget(self, job_id: str) -> None:
        if valid_job_id(job_id):
            (self.specs / f"{job_id}.json").unlink(missing_ok=True)

    def has_spec(self, job_id: str) -> bool:
        """Whether the job is kept to run (also after a stop cancelled it: it runs at the next start)."""
        return valid_job_id(job_id) and is_kind(self.specs / f"{job_id}.json", stat.S_IFREG)

    def pending(self) -> int:
        """Jobs accepted and not ended: they run at the next start."""
        return sum(1 for p in self.specs.glob("*.json") if valid_job_id(p.stem))

    # ---- the uploads

    def upload_folder(self, job_id: str) -> Path:
        return self.uploads / job_id

    def forget_uploads(self, job_id: str) -> None:
        """Remove a job's own upload folder (.studio/uploads/JOB/); nothing for anything but a job id. rmtree
        refuses a link and does not follow those inside: nothing outside the folder goes."""
        if valid_job_id(job_id):
            shutil.rmtree(self.upload_folder(job_id), ignore_errors=True)

    def checked_upload(self, relative) -> str:
        """An upload a spec or take names (its path relative to the output folder), if it is one of ours,
        .studio/uploads/JOB/FILE as keep_uploads names it, and is still there as a plain file: a sidecar or a
        spec cannot point the studio at another file (ValueError)."""
        job_id = upload_owner(relative)
        if job_id is None or not is_kind(self.upload_folder(job_id), stat.S_IFDIR) \
                or not is_kind(self.output / relative, stat.S_IFREG):
            raise ValueError(f"{shown(relative)} is not an upload of this studio's (or it was removed): upload it "
                             f"again.")
        return relative


def some_names(names: list, most: int = 10) -> str:
    """The first `most` names of a list for a log line, each quoted with ascii() (one line, whatever they hold)."""
    shown_names = ", ".join(ascii(str(name)) for name in names[:most])
    return shown_names + (f" and {len(names) - most} more" if len(names) > most else "")
