"""A real studio server process on a free loopback port, for the studio's tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from slow import runner, slow_steps

ROOT = Path(__file__).resolve().parents[1]


class Studio:
    """`python -m mlx_musicgen.studio` on port 0 (a free port), its URL read from what it prints; `slow`: seconds
    each decoder step sleeps (see slow.slow_steps), so that a long job is still running when a test acts on it."""

    URL = r"studio: (http://127\.0\.0\.1:\d+)/"  # in what it prints: group 1 is its URL

    def __init__(self, model: Path, output: Path, *args: str, slow: float = 0.0):
        self.model, self.output, self.args, self.slow = model, output, args, slow
        self.log = output.parent / f"{output.name}-studio.log"
        self.process = None
        self.url = None
        self.start()

    def start(self) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        start = ["-c", runner(slow_steps(self.slow), module="mlx_musicgen.studio")] if self.slow else \
            ["-m", "mlx_musicgen.studio"]
        command = [sys.executable, *start, "--model", str(self.model), "--port", "0", "--output-dir",
                   str(self.output), *self.args]
        offset = self.log.stat().st_size if self.log.exists() else 0
        self.log_file = self.log.open("a")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)
        deadline = time.time() + 120
        while time.time() < deadline:
            found = re.search(self.URL, self.log.read_text()[offset:])
            if found:
                self.url = found.group(1)
                self.client = httpx.Client(base_url=self.url, timeout=60)
                return
            if self.process.poll() is not None:
                raise RuntimeError(f"the studio exited: {self.log.read_text()[offset:]}")
            time.sleep(0.1)
        raise TimeoutError(f"the studio did not start: {self.log.read_text()[offset:]}")

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        """Ctrl-C (SIGINT), as a user stops it; returns the exit code."""
        self.process.send_signal(sig)
        code = self.process.wait(timeout=timeout)
        self.log_file.close()
        self.client.close()
        return code

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024

    def wait(self, job_id: str, timeout: float = 120) -> dict:
        """Poll a job until it ends."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.client.get(f"/api/jobs/{job_id}").json()
            if job["status"] in ("done", "failed", "cancelled"):
                return job
            time.sleep(0.05)
        raise TimeoutError(f"job {job_id} did not end")
