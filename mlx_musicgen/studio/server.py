"""The studio's HTTP API and page (FastAPI): the app, made of one router per resource (jobs_api, takes_api,
info_api, page_api). Every id and upload is checked; only the output folder's takes and the page's own files are
served; requests from other sites (an Origin that is not this server's) and, on a loopback address, other Host
names (DNS rebinding) are refused."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from ..version import __version__
from . import info_api, jobs_api, page_api, takes_api
from .deps import error
from .jobs import JobQueue
from .page_api import STATIC

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "[::1]", "::1"}

__all__ = ["STATIC", "create_app"]


def create_app(jobs: JobQueue, *, max_upload_bytes: int = 50 * 2**20, allowed_origins: tuple[str, ...] = (),
               loopback_only: bool = True) -> FastAPI:
    app = FastAPI(title="mlx-musicgen studio", version=__version__, docs_url=None, redoc_url=None,
                  description="Make music with MusicGen on this machine: queue jobs, follow them, keep takes.")
    app.state.jobs = jobs
    app.state.max_upload_bytes = max_upload_bytes
    app.add_middleware(SameSiteOnly, allowed_origins=allowed_origins, loopback_only=loopback_only)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for api in (page_api, info_api, jobs_api, takes_api):
        app.include_router(api.router)
    return app


class SameSiteOnly:
    """Refuses a request whose Origin is another site's (403), unless allowed; and when the studio listens on a
    loopback address, one whose Host is not a loopback name (400: DNS rebinding). Starlette's TrustedHost and
    CORS middleware do neither exactly (nor with these messages)."""

    def __init__(self, app: ASGIApp, *, allowed_origins: tuple[str, ...], loopback_only: bool):
        self.app = app
        self.allowed_origins = allowed_origins
        self.loopback_only = loopback_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refusal(Request(scope)) if scope["type"] == "http" else None
        if refusal is not None:
            await refusal(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def refusal(self, request: Request) -> Response | None:
        host = request.headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]")[0] + "]"
        if self.loopback_only and name not in LOOPBACK_NAMES:
            return error(400, f"host {host!r} is not this studio's: open it as http://127.0.0.1 or localhost.")
        origin = request.headers.get("origin")
        if origin is not None and origin != f"{request.url.scheme}://{host}" and origin not in self.allowed_origins:
            return error(403, f"requests from {origin} are refused: start the studio with --allow-origin {origin} "
                              f"to let that site use it.")
        return None
