"""The studio's bodies and uploads under attack, through a real server process: a decompression bomb refused
from its header, body limits enforced while chunked bodies stream, deep and huge JSON, zero-frame lengths,
parallel uploads, and a stop during an upload. Memory is the server's peak resident set (VmHWM), reset before
each case."""

from __future__ import annotations

import io
import json
import os
import re
import select
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from studio import Studio

UPLOAD_MB = 8  # the module's server: --max-upload-mb 8, so a multipart body may hold 2 * 8 MiB and some slack
BOUNDARY = "studio-test-boundary"


@pytest.fixture(scope="module")
def spool(tmp_path_factory, monkeypatch_module):
    """The folder the server receives uploads into (its TMPDIR)."""
    folder = tmp_path_factory.mktemp("spool")
    monkeypatch_module.setenv("TMPDIR", str(folder))
    return folder


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory, spool):
    studio = Studio(tiny.folder, tmp_path_factory.mktemp("uploads") / "takes", "--max-upload-mb", str(UPLOAD_MB))
    yield studio
    studio.stop()


class Peak:
    """The server's peak resident memory over a `with` block, in MB above its resident memory at the start."""

    def __init__(self, studio: Studio):
        self.pid = studio.process.pid

    def read(self, field: str) -> float:
        status = Path(f"/proc/{self.pid}/status").read_text()
        return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) / 1024

    def __enter__(self) -> Peak:
        Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # the peak starts again from the current use
        self.start = self.read("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        self.growth = self.read("VmHWM") - self.start


def spooled_bytes(pid: int, folder: Path) -> int:
    """The bytes of the files that process `pid` holds open in `folder` (temporary files have no name there)."""
    total = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd).startswith(str(folder)):
                total += fd.stat().st_size
        except OSError:  # closed meanwhile
            pass
    return total


def raw_post(url: str, content_type: str, chunks, *, length: int | None = None) -> tuple[int, dict, int]:
    """POST /api/jobs through a socket, chunked unless `length` is given, stopping to send as soon as the server
    answers (as curl does; httpx would send everything first). Returns (status, JSON answer, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=120)
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    sock.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {content_type}\r\n"
                 f"{framing}\r\n\r\n".encode())
    sent = 0
    try:
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:  # answered already
                break
            sock.sendall(chunk if length is not None else b"%x\r\n%s\r\n" % (len(chunk), chunk))
            sent += len(chunk)
        else:
            if length is None:
                sock.sendall(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):  # closed after its answer: read it
        pass
    status, answer = read_answer(sock)
    sock.close()
    return status, answer, sent


def read_answer(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < body_length(data):
        try:
            more = sock.recv(65536)
        except ConnectionResetError:
            break
        if not more:
            break
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def body_length(data: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", data.split(b"\r\n\r\n", 1)[0], re.IGNORECASE)
    return int(found.group(1)) if found else 1 << 62


def multipart(field: str, filename: str, data_chunks, fields: dict | None = None):
    """A multipart body, chunk by chunk: the settings `fields`, then one file from `data_chunks`."""
    head = "".join(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
                   for name, value in (fields or {"text": "rock"}).items())
    yield (head + f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
                  f"Content-Type: audio/wav\r\n\r\n").encode()
    yield from data_chunks
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def flac_bomb(path: Path, minutes: float = 20, channels: int = 8, rate: int = 48000) -> Path:
    """Constant 16-bit frames, which FLAC stores as one value a block: a file of a few hundred KB that decodes
    to minutes * 60 * rate * channels float32 samples (20 min: 1.8 GB)."""
    block = np.full((rate * 10, channels), 0.25, dtype=np.float32)
    with sf.SoundFile(str(path), "w", rate, channels, "PCM_16", format="FLAC") as out:
        for _ in range(int(minutes * 6)):
            out.write(block)
    return path


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    """(frames, channels) float -> a 32-bit float WAV."""
    out = io.BytesIO()
    sf.write(out, samples.astype(np.float32), rate, format="WAV", subtype="FLOAT")
    return out.getvalue()


@pytest.fixture(scope="module")
def bomb(tmp_path_factory) -> Path:
    return flac_bomb(tmp_path_factory.mktemp("bomb") / "bomb.flac")


def test_a_decompression_bomb_is_refused_from_its_header(server, bomb):
    decoded_gb = sf.info(str(bomb)).frames * 8 * 4 / 1e9
    assert bomb.stat().st_size < 2**20 and decoded_gb > 1
    with Peak(server) as peak:
        started = time.monotonic()
        response = server.client.post("/api/jobs", data={"text": "rock", "duration": "1"},
                                      files={"audio_prompt": ("bomb.flac", bomb.read_bytes(), "audio/flac")})
        took = time.monotonic() - started
    print(f"bomb: {bomb.stat().st_size / 1e3:.0f} KB decoding to {decoded_gb:.2f} GB -> {response.status_code} in "
          f"{took:.2f} s, peak RSS {peak.growth:+.1f} MB")
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("audio prompt bomb.flac is 1200.00 s long, but the model's window")
    assert peak.growth < 100
    assert not list((server.output / ".studio" / "uploads").iterdir())


def test_read_audio_checks_the_header_before_it_decodes(bomb, tmp_path):
    """The library's read_audio, given the seconds it may use: the bomb is refused from its header, and a file
    whose header understates its length is decoded no further than allowed."""
    from mlx_musicgen.audio import read_audio

    with pytest.raises(ValueError, match=r"is 1200\.00 s long; at most 30 s of it is used here: trim it\."):
        read_audio(bomb, "melody", max_seconds=30)
    wide = tmp_path / "wide.wav"
    sf.write(wide, np.full((100, 9), 0.1, dtype=np.float32), 32000)
    with pytest.raises(ValueError, match="has 9 channels; at most 8 are read"):
        read_audio(wide, max_seconds=30)
    short = tmp_path / "short.wav"
    sf.write(short, np.full((32000, 2), 0.1, dtype=np.float32), 32000)
    samples, rate = read_audio(short, max_seconds=1.0)
    assert samples.shape == (2, 32000) and rate == 32000


def test_too_many_channels_are_refused_from_the_header(server):
    response = server.client.post("/api/jobs", data={"text": "rock", "duration": "1"},
                                  files={"audio_prompt": ("wide.wav", wav_bytes(np.full((100, 9), 0.1), 32000),
                                                          "audio/wav")})
    assert response.status_code == 422, response.text
    assert response.json()["detail"].startswith("audio prompt wide.wav has 9 channels; at most 8")


def test_a_chunked_json_body_past_the_limit_gets_413(server):
    total = 64 * 2**20
    chunks = [b'{"text": "'] + [b"a" * 2**16] * (total // 2**16) + [b'"}']
    with Peak(server) as peak:
        status, answer, sent = raw_post(server.url, "application/json", iter(chunks))
    print(f"chunked JSON of {total / 2**20:.0f} MiB: {status} after {sent / 2**20:.1f} MiB sent, peak RSS "
          f"{peak.growth:+.1f} MB")
    assert status == 413 and "KiB" in answer["detail"]
    assert sent < total / 2 and peak.growth < 50


def test_a_body_past_the_limit_is_refused_unread_by_its_length(server):
    status, answer, sent = raw_post(server.url, "application/json", iter([b"{}"] * 100), length=2**30)
    assert status == 413 and sent < 2**20


def test_a_chunked_upload_past_the_limit_gets_413_and_leaves_nothing(server, spool):
    limit = 2 * UPLOAD_MB * 2**20 + 2**20
    total = 64 * 2**20
    written = []
    done = threading.Event()

    def watch() -> None:  # the largest the received files grow to (unnamed files: found by the server's fds)
        while not done.is_set():
            written.append(spooled_bytes(server.process.pid, spool))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with Peak(server) as peak:
            status, answer, sent = raw_post(server.url, f"multipart/form-data; boundary={BOUNDARY}",
                                            multipart("audio_prompt", "big.wav", [b"\0" * 2**16] * (total // 2**16)))
    finally:
        done.set()
        watcher.join()
    print(f"chunked upload of {total / 2**20:.0f} MiB against {limit / 2**20:.0f} MiB: {status} after "
          f"{sent / 2**20:.1f} MiB sent, at most {max(written) / 2**20:.1f} MiB received to disk, peak RSS "
          f"{peak.growth:+.1f} MB")
    assert status == 413 and "8 MiB a file" in answer["detail"]
    assert sent < total / 2 and max(written) <= limit and peak.growth < 50
    assert not list((server.output / ".studio" / "uploads").iterdir())
    # (MLX's CPU compiler keeps the kernels it builds in $TMPDIR/mlx: not an upload's)
    assert spooled_bytes(server.process.pid, spool) == 0 and not [p for p in spool.iterdir() if p.name != "mlx"]


@pytest.mark.parametrize("body", ['{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "[" * 100_000])
def test_deep_nesting_gets_422(server, body):
    response = server.client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == "the body nests too deep: send one flat JSON object of settings."


@pytest.mark.parametrize("settings, message", [
    ({"duration": 1e-300}, "duration 1e-300 s makes no audio (a frame is 0.001 s): ask for at least 0.001 s."),
    ({"duration": 0.0004}, "duration 0.0004 s makes no audio (a frame is 0.001 s): ask for at least 0.001 s."),
    ({"duration": 1.0, "extend_stride": 1e-300}, "extend_stride 1e-300 s is less than a frame: give at least "
                                                 "0.001 s."),
])
def test_lengths_of_no_frame_are_refused_at_submit(server, settings, message):
    response = server.client.post("/api/jobs", json={"text": "rock", **settings})
    assert response.status_code == 422, response.text
    assert response.json()["detail"] == message


@pytest.mark.parametrize("body, start", [
    ({"duration": "x" * 50_000}, "duration must be a number, got 'xxx"),
    ({"top_k": "7" * 3000}, "top_k must be a whole number below 2**63, got '777"),
    ({"text": ["a"] * 5000}, "text must be text, got ['a', 'a'"),
    ({"format": "x" * 50_000}, "format must be wav or flac, got 'xxx"),
    ({"q" * 50_000: 1}, "unknown field(s) qqq"),
])
def test_a_long_bad_value_is_quoted_short(server, body, start):
    response = server.client.post("/api/jobs", json=body)
    detail = response.json()["detail"]
    assert response.status_code == 422 and detail.startswith(start), detail
    longest_run = max(len(run.group()) for run in re.finditer(r"(.)\1*", detail))
    assert longest_run <= 80 and len(detail) < 300, detail


def test_parallel_uploads_all_answer_with_bounded_memory(server):
    """8 uploads of about 5 MB at once: too long for the window (refused from the header) or silent 384 kHz
    stereo prompts (decoded whole to be judged); each is answered, and memory stays bounded."""
    long = wav_bytes(np.full((5 * 2**20 // 4, 1), 0.1), 32000)  # 41 s
    silent = wav_bytes(np.zeros((int(1.4 * 384000), 2)), 384000)  # 4.3 MB
    bodies = [long, silent] * 4

    def send(data: bytes) -> int:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            return client.post("/api/jobs", data={"text": "rock", "duration": "1.45"},
                               files={"audio_prompt": ("up.wav", data, "audio/wav")}).status_code

    with Peak(server) as peak, ThreadPoolExecutor(len(bodies)) as pool:
        statuses = list(pool.map(send, bodies))
    print(f"{len(bodies)} parallel uploads of ~5 MB: {statuses}, peak RSS {peak.growth:+.1f} MB")
    assert set(statuses) <= {202, 422, 429} and 422 in statuses
    assert peak.growth < 100


def test_a_stop_during_an_upload_ends_it(tiny, tmp_path):
    """Ctrl-C while a body is still arriving: the upload gets 503 (not 500) and the studio exits at once."""
    studio = Studio(tiny.folder, tmp_path / "takes")
    host, port = studio.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=60)
    head = next(multipart("audio_prompt", "slow.wav", []))
    sock.sendall(f"POST /api/jobs HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: multipart/form-data; "
                 f"boundary={BOUNDARY}\r\nContent-Length: {len(head) + 2**23}\r\n\r\n".encode() + head + b"\0" * 2**20)
    time.sleep(2.0)  # the body is being received (2 s: the headers are read within it even on a busy machine)
    started = time.monotonic()
    code = studio.stop(signal.SIGINT)
    took = time.monotonic() - started
    status, answer = read_answer(sock)
    sock.close()
    print(f"stop during an upload: the upload got {status}, the studio exited with {code} after {took:.2f} s")
    assert status == 503 and "stopping" in answer["detail"]
    assert code == 0


def test_a_melody_is_refused_past_what_the_job_follows(tiny_melody, tmp_path):
    """A melody is followed for its first 30 s (melody_seconds), and in long form up to the job's duration: a
    longer one is refused from its header; one within the duration of a long-form job is kept."""
    tune = wav_bytes(np.full((40 * 8000, 1), 0.1), 8000)  # 40 s
    studio = Studio(tiny_melody.folder, tmp_path / "takes")
    try:
        response = studio.client.post("/api/jobs", data={"text": "lofi", "duration": "1"},
                                      files={"melody": ("tune.wav", tune, "audio/wav")})
        assert response.status_code == 422, response.text
        assert response.json()["detail"] == "melody tune.wav is 40.00 s long; at most 30 s of it is used here: trim it."
        response = studio.client.post("/api/jobs", data={"text": "lofi", "duration": "45", "extend_stride": "1"},
                                      files={"melody": ("tune.wav", tune, "audio/wav")})
        assert response.status_code == 202, response.text
        studio.client.delete(f"/api/jobs/{response.json()['id']}")
        assert studio.wait(response.json()["id"])["status"] == "cancelled"
    finally:
        studio.stop()


def test_a_failed_jobs_error_shows_no_absolute_path(tmp_path):
    """The error a failed job shows: files in the output folder by their path in it, other absolute paths by
    their last part, no object addresses."""
    from mlx_musicgen.studio.jobs import job_error

    output = tmp_path / "takes"
    error = ValueError(f"audio prompt {output}/.studio/uploads/{'a' * 32}/audio_prompt.wav is silent; in "
                       f"/usr/lib/python3/site-packages/lib.py: <lib.Thing object at 0x7f3a2b1c0d50>")
    shown = job_error(error, output)
    assert shown == (f"audio prompt .studio/uploads/{'a' * 32}/audio_prompt.wav is silent; in lib.py: "
                     f"<lib.Thing>")
    assert str(tmp_path) not in shown and "/usr" not in shown and "0x" not in shown
