"""Request bodies bounded as they stream: an ASGI middleware that counts a body's bytes as the app reads them,
with a Content-Length or chunked, and answers 413 as soon as a limit is passed, before any byte past it reaches
the app (nothing past it is parsed, buffered or written to disk). It also bounds the multipart bodies received
at once (429 beyond), and ends a body still arriving when the studio stops (503), so that a stop is not held up
by a slow upload.

Starlette has no body limit (its multipart parser bounds parts, not the body), hence this middleware."""

from __future__ import annotations

import asyncio
from typing import Callable

from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .deps import error
from .settings import UPLOADS

JSON_LIMIT = 256 * 2**10  # bytes of a body that is not multipart: a job's settings take a few hundred
FORM_SLACK = 2**20  # bytes of a multipart body beside its files: boundaries, part headers, the settings fields
MAX_UPLOADS_IN_FLIGHT = 8  # multipart bodies received and checked at once: each holds 1-3 MiB in memory
STOP_POLL = 0.1  # seconds between looks at the studio's stop while a body is awaited


class BodyTooLarge(Exception):
    """The body passed its limit."""


class Stopping(Exception):
    """The studio stops while the body is still arriving."""


class BodyLimit:
    """413 for a body past its limit (JSON_LIMIT, or for multipart `max_upload_bytes` per upload field and
    FORM_SLACK), 429 beyond MAX_UPLOADS_IN_FLIGHT multipart bodies at once, 503 for a body still arriving when
    `stopping()` turns true."""

    def __init__(self, app: ASGIApp, *, max_upload_bytes: int, stopping: Callable[[], bool]):
        self.app = app
        self.max_upload_bytes = max_upload_bytes
        self.stopping = stopping
        self.uploads_in_flight = 0  # only touched on the event loop

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        multipart = headers.get("content-type", "").lower().startswith("multipart/")
        limit = self.max_upload_bytes * len(UPLOADS) + FORM_SLACK if multipart else JSON_LIMIT
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:  # refused unread
            await closing(self.too_large(multipart))(scope, receive, send)
            return
        if not multipart:
            await self.guarded(scope, receive, send, limit, multipart)
            return
        if self.uploads_in_flight >= MAX_UPLOADS_IN_FLIGHT:
            response = error(429, f"{self.uploads_in_flight} uploads are being received, the most at once: send "
                                  f"it again in a moment.")
            response.headers["retry-after"] = "1"
            await closing(response)(scope, receive, send)
            return
        self.uploads_in_flight += 1
        try:
            await self.guarded(scope, receive, send, limit, multipart)
        finally:
            self.uploads_in_flight -= 1

    async def guarded(self, scope: Scope, receive: Receive, send: Send, limit: int, multipart: bool) -> None:
        """The app, its body counted; a refusal is answered here when the app has not begun its answer."""
        started = False

        async def send_watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        body = CountedBody(receive, limit, self.stopping)
        try:
            await self.app(scope, body.receive, send_watched)
        except (BodyTooLarge, Stopping) as e:
            if started:
                raise
            refusal = self.too_large(multipart) if isinstance(e, BodyTooLarge) else \
                error(503, "the studio is stopping: send the job again once it has restarted.")
            await closing(refusal)(scope, receive, send)

    def too_large(self, multipart: bool):
        if multipart:
            return error(413, f"the request is larger than the uploads allowed ({self.max_upload_bytes / 2**20:g} "
                              f"MiB a file).")
        return error(413, f"the body is larger than {JSON_LIMIT // 2**10} KiB: a job's settings take a few hundred "
                          f"bytes.")


class CountedBody:
    """An ASGI receive that counts the body's bytes (BodyTooLarge past `limit`, raised before the chunk that
    passes it is handed on) and, while the body is still arriving, looks at `stopping` every STOP_POLL s
    (Stopping). Once the body has ended, messages pass untouched."""

    def __init__(self, receive: Receive, limit: int, stopping: Callable[[], bool]):
        self.inner, self.limit, self.stopping = receive, limit, stopping
        self.received = 0
        self.ended = False

    async def receive(self) -> Message:
        if self.ended:
            return await self.inner()
        message = await self.next_message()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                raise BodyTooLarge()
            self.ended = not message.get("more_body", False)
        else:  # http.disconnect
            self.ended = True
        return message

    async def next_message(self) -> Message:
        task = asyncio.ensure_future(self.inner())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=STOP_POLL)
                if done:
                    return task.result()
                if self.stopping():
                    raise Stopping()
        finally:
            if not task.done():
                task.cancel()


def closing(response: Response) -> Response:
    """A refusal that ends the connection: the body left unread is not read."""
    response.headers["connection"] = "close"
    return response
