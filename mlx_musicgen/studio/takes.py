"""The takes of the studio: finished clips in the output folder, each an audio file (NAME.wav or NAME.flac)
with its settings beside it (NAME.json), written exactly as generate.py writes them. The folder is the store:
takes made by generate.py into it, and after a restart, are listed too."""

from __future__ import annotations

import json
import re
import secrets
import time
from pathlib import Path

import numpy as np
import soundfile as sf

TAKE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,99}$")  # a file stem: no dots, no separators, no traversal
FORMATS = ("wav", "flac")


def valid_take_id(take_id: str) -> bool:
    return bool(TAKE_ID.fullmatch(take_id))


def new_take_id(text: str | None) -> str:
    """A take's id and file stem: the time it was made, a few words of its text, a random suffix."""
    words = re.sub(r"[^a-z0-9]+", "-", (text or "unconditional").lower()).strip("-")[:32].strip("-")
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{words or 'take'}-{secrets.token_hex(3)}"


class TakeStore:
    def __init__(self, folder: Path):
        self.folder = folder

    def audio_path(self, take_id: str) -> Path | None:
        """The take's audio file, or None for an invalid id or a take that does not exist."""
        if not valid_take_id(take_id):
            return None
        for kind in FORMATS:
            path = self.folder / f"{take_id}.{kind}"
            if path.is_file() and (self.folder / f"{take_id}.json").is_file():
                return path
        return None

    def settings(self, take_id: str) -> dict | None:
        """The take's sidecar JSON (its settings, as generate.py records them), or None."""
        if self.audio_path(take_id) is None:
            return None
        try:
            record = json.loads((self.folder / f"{take_id}.json").read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) else None

    def summary(self, take_id: str) -> dict | None:
        path, record = self.audio_path(take_id), self.settings(take_id)
        if path is None or record is None:
            return None
        return {"id": take_id, "format": path.suffix[1:], "created": path.stat().st_mtime, "settings": record,
                "audio": f"/api/takes/{take_id}/audio"}

    def list(self) -> list[dict]:
        """Every take in the folder, newest first."""
        takes = (self.summary(p.stem) for p in self.folder.glob("*.json") if valid_take_id(p.stem))
        return sorted((t for t in takes if t is not None), key=lambda t: (t["created"], t["id"]), reverse=True)

    def delete(self, take_id: str) -> bool:
        """Remove the take's own two files, its audio and its sidecar (a link is removed, not what it leads to);
        False for no such take."""
        path = self.audio_path(take_id)
        if path is None:
            return False
        path.unlink(missing_ok=True)
        (self.folder / f"{take_id}.json").unlink(missing_ok=True)
        return True

    def unpaired(self) -> list[str]:
        """The names of the audio files (NAME.wav, NAME.flac) in the folder without their sidecar NAME.json:
        not takes, so not listed; a kill between a take's two writes leaves one (the audio is written first).
        They may also be the user's own files, so the studio names them at start and leaves them."""
        audio = (p for kind in FORMATS for p in self.folder.glob(f"*.{kind}") if not p.name.startswith("."))
        return sorted(p.name for p in audio if p.is_file() and not p.with_suffix(".json").exists())

    def peaks(self, take_id: str, points: int) -> dict | None:
        """A waveform picture's data: the lowest and highest sample of each of `points` stretches, channels
        mixed."""
        path = self.audio_path(take_id)
        if path is None:
            return None
        audio, rate = sf.read(str(path), dtype="float32", always_2d=True)
        mono = audio.mean(axis=1)
        edges = np.linspace(0, mono.size, points + 1).astype(int)
        lows = [float(mono[a:b].min()) if b > a else 0.0 for a, b in zip(edges, edges[1:])]
        highs = [float(mono[a:b].max()) if b > a else 0.0 for a, b in zip(edges, edges[1:])]
        return {"seconds": mono.size / rate, "low": lows, "high": highs}
