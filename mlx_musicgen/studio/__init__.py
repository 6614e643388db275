"""A local studio: an HTTP API and a web page over one loaded model (the `mlx_musicgen.studio` command;
`python -m mlx_musicgen.studio` runs it too).

    mlx_musicgen.studio --model facebook/musicgen-small --port 8000 --output-dir takes

Jobs run one at a time, in order; each finished take is written into the output folder with its sidecar
JSON, as generate.py writes it. It listens on 127.0.0.1 unless told otherwise; on any other address every
request needs a token, which it prints in its URL. Needs the `studio` extra (FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import sys
import warnings
from pathlib import Path

from ..cli import add_checkpoint_options, add_dtype_option, run_main
from ..model import DTYPES
from ..musicgen import MusicGen

DEFAULT_OUTPUT = "musicgen-takes"
LOOPBACK = ("127.0.0.1", "localhost", "::1")  # binds that need no token
TOKEN_ENV = "MLX_MUSICGEN_STUDIO_TOKEN"  # the token's default: out of sight of `ps`, unlike --token


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx_musicgen.studio", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="facebook/musicgen-small",
                   help="Hub id, Hub-layout folder or converted folder (default: facebook/musicgen-small)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--output-dir", default=None, help=f"folder of the takes (default ./{DEFAULT_OUTPUT})")
    p.add_argument("--max-queue", type=int, default=16, help="jobs that may wait at once (default 16)")
    p.add_argument("--max-upload-mb", type=float, default=50, help="largest uploaded file, MiB (default 50)")
    p.add_argument("--chunk", type=float, default=1.0, help="seconds of audio per streamed chunk (default 1)")
    p.add_argument("--allow-origin", action="append", default=[],
                   help="a web origin (e.g. http://localhost:5173) allowed to call the API (repeatable)")
    p.add_argument("--allow-host", action="append", default=[],
                   help="another name this server may be called by (e.g. its LAN name or address; repeatable)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                   help=f"the secret every request must carry (default: ${TOKEN_ENV}, else drawn at start "
                        f"when --host is not 127.0.0.1, localhost or ::1)")
    p.add_argument("--max-listeners", type=int, default=256,
                   help="event and audio streams open at once, one job at most half of them (default 256)")
    p.add_argument("--read-timeout", type=float, default=15.0,
                   help="seconds a client may take to send a request's headers, or pause within its body (default "
                        "15); then the connection is closed (408 for a body)")
    p.add_argument("--adapter", help="LoRA adapters to apply: a fine-tune's output folder (finetune.py "
                   "--adapter-path), a PEFT adapter folder, or the Hub id of one")
    add_dtype_option(p)
    add_checkpoint_options(p)
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def check_args(args: argparse.Namespace) -> Path:
    """Everything checkable before the model loads; returns the output folder (created)."""
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be from 0 to 65535, got {args.port}.")
    if args.max_queue < 1:
        raise ValueError(f"--max-queue must be at least 1, got {args.max_queue}.")
    if not args.max_upload_mb > 0:
        raise ValueError(f"--max-upload-mb must be above 0, got {args.max_upload_mb}.")
    if not args.chunk > 0:
        raise ValueError(f"--chunk must be a positive number of seconds, got {args.chunk}.")
    for origin in args.allow_origin:
        if not origin.startswith(("http://", "https://")) or origin.endswith("/"):
            raise ValueError(f"--allow-origin takes an origin like http://localhost:5173, got {origin!r}.")
    for name in args.allow_host:
        if not re.fullmatch(r"[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]", name):
            raise ValueError(f"--allow-host takes a host name or address without port, like studio.lan, "
                             f"192.168.1.5 or [fe80::1], got {name!r}.")
    if args.token is not None and not re.fullmatch(r"[A-Za-z0-9._~-]{16,}", args.token):
        raise ValueError("--token must be at least 16 letters, digits, '.', '_', '~' or '-' (it goes in a URL).")
    if not 0 < args.read_timeout < 3600:
        raise ValueError(f"--read-timeout must be a number of seconds above 0 (and below an hour), got "
                         f"{args.read_timeout}.")
    if args.max_listeners < 2:
        raise ValueError(f"--max-listeners must be at least 2, got {args.max_listeners}.")
    output = Path(args.output_dir or DEFAULT_OUTPUT).expanduser()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} is not a folder: choose another --output-dir.")
    output.mkdir(parents=True, exist_ok=True)
    return output


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .jobs import JobQueue
        from .server import Access, create_app, header_deadline_protocol
    except ImportError as e:
        raise ValueError(f"the studio needs the `studio` extra ({e.name} is missing): "
                         f"pip install 'mlx-musicgen[studio]'.") from None
    output = check_args(args)
    if args.output_dir is None:
        print(f"takes go to {output.resolve()} (--output-dir to choose)", file=sys.stderr)
    token = args.token if args.token is not None or args.host in LOOPBACK else secrets.token_hex(24)
    if args.host not in LOOPBACK:
        warnings.warn(f"listening on {args.host}: anyone who can reach this machine and has the token can use the "
                      f"studio and read its takes; 127.0.0.1 keeps it to this machine."
                      + (" Other machines call it by a name given with --allow-host." if args.host in ("0.0.0.0", "::")
                         else ""), stacklevel=1)

    def load():
        dtype = DTYPES.get(args.dtype)
        return MusicGen.from_pretrained(args.model, dtype=dtype, adapter=args.adapter,
                                        checkpoint_format=args.checkpoint_format, text_encoder=args.text_encoder)

    jobs = JobQueue(load, output, str(args.model), max_queued=args.max_queue, chunk_seconds=args.chunk,
                    adapter=args.adapter)
    print(f"loading {args.model} ...", file=sys.stderr)
    jobs.start()
    access = Access.for_bind(args.host, allow_hosts=args.allow_host, token=token, origins=args.allow_origin)
    app = create_app(jobs, max_upload_bytes=int(args.max_upload_mb * 2**20), access=access,
                     max_listeners=args.max_listeners, body_seconds=args.read_timeout)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            jobs.request_stop()  # wake the listeners and cancel the running job first, so that connections close
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for socket in server.sockets:
                    print(f"mlx-musicgen studio: {studio_url(socket.getsockname(), token)}  (Ctrl-C to stop)",
                          file=sys.stderr, flush=True)

    # h11 with a deadline for headers (uvicorn has none); idle connections close after timeout_keep_alive
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5,
                            http=header_deadline_protocol(args.read_timeout), timeout_keep_alive=5)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down: the stop asked for
        pass
    finally:
        jobs.stop()
    print(f"stopped; {jobs.pending()} job(s) left waiting will run at the next start", file=sys.stderr)


def studio_url(address: tuple, token: str | None) -> str:
    """The URL to open for a bound (host, port, ...): a wildcard address as the loopback one (a browser on this
    machine reaches it there, and its Host is allowed), with the token when there is one."""
    host, port = address[:2]
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/" + (f"?token={token}" if token else "")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: run(args), args.debug)
