"""The studio's HTTP API through a real server process on a free loopback port, with the tiny random model (its
codec makes 1000 frames a second, so a few tenths of a second is hundreds of decoding steps)."""

import io
import json
import threading
import time

import numpy as np
import pytest
import soundfile as sf

from studio import Studio

TAKE_FILES = ("*.wav", "*.flac", "*.json")


@pytest.fixture(scope="module")
def studio(tiny, tmp_path_factory):
    server = Studio(tiny.folder, tmp_path_factory.mktemp("studio") / "takes", "--chunk", "0.02", slow=0.02)
    yield server
    if server.process.poll() is None:
        server.stop()


def take_files(studio) -> set[str]:
    return {p.name for pattern in TAKE_FILES for p in studio.output.glob(pattern)}


def events(studio, job_id: str) -> list[dict]:
    """The job's server-sent events until it ends."""
    seen = []
    with studio.client.stream("GET", f"/api/jobs/{job_id}/events") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    return seen


def read_wav_stream(studio, job_id: str) -> tuple[np.ndarray, int]:
    """The streamed float WAV -> ((samples, channels), rate)."""
    with studio.client.stream("GET", f"/api/jobs/{job_id}/audio") as response:
        assert response.status_code == 200 and response.headers["content-type"] == "audio/wav"
        data = b"".join(response.iter_bytes())
    assert data[:4] == b"RIFF" and data[8:12] == b"WAVE"
    offset = 12
    while data[offset : offset + 4] != b"data":
        offset += 8 + int.from_bytes(data[offset + 4 : offset + 8], "little")
    fmt = data.index(b"fmt ") + 8
    channels = int.from_bytes(data[fmt + 2 : fmt + 4], "little")
    rate = int.from_bytes(data[fmt + 4 : fmt + 8], "little")
    samples = np.frombuffer(data[offset + 8 :], dtype="<f4")
    return samples.reshape(-1, channels), rate


def submit(studio, **fields):
    return studio.client.post("/api/jobs", json=fields)


def test_a_job_runs_reports_progress_and_becomes_a_take(studio):
    response = submit(studio, text="80s pop track", duration=0.12, seed=5)
    assert response.status_code == 202
    job = response.json()
    assert set(job) == {"id", "status", "position"} and job["status"] in ("queued", "running")
    seen = events(studio, job["id"])
    done = [e["progress"]["seconds_done"] for e in seen]
    assert done == sorted(done) and len(seen) >= 3  # several progress events, never backwards
    last = seen[-1]
    assert last["status"] == "done" and last["progress"]["seconds_done"] == last["progress"]["seconds_total"] == 0.12
    assert last["progress"]["realtime_factor"] > 0
    take = last["take"]
    settings = studio.client.get(f"/api/takes/{take}").json()
    assert settings == json.loads((studio.output / f"{take}.json").read_text())  # the sidecar, as generate.py's
    assert (settings["text"], settings["seed"], settings["duration"], settings["top_k"]) == ("80s pop track", 5,
                                                                                          0.12, 250)
    audio, rate = sf.read(io.BytesIO(studio.client.get(f"/api/takes/{take}/audio").content), dtype="float32")
    assert rate == 32000 and audio.shape[0] == 120 * 32
    assert studio.client.get("/api/takes").json()[0]["id"] == take
    peaks = studio.client.get(f"/api/takes/{take}/peaks", params={"points": 50}).json()
    assert len(peaks["low"]) == len(peaks["high"]) == 50 and peaks["seconds"] == pytest.approx(0.12)


def test_the_streamed_audio_is_the_take_sample_for_sample(studio):
    job = submit(studio, text="techno kick", duration=0.3, seed=2).json()
    streamed, rate = read_wav_stream(studio, job["id"])  # asked for at once: from the first chunk on
    take = studio.wait(job["id"])["take"]
    saved, saved_rate = sf.read(studio.output / f"{take}.wav", dtype="float32", always_2d=True)
    assert rate == saved_rate == 32000
    assert streamed.shape == saved.shape == (300 * 32, 1)
    np.testing.assert_array_equal(streamed, saved)
    # once done, the same address serves the take's file
    late = sf.read(io.BytesIO(studio.client.get(f"/api/jobs/{job['id']}/audio").content), dtype="float32",
                   always_2d=True)[0]
    np.testing.assert_array_equal(late, saved)


def test_the_same_seed_makes_the_same_take(studio):
    takes = [studio.wait(submit(studio, text="lofi", duration=0.05, seed=9).json()["id"])["take"] for _ in range(2)]
    first, second = (sf.read(studio.output / f"{t}.wav", dtype="float32")[0] for t in takes)
    np.testing.assert_array_equal(first, second)


def test_cancelling_mid_job_leaves_nothing(studio):
    before = take_files(studio)
    job = submit(studio, text="ambient pads", duration=1.4).json()
    deadline = time.time() + 60
    while (status := studio.client.get(f"/api/jobs/{job['id']}").json())["progress"]["seconds_done"] < 0.05:
        assert time.time() < deadline and status["status"] in ("queued", "running"), status
        time.sleep(0.02)
    assert studio.client.delete(f"/api/jobs/{job['id']}").status_code == 200
    ended = studio.wait(job["id"])
    assert ended["status"] == "cancelled" and ended["take"] is None
    assert 0 < ended["progress"]["seconds_done"] < 1.4
    time.sleep(0.2)
    assert take_files(studio) == before
    assert not list(studio.output.glob(".*.part")) and not list((studio.output / ".studio" / "queue").iterdir())


def test_jobs_run_one_at_a_time_in_order(studio):
    ids = [submit(studio, text=f"rock {i}", duration=0.05, seed=i).json()["id"] for i in range(4)]
    positions = [studio.client.get(f"/api/jobs/{i}").json()["position"] for i in ids]
    ended = [studio.wait(i) for i in ids]
    assert all(job["status"] == "done" for job in ended)
    assert [j["started"] for j in ended] == sorted(j["started"] for j in ended)
    for earlier, later in zip(ended, ended[1:]):
        assert earlier["ended"] <= later["started"]  # never two at once
    assert positions == sorted(positions)
    listed = [t["id"] for t in studio.client.get("/api/takes").json()]
    assert listed[:4] == [j["take"] for j in reversed(ended)]  # newest first


def cli_message(tmp_path, *args) -> str:
    """What generate.py says for the same bad value (before it loads a model)."""
    import subprocess
    import sys

    from studio import ROOT

    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(tmp_path / "none"),
                             "--output", str(tmp_path / "x.wav"), *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 2
    return result.stderr.strip().removeprefix("error: ")


@pytest.mark.parametrize("fields, cli", [
    ({"duration": -1}, ("--duration", -1)),
    ({"duration": 4000}, ("--duration", 4000)),
    ({"top_p": 1.5}, ("--top-p", 1.5)),
    ({"temperature": -1}, ("--temperature", -1)),
    ({"guidance_scale": 1000}, ("--guidance-scale", 1000)),
    ({"duration": 45, "extend_stride": 30}, ("--duration", 45, "--extend-stride", 30)),
])
def test_bad_values_get_the_cli_message(studio, tmp_path, fields, cli):
    response = submit(studio, text="rock", **fields)
    assert response.status_code == 422
    assert response.json()["detail"] == cli_message(tmp_path, *cli)


@pytest.mark.parametrize("fields, message", [
    ({"top_k": 5000}, "top_k must be between 0 (off) and the vocabulary size 2048, got 5000."),
    ({"format": "mp3"}, "format must be wav or flac, got 'mp3'."),
    ({"duration": "long"}, "duration must be a number, got 'long'."),
    ({"seed": 1.5}, "seed must be a whole number, got 1.5."),
    ({"text": 3}, "text must be text, got 3."),
    ({"voice": "yes"}, "unknown field(s) voice"),
    ({"audio_prompt": "/etc/passwd"}, "audio_prompt: send the audio as a file, in a multipart form."),
    ({"text": "x" * 3000}, "text is 3000 characters long; at most 2000."),
    ({"duration": 2.0}, "extend_stride must be below the window (1.5 s) for music longer than it, got 18.0."),
])
def test_bad_values_are_422_with_a_message(studio, fields, message):
    response = submit(studio, **fields)
    assert response.status_code == 422
    assert response.json()["detail"].startswith(message)


def test_numbers_past_a_double_are_422(studio):
    response = studio.client.post("/api/jobs", content='{"duration": 1' + "0" * 400 + "}",
                                  headers={"content-type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"].startswith("duration must be a number")


def wav_bytes(samples: np.ndarray, rate: int = 32000) -> bytes:
    out = io.BytesIO()
    sf.write(out, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


def test_uploads_are_checked_as_the_cli_checks_files(studio):
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(800) / 32000)
    cases = [
        ({"audio_prompt": ("riff.wav", wav_bytes(np.zeros(800)), "audio/wav")}, 422,
         "audio prompt riff.wav is silent (its peak is below -100 dBFS)"),
        ({"audio_prompt": ("riff.wav", b"not audio", "audio/wav")}, 422, "cannot read audio prompt riff.wav as audio"),
        ({"audio_prompt": ("riff.exe", wav_bytes(tone), "audio/wav")}, 422, "audio prompt riff.exe: send a wav"),
        ({"audio_prompt": ("long.wav", wav_bytes(np.tile(tone, 80)), "audio/wav")}, 422,
         "audio prompt long.wav is 2.00 s long, but the model's window is 1.50 s"),
        ({"melody": ("tune.wav", wav_bytes(tone), "audio/wav")}, 422, "this model has no melody conditioning"),
        ({"other": ("x.wav", wav_bytes(tone), "audio/wav")}, 422, "unexpected file field 'other'"),
    ]
    for files, status, message in cases:
        response = studio.client.post("/api/jobs", data={"text": "rock", "duration": "0.05"}, files=files)
        assert response.status_code == status, response.text
        assert response.json()["detail"].startswith(message), response.json()
    assert not list((studio.output / ".studio" / "uploads").iterdir())  # refused uploads are not kept


def test_an_audio_prompt_upload_is_continued(studio):
    rng = np.random.default_rng(0)
    prompt = (0.1 * rng.standard_normal(20 * 32)).astype(np.float32)  # 20 frames
    response = studio.client.post("/api/jobs", data={"text": "jazz", "duration": "0.05", "seed": "1"},
                                  files={"audio_prompt": ("riff.wav", wav_bytes(prompt), "audio/wav")})
    assert response.status_code == 202, response.text
    job = studio.wait(response.json()["id"])
    settings = studio.client.get(f"/api/takes/{job['take']}").json()
    assert settings["audio_prompt"].startswith(".studio/uploads/") and settings["audio_prompt"].endswith("wav")
    audio = sf.read(studio.output / f"{job['take']}.wav", dtype="float32")[0]
    assert audio.shape[0] == 50 * 32
    again = studio.client.post(f"/api/takes/{job['take']}/again")  # with the same upload, a new seed
    assert again.status_code == 202
    second = studio.wait(again.json()["id"])
    record = studio.client.get(f"/api/takes/{second['take']}").json()
    assert record["audio_prompt"] == settings["audio_prompt"] and record["seed"] != settings["seed"]
    upload = (studio.output / settings["audio_prompt"]).parent
    assert studio.client.delete(f"/api/takes/{job['take']}").status_code == 204
    assert upload.is_dir()  # the second take still names it
    assert studio.client.delete(f"/api/takes/{second['take']}").status_code == 204
    assert not upload.exists()


def test_unknown_and_hostile_ids_are_404(studio):
    for path in ("/api/jobs/0123456789abcdef0123456789abcdef", "/api/jobs/nope", "/api/jobs/nope/audio",
                 "/api/jobs/nope/events", "/api/takes/nope", "/api/takes/nope/audio", "/api/takes/..%2Fconfig",
                 "/api/takes/..%2F..%2Fetc%2Fpasswd/audio", "/api/takes/.studio/audio", "/api/takes/%2Fetc%2Fpasswd",
                 "/static/..%2F..%2Fjobs.py", "/static/../../__init__.py", "/api/takes/a.b/peaks"):
        response = studio.client.get(path)
        assert response.status_code == 404, (path, response.status_code)
    assert studio.client.delete("/api/takes/..%2Fconfig").status_code == 404
    assert studio.client.delete("/api/jobs/nope").status_code == 404


def test_other_sites_are_refused(studio):
    evil = studio.client.post("/api/jobs", json={"text": "rock"}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "--allow-origin http://evil.example" in evil.json()["detail"]
    assert studio.client.get("/api/takes", headers={"Origin": "http://evil.example"}).status_code == 403
    rebinding = studio.client.get("/api/takes", headers={"Host": "evil.example:80"})
    assert rebinding.status_code == 400
    same = studio.client.get("/api/takes", headers={"Origin": studio.url})
    assert same.status_code == 200


def test_the_api_is_described(studio):
    schema = studio.client.get("/openapi.json").json()
    assert {"/api/jobs", "/api/jobs/{job_id}", "/api/jobs/{job_id}/events", "/api/jobs/{job_id}/audio",
            "/api/takes", "/api/takes/{take_id}", "/api/takes/{take_id}/audio"} <= set(schema["paths"])
    page = studio.client.get("/")
    assert page.status_code == 200 and "<form" in page.text and "//" not in page.text.split("<body>")[0].replace(
        "http-equiv", "")  # no outside resources


def test_a_full_queue_is_429(tiny, tmp_path):
    server = Studio(tiny.folder, tmp_path / "takes", "--max-queue", "2", slow=0.1)
    try:
        running = submit(server, text="long", duration=1.4).json()
        while server.client.get(f"/api/jobs/{running['id']}").json()["status"] != "running":  # out of the queue
            time.sleep(0.02)
        statuses = [submit(server, text=f"wait {i}", duration=0.02).status_code for i in range(4)]
        assert statuses == [202, 202, 429, 429]
        full = submit(server, text="more", duration=0.02)
        assert "jobs are waiting, the most this studio queues" in full.json()["detail"]
        server.client.delete(f"/api/jobs/{running['id']}")
    finally:
        server.stop()


def test_restart_keeps_takes_and_accepted_jobs(tiny, tmp_path):
    server = Studio(tiny.folder, tmp_path / "takes", "--chunk", "0.05", slow=0.05)
    made = server.wait(submit(server, text="kept", duration=0.03, seed=1).json()["id"])["take"]
    long = submit(server, text="interrupted", duration=1.4, seed=2).json()["id"]
    waiting = submit(server, text="waiting", duration=0.03, seed=3).json()["id"]
    while server.client.get(f"/api/jobs/{long}").json()["status"] != "running":
        time.sleep(0.02)
    assert server.stop() == 0  # Ctrl-C: the running job is cancelled, nothing half-written
    assert "2 job(s) left waiting will run at the next start" in server.log.read_text()
    assert {p.stem for p in (tmp_path / "takes").glob("*.wav")} == {made}
    assert not list((tmp_path / "takes").glob(".*.part"))

    server.slow = 0.0  # the next start runs the jobs at full speed
    server.start()
    try:
        assert [t["id"] for t in server.client.get("/api/takes").json()] == [made]
        for job_id, text in ((long, "interrupted"), (waiting, "waiting")):
            job = server.wait(job_id)
            assert job["status"] == "done"
            assert server.client.get(f"/api/takes/{job['take']}").json()["text"] == text
    finally:
        server.stop()


def test_a_job_running_when_the_process_died_is_not_run_again(tiny, tmp_path):
    """It may be what killed the process: reported failed, not retried at every start."""
    queue = tmp_path / "takes" / ".studio" / "queue"
    queue.mkdir(parents=True)
    job_id = "0123456789abcdef0123456789abcdef"
    (queue / f"{job_id}.json").write_text(json.dumps({"id": job_id, "created": 1.0, "started": True,
                                                       "settings": {"text": "boom", "duration": 0.02}}))
    server = Studio(tiny.folder, tmp_path / "takes")
    try:
        job = server.client.get(f"/api/jobs/{job_id}").json()
        assert job["status"] == "failed" and "stopped while running this job" in job["error"]
        assert not list(queue.iterdir())
    finally:
        server.stop()


def test_twenty_jobs_from_several_clients(tiny, tmp_path):
    """Load: 20 jobs from 5 clients at once, 8 may wait: each is accepted and finishes, or is refused with 429;
    none is lost or mixed up (each take's settings are its request's); memory stays flat over a second round."""
    import httpx

    server = Studio(tiny.folder, tmp_path / "takes", "--max-queue", "8")

    def round_of_jobs(tag: str) -> tuple[dict, int]:
        accepted, refused, lock = {}, [0], threading.Lock()

        def client(number: int) -> None:
            with httpx.Client(base_url=server.url, timeout=60) as http:
                for i in range(4):
                    text = f"{tag} client {number} job {i}"
                    response = http.post("/api/jobs", json={"text": text, "duration": 0.04, "seed": 100 * number + i})
                    with lock:
                        if response.status_code == 202:
                            accepted[response.json()["id"]] = (text, 100 * number + i)
                        else:
                            assert response.status_code == 429, response.text
                            refused[0] += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for job_id, (text, seed) in accepted.items():
            job = server.wait(job_id)
            assert job["status"] == "done", job
            record = server.client.get(f"/api/takes/{job['take']}").json()
            assert (record["text"], record["seed"], record["studio_job"]) == (text, seed, job_id)
        return accepted, refused[0]

    try:
        accepted, refused = round_of_jobs("first")
        assert len(accepted) + refused == 20 and len(accepted) >= 9
        memory = server.rss_mb()
        accepted_again, refused_again = round_of_jobs("second")
        grown = server.rss_mb() - memory
        print(f"load: round 1 {len(accepted)} accepted, {refused} refused; round 2 {len(accepted_again)} accepted, "
              f"{refused_again} refused; RSS {memory:.0f} MB, then {grown:+.1f} MB")
        assert grown < 40
        assert len(list((tmp_path / "takes").glob("*.wav"))) == len(accepted) + len(accepted_again)
    finally:
        server.stop()


def test_a_melody_model_follows_an_uploaded_melody(tiny_melody, tmp_path):
    """The page's melody field, through the API: the take follows the upload (the same codes as the library
    given the same melody and seed), and its settings name the kept upload."""
    from mlx_musicgen import MusicGen
    from test_chroma import tune_over_noise

    tune = tune_over_noise()
    server = Studio(tiny_melody.folder, tmp_path / "takes")
    try:
        assert server.client.get("/api/info").json()["melody"] is True
        response = server.client.post("/api/jobs", data={"text": "lofi", "duration": "0.05", "seed": "3"},
                                      files={"melody": ("tune.wav", wav_bytes(tune), "audio/wav")})
        assert response.status_code == 202, response.text
        job = server.wait(response.json()["id"])
        assert job["status"] == "done", job
        record = server.client.get(f"/api/takes/{job['take']}").json()
        assert record["melody"].startswith(".studio/uploads/") and (server.output / record["melody"]).is_file()
        take = sf.read(server.output / f"{job['take']}.wav", dtype="float32", always_2d=True)[0].T
    finally:
        server.stop()
    expected = MusicGen.from_pretrained(tiny_melody.folder).generate(["lofi"], melody=tune, duration=0.05, seed=3)
    np.testing.assert_allclose(take, expected[0], rtol=0, atol=1e-6)
