"""The studio's own files, found at start as an attacker or a kill -9 may leave them (issue 22: defects 7-9),
through real server processes on prepared output folders: hostile queue files are moved to .studio/rejected/
with a logged reason and the studio starts; nothing outside the output folder is touched; temporaries of dead
writers go; deleting a take removes its own files and uploads only."""

import hashlib
import json
import os
import subprocess

import numpy as np
import soundfile as sf

from studio import Studio

A, B, C, D, E, F, G, H, I, J, K, L = (f"{c}" * 32 for c in "abcdef0123456789"[:12])
TONE = 0.3 * np.sin(np.arange(320, dtype="float32") / 5)  # 10 ms of sound at 32 kHz: a prompt that is not silent


def spec(job_id: str, created=1.0, started=False, **settings) -> str:
    """A queue file's text, as QueueStore.write writes it (settings: as_dict's, or a part of them)."""
    return json.dumps({"id": job_id, "created": created, "started": started,
                       "settings": {"text": "ok", "duration": 0.02, **settings}})


def outside(tmp_path, output) -> dict:
    """Every path under tmp_path but the output folder and the studio's log, with its content's hash: what a
    run must leave as it was."""
    seen = {}
    for folder, folders, files in os.walk(tmp_path):
        folders[:] = [f for f in folders if os.path.join(folder, f) != str(output)]
        for name in files + folders:
            path = os.path.join(folder, name)
            if not name.endswith("-studio.log"):
                seen[path] = "folder" if os.path.isdir(path) else hashlib.sha1(open(path, "rb").read()).hexdigest()
    return seen


def make_hostile_queue(queue, tmp_path) -> dict[str, str]:
    """Hostile entries in a queue folder -> {entry's name: words of the reason logged for it}; one good spec
    (A) beside them, which runs."""
    (tmp_path / "victim").mkdir()
    (tmp_path / "victim" / "precious.txt").write_text("keep me")
    (tmp_path / "secret.json").write_text(spec(G))
    (queue / f"{A}.json").write_text(spec(A, 1.0))
    (queue / "x.json").mkdir()
    (queue / f"{B}.json").write_text(spec(B, "2"))  # with A's 1.0: mixed types, which sorting could not compare
    (queue / f"{C}.json").write_text("{not json")
    (queue / "evil.json").write_text(spec("../../../victim", started=True))  # its uploads: tmp_path / victim
    (queue / f"{D}.json").write_text(spec(E))
    (queue / f"{F}.json").write_text(spec(F, duration="0.02"))
    (queue / f"{G}.json").symlink_to(tmp_path / "secret.json")
    (queue / f"{H}.json").write_bytes(b'{"id": "\xff\xfe"}')
    (queue / f"{I}.json").write_text("[1, 2]")
    (queue / f"{J}.json").write_text(spec(J)[:-2] + " " * 2**20 + "}}")
    (queue / f"{K}.json").write_text(spec(K, audio_prompt=".studio/uploads/../../../secret.json"))
    (queue / f"{L}.json").write_text(spec(L, text=5))
    return {"x.json": "its name is not JOB.json", f"{B}.json": "its created must be a number",
            f"{C}.json": "it is not JSON", "evil.json": "its name is not JOB.json",
            f"{D}.json": "is not its file's name", f"{F}.json": "duration must be a number, got '0.02'",
            f"{G}.json": "symbolic link (never followed)", f"{H}.json": "it is not UTF-8 text",
            f"{I}.json": "it is not a spec", f"{J}.json": "it is larger than 64 KiB",
            f"{K}.json": "is not an upload of this studio's", f"{L}.json": "text must be text"}


def test_hostile_queue_files_are_rejected_and_the_studio_starts(tiny, tmp_path):
    output = tmp_path / "takes"
    queue = output / ".studio" / "queue"
    queue.mkdir(parents=True)
    reasons = make_hostile_queue(queue, tmp_path)
    untouched = outside(tmp_path, output)
    server = Studio(tiny.folder, output)
    try:
        listed = server.client.get("/api/jobs")
        assert listed.status_code == 200 and [j["id"] for j in listed.json()] == [A]
        assert server.wait(A)["status"] == "done"
        assert len(server.client.get("/api/takes").json()) == 1  # none of the hostile specs ran
    finally:
        server.stop()
    log = server.log.read_text().splitlines()
    rejected = os.listdir(output / ".studio" / "rejected")
    for name, reason in reasons.items():
        assert [r for r in rejected if r.endswith(f"-{name}")], f"{name} is not in .studio/rejected/"
        assert [line for line in log if f"queue file {name!r} rejected: " in line and reason in line], name
    assert os.listdir(queue) == []
    assert (output / ".studio" / "rejected").is_dir() and not (output / ".studio" / "rejected").is_symlink()
    assert outside(tmp_path, output) == untouched  # the victim folder and the linked secret are as they were


def test_temporaries_of_dead_writers_go_and_audio_without_sidecar_is_named(tiny, tmp_path):
    output = tmp_path / "takes"
    queue = output / ".studio" / "queue"
    queue.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its PID now belongs to no process
    dead_temporaries = [output / f".20240101-000000-take-abcdef.wav.{dead.pid}.abcd1234.part",
                        queue / f".{A}.json.{dead.pid}.ijkl9012.part"]
    live = output / f".20240101-000001-take-fedcba.wav.{os.getpid()}.efgh5678.part"  # this test's: alive
    for path in (*dead_temporaries, live):
        path.write_bytes(b"half written")
    unpaired = output / "20240101-000002-take-012345.wav"  # a take killed between its audio and its sidecar
    sf.write(unpaired, TONE, 32000)
    server = Studio(tiny.folder, output)
    try:
        assert server.client.get("/api/jobs").status_code == 200
        assert server.client.get("/api/takes").json() == []
    finally:
        server.stop()
    assert not any(p.exists() for p in dead_temporaries)
    assert live.exists() and unpaired.exists()  # audio without its sidecar is named at start, and left
    log = server.log.read_text()
    assert "removed 2 temporary file(s) left by a killed writer" in log
    assert f"have no sidecar (NAME.json), so they are not listed as takes: {unpaired.name!r}" in log


def test_deleting_a_take_removes_its_own_files_and_uploads_only(tiny, tmp_path):
    """A sidecar naming .studio/uploads/stray.wav, or claiming a waiting job as its own, removes no upload but
    the take's own (its job's folder); the waiting job still runs with its upload."""
    output = tmp_path / "takes"
    uploads, queue = output / ".studio" / "uploads", output / ".studio" / "queue"
    for folder in (queue, uploads / D, uploads / E):
        folder.mkdir(parents=True)
    sf.write(uploads / "stray.wav", TONE, 32000)
    sf.write(uploads / D / "audio_prompt.wav", TONE, 32000)  # the stray take's own upload
    sf.write(uploads / E / "audio_prompt.wav", TONE, 32000)  # the waiting job's
    (queue / f"{F}.json").write_text(spec(F, 1.0, duration=1.4))  # runs long (slow steps): E waits behind it
    (queue / f"{E}.json").write_text(spec(E, 2.0, audio_prompt=f".studio/uploads/{E}/audio_prompt.wav"))
    for take, record in (("stray-take", {"audio_prompt": ".studio/uploads/stray.wav", "studio_job": D}),
                         ("claims-waiting", {"audio_prompt": f".studio/uploads/{E}/audio_prompt.wav",
                                             "studio_job": E})):
        sf.write(output / f"{take}.wav", TONE, 32000)
        (output / f"{take}.json").write_text(json.dumps({"text": "x", **record}))
    server = Studio(tiny.folder, output, slow=0.05)
    try:
        assert server.client.get(f"/api/jobs/{E}").json()["status"] == "queued"
        for take in ("stray-take", "claims-waiting"):
            assert server.client.delete(f"/api/takes/{take}").status_code == 204
            assert not (output / f"{take}.wav").exists() and not (output / f"{take}.json").exists()
        assert (uploads / "stray.wav").is_file() and (uploads / E / "audio_prompt.wav").is_file()
        assert not (uploads / D).exists()
        assert server.client.get(f"/api/jobs/{E}").json()["status"] == "queued"
        server.client.delete(f"/api/jobs/{F}")
        ended = server.wait(E, timeout=300)
        assert ended["status"] == "done", ended["error"]
    finally:
        server.stop()
