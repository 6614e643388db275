"""A local studio: an HTTP API and a web page over one loaded model (the `mlx_musicgen.studio` command;
`python -m mlx_musicgen.studio` runs it too).

    mlx_musicgen.studio --model facebook/musicgen-small --port 8000 --output-dir takes

Jobs run one at a time, in order; each finished take is written into the output folder with its sidecar
JSON, as generate.py writes it. It listens on 127.0.0.1 unless told otherwise. Needs the `studio` extra
(FastAPI, uvicorn, python-multipart).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from ..cli import add_dtype_option, run_main
from ..model import DTYPES
from ..musicgen import MusicGen

DEFAULT_OUTPUT = "musicgen-takes"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    p.add_argument("--adapter", help="a fine-tune's output folder (finetune.py --adapter-path) to apply")
    add_dtype_option(p)
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
    output = Path(args.output_dir or DEFAULT_OUTPUT).expanduser()
    if output.exists() and not output.is_dir():
        raise NotADirectoryError(f"{output} is not a folder: choose another --output-dir.")
    output.mkdir(parents=True, exist_ok=True)
    return output


def run(args: argparse.Namespace) -> None:
    try:
        import uvicorn

        from .jobs import JobQueue
        from .server import create_app
    except ImportError as e:
        raise ValueError(f"the studio needs the `studio` extra ({e.name} is missing): "
                         f"pip install 'mlx-musicgen[studio]'.") from None
    output = check_args(args)
    if args.output_dir is None:
        print(f"takes go to {output.resolve()} (--output-dir to choose)", file=sys.stderr)
    if args.host not in LOOPBACK:
        warnings.warn(f"listening on {args.host}: anyone who can reach this machine can use the studio and read "
                      f"its takes; 127.0.0.1 keeps it to this machine.", stacklevel=1)

    def load():
        dtype = DTYPES.get(args.dtype)
        return MusicGen.from_pretrained(args.model, dtype=dtype, adapter=args.adapter)

    jobs = JobQueue(load, output, str(args.model), max_queued=args.max_queue, chunk_seconds=args.chunk,
                    adapter=args.adapter)
    print(f"loading {args.model} ...", file=sys.stderr)
    jobs.start()
    app = create_app(jobs, max_upload_bytes=int(args.max_upload_mb * 2**20), allowed_origins=tuple(args.allow_origin),
                     loopback_only=args.host in LOOPBACK)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            jobs.request_stop()  # wake the listeners and cancel the running job first, so that connections close
            super().handle_exit(sig, frame)

        async def startup(self, sockets=None) -> None:
            await super().startup(sockets)
            for server in self.servers:
                for socket in server.sockets:
                    host, port = socket.getsockname()[:2]
                    shown = f"[{host}]" if ":" in host else host
                    print(f"mlx-musicgen studio: http://{shown}:{port}/  (Ctrl-C to stop)", file=sys.stderr,
                          flush=True)

    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=5)
    try:
        Server(config).run()
    except KeyboardInterrupt:  # uvicorn raises the Ctrl-C again once it has shut down: the stop asked for
        pass
    finally:
        jobs.stop()
    print(f"stopped; {jobs.pending()} job(s) left waiting will run at the next start", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    run_main(lambda: run(args), args.debug)
