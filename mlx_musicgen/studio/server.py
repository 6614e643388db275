"""The studio's HTTP API and page (FastAPI): the app, made of one router per resource (jobs_api, takes_api,
info_api, page_api), behind the checks of who may call (Access):

- the Host must be one of the server's own names (its bound address, the loopback names, --allow-host names),
  whatever the bind: a page on another site reached through DNS rebinding is refused (400);
- a request from another site's page (an Origin that is not this server's) is refused before its body is read
  (403), unless --allow-origin names that origin, which then gets real CORS answers (Starlette's CORSMiddleware);
- where a token is set (any bind but the default loopback ones, or --token), every request carries it: as
  `Authorization: Bearer TOKEN`, or as the cookie that opening `/?token=TOKEN` sets (401 otherwise);
- a request's body must keep coming: a pause of `body_seconds` answers 408 (uvicorn has no body timeout).

Every id and upload is checked; only the output folder's takes and the page's own files are served."""

from __future__ import annotations

import asyncio
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.responses import RedirectResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..version import __version__
from . import info_api, jobs_api, page_api, takes_api
from .body_limit import BodyLimit
from .deps import ListenerSlots, error
from .jobs import JobQueue
from .page_api import STATIC

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")  # a Host always allowed (the port aside)
MAX_LISTENERS = 256  # event and audio streams open at once; one job may have half of them

__all__ = ["STATIC", "Access", "create_app"]


@dataclass(frozen=True)
class Access:
    """Who may call: the Host names allowed (lowercase, without port; IPv6 in brackets), the token every request
    must carry (None: none), and the other sites' origins allowed to call (with CORS)."""

    hosts: frozenset[str] = frozenset(LOOPBACK_NAMES)
    token: str | None = None
    origins: tuple[str, ...] = ()

    @classmethod
    def for_bind(cls, host: str, *, allow_hosts=(), token: str | None = None, origins=()) -> Access:
        """The loopback names, the bound address as a Host names it, and `allow_hosts`."""
        bound = f"[{host}]" if ":" in host else host
        return cls(frozenset({*LOOPBACK_NAMES, bound.lower(), *(name.lower() for name in allow_hosts)}), token,
                   tuple(origins))


def create_app(jobs: JobQueue, *, max_upload_bytes: int = 50 * 2**20, access: Access = Access(),
               max_listeners: int = MAX_LISTENERS, body_seconds: float = 15.0) -> FastAPI:
    """The studio's app over a started JobQueue: the routers behind the checks of `access`."""
    app = FastAPI(title="mlx-musicgen studio", version=__version__, docs_url=None, redoc_url=None,
                  description="Make music with MusicGen on this machine: queue jobs, follow them, keep takes.")
    app.state.jobs = jobs
    app.state.max_upload_bytes = max_upload_bytes
    app.state.listener_slots = ListenerSlots(max_listeners, max(1, max_listeners // 2))
    # the last added runs first: Host and Origin, then CORS (a preflight carries no token), then the token
    app.add_middleware(BodyLimit, max_upload_bytes=max_upload_bytes, stopping=lambda: jobs.stopping)
    app.add_middleware(BodyDeadline, seconds=body_seconds)
    if access.token is not None:
        app.add_middleware(TokenRequired, token=access.token)
    if access.origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(access.origins), allow_methods=["GET", "POST", "DELETE"],
                           allow_headers=["authorization", "content-type"], max_age=600)
    app.add_middleware(SameSiteOnly, hosts=access.hosts, allowed_origins=access.origins)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for api in (page_api, info_api, jobs_api, takes_api):
        app.include_router(api.router)
    return app


class SameSiteOnly:
    """Refuses a request whose Host is not one of the server's names (400: DNS rebinding), and one whose Origin
    is another site's (403) unless allowed, before its body is read. Starlette's TrustedHostMiddleware checks
    the Host alone (without these messages), and CORSMiddleware refuses no request."""

    def __init__(self, app: ASGIApp, *, hosts: frozenset[str], allowed_origins: tuple[str, ...]):
        self.app, self.hosts, self.allowed_origins = app, hosts, allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(scope) if scope["type"] == "http" else None
        await (refusal or self.app)(scope, receive, send)

    def refusal(self, scope: Scope) -> Response | None:
        headers = Headers(scope=scope)
        host = headers.get("host", "")
        name = host.split("]")[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]
        if name.lower() not in self.hosts:
            return error(400, f"host {host[:80]!r} is not this studio's: open it by its address or localhost, or "
                              f"start it with --allow-host NAME.")
        origin = headers.get("origin")
        if origin is not None and origin != f"{scope['scheme']}://{host}" and origin not in self.allowed_origins:
            return error(403, f"requests from {origin[:80]} are refused: start the studio with --allow-origin "
                              f"{origin[:80]} to let that site use it.")
        return None


class TokenRequired:
    """Refuses a request without the studio's token (401): it comes as `Authorization: Bearer TOKEN`, or as the
    cookie that `/?token=TOKEN` sets (HttpOnly, SameSite=Strict) before sending the browser on to `/`, as
    Jupyter does. The cookie's name holds the port: two studios on one machine keep their own."""

    def __init__(self, app: ASGIApp, *, token: str):
        self.app, self.token = app, token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        cookie = f"mlx-musicgen-studio-{scope['server'][1] if scope.get('server') else 0}"
        given = parse_qs(scope["query_string"].decode("latin-1")).get("token", [None])[0]
        if scope["path"] == "/" and given is not None:  # the printed URL: the token becomes a cookie
            await (self.welcome(cookie) if self.matches(given) else self.unauthorized())(scope, receive, send)
            return
        headers = Headers(scope=scope)
        bearer = headers.get("authorization", "")
        carried = bearer[7:] if bearer.lower().startswith("bearer ") else cookie_value(headers, cookie)
        await (self.app if self.matches(carried) else self.unauthorized())(scope, receive, send)

    def matches(self, given: str | None) -> bool:
        return given is not None and secrets.compare_digest(given.encode(), self.token.encode())

    def welcome(self, cookie: str) -> Response:
        """On to the page, with the token as a cookie that only this site's own requests carry."""
        answer = RedirectResponse("/", status_code=303)
        answer.set_cookie(cookie, self.token, httponly=True, samesite="strict")
        return answer

    @staticmethod
    def unauthorized() -> Response:
        return error(401, "this studio needs its token: open the URL it printed (ending in ?token=...), or send "
                          "the header Authorization: Bearer TOKEN.")


def cookie_value(headers: Headers, name: str) -> str | None:
    """A cookie's value from the request's Cookie headers, or None."""
    for header in headers.getlist("cookie"):
        for pair in header.split(";"):
            key, _, value = pair.strip().partition("=")
            if key == name:
                return value
    return None


class BodyStalled(Exception):
    pass


class BodyDeadline:
    """Answers 408 (and closes the connection) when a request's body pauses for `seconds` before its end, so that
    half-sent bodies do not hold the server's work; uvicorn has no body timeout. The wait for a disconnect
    after the body (a stream's) is not timed."""

    def __init__(self, app: ASGIApp, *, seconds: float):
        self.app, self.seconds = app, seconds

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = {"body_done": False, "answered": False}

        async def timed_receive() -> Message:
            if state["body_done"]:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.seconds)
            except TimeoutError:
                raise BodyStalled() from None
            state["body_done"] = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        async def watched_send(message: Message) -> None:
            state["answered"] = state["answered"] or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, timed_receive, watched_send)
        except BodyStalled:
            if state["answered"]:
                raise
            answer = error(408, f"the request's body stopped for {self.seconds:g} s: send it whole, and again.")
            answer.headers["connection"] = "close"
            await answer(scope, receive, send)


def header_deadline_protocol(seconds: float) -> type:
    """uvicorn's h11 protocol, with a deadline for each request's headers: `seconds` from the connection, or from
    the end of the answer before, to the headers' end; then the connection closes. uvicorn has no header timeout
    (its timeout_keep_alive stops at the first byte a client sends), so a client sending its headers a byte at a
    time would keep a connection forever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadlineProtocol(H11Protocol):
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self.arm()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self.header_timer is not None:  # the headers are in
                self.header_timer.cancel()
                self.header_timer = None

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:  # waiting for the next request's headers
                self.arm()

        def connection_lost(self, exc) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def arm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(seconds, self.headers_late)

        def headers_late(self) -> None:
            self.header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadlineProtocol
