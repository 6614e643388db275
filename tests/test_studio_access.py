"""Who may call the studio, and what its listeners cost, through a real server process: the Host rule on any
bind, the token off the default loopback addresses, CORS for --allow-origin, listeners that hold no thread and
their caps, texts that cannot be stored, and read timeouts. 127.0.0.2 is a loopback address that is not a
loopback name (Linux routes all of 127/8 to lo): the studio treats it as any other bind."""

import json
import re
import socket
import statistics
import time

import httpx
import pytest

from studio import Studio

ORIGIN = "http://localhost:5173"


class GuardedStudio(Studio):
    """A studio on 127.0.0.2: it draws a token and prints it in its URL; the client sends it as a header."""

    URL = r"studio: (http://127\.0\.0\.2:\d+)/\?token=(\w+)"

    def start(self) -> None:
        super().start()
        self.token = re.findall(self.URL, self.log.read_text())[-1][1]
        self.port = int(self.url.rsplit(":", 1)[1])
        self.client.headers["Authorization"] = f"Bearer {self.token}"


@pytest.fixture(scope="module")
def guarded(tiny, tmp_path_factory):
    server = GuardedStudio(tiny.folder, tmp_path_factory.mktemp("guarded") / "takes", "--host", "127.0.0.2",
                           "--allow-host", "studio.test", "--allow-origin", ORIGIN, "--max-listeners", "200",
                           "--read-timeout", "1", slow=0.05)
    yield server
    if server.process.poll() is None:
        server.stop()


def raw(server, request: bytes) -> socket.socket:
    """A connection to the studio that has sent `request` (perhaps not all of a request)."""
    connection = socket.create_connection(("127.0.0.2", server.port), timeout=30)
    connection.sendall(request)
    return connection


def listener(server, job_id: str) -> socket.socket:
    return raw(server, f"GET /api/jobs/{job_id}/events HTTP/1.1\r\nHost: 127.0.0.2:{server.port}\r\n"
                       f"Authorization: Bearer {server.token}\r\n\r\n".encode())


def first_answer(connection: socket.socket) -> bytes:
    """What the studio answered first on a connection: its status line and headers, and its body when it has a
    Content-Length (a stream's start otherwise)."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.split(b"\r\n\r\n", 1)[1]) < length(data):
        part = connection.recv(65536)
        if not part:
            break
        data += part
    return data


def length(answer: bytes) -> int:
    found = re.search(rb"content-length: (\d+)", answer.split(b"\r\n\r\n", 1)[0], re.IGNORECASE)
    return int(found.group(1)) if found else 0


def test_a_foreign_host_is_refused_on_any_bind(guarded):
    evil = f"attacker.example:{guarded.port}"
    rebinding = guarded.client.post("/api/jobs", json={"text": "x", "duration": 0.02},
                                    headers={"Host": evil, "Origin": f"http://{evil}"})
    assert rebinding.status_code == 400 and "--allow-host" in rebinding.json()["detail"]
    assert guarded.client.get("/api/takes", headers={"Host": evil}).status_code == 400
    assert guarded.client.get("/api/jobs").json() == []  # nothing was queued
    for name in ("studio.test", "STUDIO.test", "localhost", "127.0.0.1", "127.0.0.2"):  # --allow-host, loopback
        assert guarded.client.get("/api/info", headers={"Host": f"{name}:{guarded.port}"}).status_code == 200


def test_every_request_needs_the_token(guarded):
    with httpx.Client(base_url=guarded.url, timeout=60) as stranger:
        for method, path in (("GET", "/"), ("GET", "/api/info"), ("GET", "/api/takes"), ("POST", "/api/jobs"),
                             ("GET", "/openapi.json"), ("GET", "/static/app.js")):
            refused = stranger.request(method, path, json={"text": "x"} if method == "POST" else None)
            assert refused.status_code == 401 and "?token=" in refused.json()["detail"], (path, refused.text)
        wrong = {"Authorization": "Bearer " + "0" * len(guarded.token)}
        assert stranger.get("/api/info", headers=wrong).status_code == 401
        assert stranger.get("/", params={"token": "nope"}).status_code == 401
        # the printed URL: the token becomes a cookie, and the page and API then answer
        opened = stranger.get("/", params={"token": guarded.token})
        assert opened.status_code == 303 and opened.headers["location"] == "/"
        cookie = opened.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=strict" in cookie
        assert stranger.get("/").status_code == 200 and "<form" in stranger.get("/").text
        assert stranger.get("/api/info").status_code == 200
    assert guarded.client.get("/api/info").status_code == 200  # the header


def test_an_allowed_origin_gets_cors_answers_and_others_403(guarded):
    preflight = {"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    with httpx.Client(base_url=guarded.url, timeout=60) as browser:  # a preflight carries no token
        answer = browser.options("/api/jobs", headers=preflight)
        assert answer.status_code == 200, answer.text
        assert answer.headers["access-control-allow-origin"] == ORIGIN
        assert "POST" in answer.headers["access-control-allow-methods"]
        assert "authorization" in answer.headers["access-control-allow-headers"].lower()
        foreign = browser.options("/api/jobs", headers={**preflight, "Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "access-control-allow-origin" not in foreign.headers
        assert browser.get("/api/info", headers={"Origin": ORIGIN}).status_code == 401  # CORS is not the token
    info = guarded.client.get("/api/info", headers={"Origin": ORIGIN})
    assert info.status_code == 200 and info.headers["access-control-allow-origin"] == ORIGIN
    evil = guarded.client.post("/api/jobs", json={"text": "x"}, headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "access-control-allow-origin" not in evil.headers


def test_listeners_hold_no_thread_and_are_capped(guarded):
    """100 listeners on a queued job (one job may have 100 of --max-listeners 200); the API still answers at
    once, the 101st is 429, as is one past 200 in all; a cancel reaches them all, and their slots come back."""
    running = guarded.client.post("/api/jobs", json={"text": "long", "duration": 1.4}).json()["id"]
    queued = [guarded.client.post("/api/jobs", json={"text": f"q{i}", "duration": 0.02}).json()["id"]
              for i in range(3)]
    listeners = [listener(guarded, queued[0]) for _ in range(100)]
    try:
        for connection in listeners:
            assert first_answer(connection).startswith(b"HTTP/1.1 200")
        took = []
        for _ in range(5):
            start = time.perf_counter()
            assert guarded.client.get("/api/info").status_code == 200
            took.append(time.perf_counter() - start)
        print(f"/api/info with 100 listeners: median {statistics.median(took) * 1000:.1f} ms, most "
              f"{max(took) * 1000:.1f} ms")
        assert max(took) < 5  # it was 20 s with 60 listeners when each held a thread
        assert first_answer(listener(guarded, queued[0])).startswith(b"HTTP/1.1 429")
        listeners += [listener(guarded, queued[1]) for _ in range(100)]
        for connection in listeners[100:]:
            assert first_answer(connection).startswith(b"HTTP/1.1 200")
        beyond = first_answer(listener(guarded, queued[2]))
        assert beyond.startswith(b"HTTP/1.1 429") and b"streams are already open" in beyond
        assert guarded.client.delete(f"/api/jobs/{queued[0]}").json()["status"] == "cancelled"
        for connection in listeners[:100]:  # each gets the end and its stream closes
            seen = b""
            while part := connection.recv(65536):
                seen += part
            assert b'"status": "cancelled"' in seen
    finally:
        for connection in listeners:
            connection.close()
        for job_id in (running, *queued):
            guarded.client.delete(f"/api/jobs/{job_id}")
    deadline = time.time() + 60  # the slots come back as the server sees the connections close
    while not first_answer(listener(guarded, queued[2])).startswith(b"HTTP/1.1 200"):
        assert time.time() < deadline
        time.sleep(0.1)


@pytest.mark.parametrize("body, message", [
    (b'{"text": "x \\ud800 y"}', "text holds a lone surrogate"),
    (b'{"text": "x \\u0000 y"}', "text holds the control character '\\x00'"),
    ('{"text": "x \u0085 \u009b y"}'.encode(), "text holds the control character '\\x9b'"),
])
def test_a_text_that_cannot_be_stored_is_422(guarded, body, message):
    answer = guarded.client.post("/api/jobs", content=body, headers={"content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["detail"].startswith(message), answer.text
    assert guarded.client.get("/api/jobs").status_code == 200


def test_whitespace_and_any_script_are_fine(guarded):
    answer = guarded.client.post("/api/jobs", json={"text": "lofi\tbeat\r\nwith 🎵 and ü", "duration": 0.02})
    assert answer.status_code == 202
    guarded.client.delete(f"/api/jobs/{answer.json()['id']}")
    assert answer.json()["id"] in {job["id"] for job in guarded.client.get("/api/jobs").json()}


def test_half_sent_requests_are_closed(guarded):
    """--read-timeout 1: headers unfinished are closed; a body that stops gets 408."""
    host = f"Host: 127.0.0.2:{guarded.port}\r\nAuthorization: Bearer {guarded.token}\r\n"
    headers = raw(guarded, f"GET /api/info HTTP/1.1\r\n{host}".encode())
    body = raw(guarded, f"POST /api/jobs HTTP/1.1\r\n{host}Content-Type: application/json\r\n"
                        f"Content-Length: 1000\r\n\r\n{{\"te".encode())
    assert headers.recv(65536) == b""  # closed, without an answer
    answer = first_answer(body)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1] or b"{}").get("detail", "").startswith("the request's body")
    assert guarded.client.get("/api/info").status_code == 200
