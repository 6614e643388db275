#!/usr/bin/env python
"""MusicGen generation: this MLX port against transformers + torch, same random weights and prompt, in one run.

    python benchmarks/bench_generate.py --shape small --tokens 500 --json bench.json   # musicgen-small, 10 s
    python benchmarks/bench_generate.py --shape tiny --tokens 8                         # a smoke run in seconds
    python benchmarks/bench_generate.py --dtype float16 --skip-reference               # or -q 8: + logits drift

    python benchmarks/bench_generate.py --tokens 300 --runs 5 --shared 1              # spread, and a busy machine
    python benchmarks/bench_generate.py --magnet --runs 1        # MAGNeT vs audiocraft's and our MusicGen, 10 s

Builds (once, cached under --cache-dir by shape) a random-weight Hub-layout checkpoint with tests/fixtures.py
and converts it (float32, plus the --dtype / -q variant). Then the reference and ours each run --runs times,
each time in a fresh child process, the two sides taking turns: a short warm-up generation, then --repeats
timed ones. Numbers are medians over the runs; tokens/s also gives the slowest and fastest run, since a
process's speed can differ from the next one's. With --shared K, the runs are made again while K processes
spin on the CPU (a DAW, a browser, another generation), and each side reports the share of its speed it kept.
The reference's child never imports mlx_musicgen, whose BLAS preload would take over torch's BLAS calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
import fixtures  # noqa: E402  (light: torch is imported only to build)
from step_bytes import step_bytes  # noqa: E402  (light: mlx is imported only for the drift)

SMALL = fixtures.SMALL
SHAPES = {"tiny": fixtures.Shape(), "small": SMALL,
          "medium": dataclasses.replace(SMALL, decoder_hidden=1536, decoder_layers=48, decoder_heads=24,
                                        decoder_ffn=6144),
          "large": dataclasses.replace(SMALL, decoder_hidden=2048, decoder_layers=48, decoder_heads=32,
                                       decoder_ffn=8192)}
PROMPTS = ["80s pop track with bassy drums and synth", "90s rock song with loud guitars and heavy drums",
           "lofi slow bpm electro chill with organic samples", "jazz trumpet solo"]
GUIDANCE, TOP_K, SEED = 3.0, 250, 0
DEFINITIONS = {
    "tokens_per_s": "batch x decoder steps / seconds of the whole generate (T5, decoding steps, EnCodec)",
    "ms_per_step": "median interval between decoder steps (ours: progress callbacks; reference: decoder forward hook)",
    "first_frame_s": "from the call until the first frame of codes has all its codebooks (T5 included)",
    "encodec_s": "decoding the generated codes to audio, timed alone after the generate",
    "t5_s": "encoding the texts (tokenizer included), timed alone after the generate",
    "peak_rss_mb": "the child's peak resident memory during the timed generations (the loaded model included)",
    "floor_ms": "decoder weight bytes a step reads (benchmarks/step_bytes.py) / numpy copy bandwidth (read + write)",
    "floor_share": "floor_ms / ms_per_step: how close a step comes to reading its weights at copy speed",
    "tokens_per_s_min/max": "the slowest and the fastest of the fresh-process runs",
    "shared_tokens_per_s": "tokens_per_s (median of the runs) while --shared processes spin on the CPU",
    "kept": "shared_tokens_per_s / tokens_per_s: the share of its speed a side keeps on a busy machine",
    "ratios": "ours / reference: above 1 is better for tokens_per_s, floor_share and kept, below 1 for the others",
}


def peak_rss_mb(reset: bool = False) -> float:
    """VmHWM of this process in MB (reset to the current RSS first if asked; Linux), else ru_maxrss."""
    try:
        if reset:
            Path("/proc/self/clear_refs").write_text("5")
        return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    except (OSError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def measure(generate, encode_text, decode, cfg: dict) -> dict:
    """Warm-up, then timed runs; generate(tokens) -> (codes, seconds of each decoder step, first-frame time)."""
    generate(cfg["warmup_tokens"])
    peak_rss_mb(reset=True)
    runs = []
    for _ in range(cfg["repeats"]):
        t0 = time.perf_counter()
        codes, steps, first = generate(cfg["tokens"])
        total = time.perf_counter() - t0
        t = time.perf_counter()
        encode_text()
        t5 = time.perf_counter() - t
        t = time.perf_counter()
        decode(codes)
        runs.append({"total_s": total, "t5_s": t5, "encodec_s": time.perf_counter() - t, "first_frame_s": first - t0,
                     "ms_per_step": 1000 * statistics.median(steps)})
    out = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    return {**out, "tokens_per_s": cfg["batch"] * cfg["tokens"] / out["total_s"], "peak_rss_mb": peak_rss_mb(),
            "runs": runs}


# ---------------------------------------------------------------- the children


def prepare(cfg: dict) -> dict:
    """The Hub-layout checkpoint (built once) and its conversions (again when mlx_musicgen's converter changes)."""
    import mlx_musicgen  # (BLAS before mlx)
    from mlx_musicgen.convert import convert

    # What writes a converted folder: the converter, the format version, each part's sanitize.
    names = ("convert", "loading", "model", "t5", "decoder", "encodec")
    sources = sorted(p for p in Path(mlx_musicgen.__file__).parent.glob("*.py") if p.stem in names)
    stamp = hashlib.sha1(b"".join(p.read_bytes() for p in sources)).hexdigest()
    root = Path(cfg["root"])
    hf = root / "hf"
    if not (hf / "COMPLETE").is_file():
        fixtures.build_checkpoint(hf, SHAPES[cfg["shape"]], seed=0)
        (hf / "COMPLETE").touch()
    folders = {"hf": str(hf)}
    for name, dtype, q_bits in cfg["variants"]:
        folder = root / f"mlx-{name}"
        if not (folder / "STAMP").is_file() or (folder / "STAMP").read_text() != stamp:
            convert(hf, folder, dtype=dtype, q_bits=q_bits, q_group_size=cfg["q_group_size"], overwrite=True)
            (folder / "STAMP").write_text(stamp)
        folders[name] = str(folder)
    return folders


def reference(cfg: dict) -> dict:
    import torch
    import transformers
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(False)
    device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    sync = {"cuda": torch.cuda.synchronize, "mps": torch.mps.synchronize}.get(device, lambda: None)
    t = time.perf_counter()
    model = MusicgenForConditionalGeneration.from_pretrained(cfg["hf"]).to(device).eval()
    processor = MusicgenProcessor.from_pretrained(cfg["hf"])
    load_s = time.perf_counter() - t
    stamps, codes = [], []

    def hook(*_):  # returns None: the output is kept
        sync()
        stamps.append(time.perf_counter())

    model.decoder.register_forward_hook(hook)
    decode = model.audio_encoder.decode

    def keep_codes(audio_codes, *args, **kwargs):  # generate's own decode, which also hands us the codes
        codes.append(audio_codes)
        return decode(audio_codes, *args, **kwargs)

    model.audio_encoder.decode = keep_codes
    inputs = lambda: processor(text=cfg["texts"], padding=True, return_tensors="pt").to(device)  # noqa: E731

    def generate(tokens):
        stamps.clear()
        codes.clear()
        torch.manual_seed(SEED)
        model.generate(**inputs(), do_sample=True, guidance_scale=GUIDANCE, top_k=TOP_K, max_new_tokens=tokens)
        sync()
        steps = stamps[len(stamps) - tokens:]  # transformers 5 runs one decoder forward more, first
        return codes[0], [b - a for a, b in zip(steps, steps[1:])], steps[cfg["first_frame_step"]]

    result = measure(generate, lambda: (model.text_encoder(**inputs()), sync()),
                     lambda c: (decode(c, audio_scales=[None] * len(cfg["texts"])), sync()), cfg)
    return {**result, "load_s": load_s, "device": device,
            "framework": f"transformers {transformers.__version__} + torch {torch.__version__}, "
                         f"{torch.get_num_threads()} threads"}


def ours(cfg: dict) -> dict:
    import mlx_musicgen
    import mlx.core as mx
    from mlx_musicgen import MusicGen, cpu

    t = time.perf_counter()
    model = MusicGen.from_pretrained(cfg["folder"])
    load_s = time.perf_counter() - t

    def generate(tokens):
        calls = []  # (time, frames done): frames are reported as they complete, one a step after the first
        _, codes = model.generate(cfg["texts"], max_new_tokens=tokens, guidance_scale=GUIDANCE, top_k=TOP_K,
                                  seed=SEED, return_tokens=True,
                                  progress=lambda done, _: calls.append((time.perf_counter(), done)))
        return codes, [(t1 - t0) / (d1 - d0) for (t0, d0), (t1, d1) in zip(calls, calls[1:])], calls[0][0]

    result = measure(generate, lambda: mx.eval(model.encode_text(cfg["texts"])), model.decode, cfg)
    blas = getattr(getattr(mlx_musicgen, "_linux", None), "LOADED", None)
    result.update(load_s=load_s, device=str(mx.default_device()),
                  framework=f"mlx {mx.__version__}" + (f" + {blas}" if blas else "")
                  + (" (portable)" if cpu.portable_requested() else "")
                  + (" (numpy step)" if type(model.lm).__name__ == "NumpyDecoder" else ""))
    if cfg["drift_from"]:
        from step_bytes import logits_drift

        del model
        result["drift"] = logits_drift(cfg["drift_from"], cfg["folder"], cfg["texts"])
    return result


def child(kind: str, cfg: dict, env: dict | None = None) -> dict:
    """Run one of the functions above in a fresh Python process and return what it returns."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        command = [sys.executable, __file__, "--child", kind, json.dumps(cfg), str(out)]
        if subprocess.run(command, env={**os.environ, **(env or {})}).returncode:
            raise SystemExit(f"bench: the {kind} child failed (its error is above)")
        return json.loads(out.read_text())


# ---------------------------------------------------------------- the parent


def copy_bandwidth(megabytes: int) -> float:
    """GB/s of a large numpy copy, bytes read + written (STREAM's convention), best of 7."""
    import numpy as np

    src = np.ones(megabytes * 2**20 // 4, dtype=np.float32)
    dst = src.copy()
    best = float("inf")
    for _ in range(7):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


def spinners(count: int) -> list[subprocess.Popen]:
    """Processes that keep a core busy each, as other programs on a shared machine do."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def summarize(runs: list[dict]) -> dict:
    """Fresh-process runs of one side -> medians of their numbers, the spread of tokens/s, and the runs."""
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    out = {k: statistics.median(run[k] for run in runs) for k in keys}
    speeds = [run["tokens_per_s"] for run in runs]
    return {**runs[0], **out, "tokens_per_s_min": min(speeds), "tokens_per_s_max": max(speeds),
            "process_runs": runs}


def run_sides(sides: dict, runs: int, competitors: int = 0) -> dict:
    """Each side `runs` times, in fresh processes, taking turns; with `competitors` spinning meanwhile."""
    busy = spinners(competitors)
    try:
        results = {name: [] for name in sides}
        for _ in range(runs):
            for name, start in sides.items():
                results[name].append(start())
    finally:
        for process in busy:
            process.kill()
            process.wait()
    return {name: summarize(done) for name, done in results.items()}


def table(report: dict) -> str:
    cfg, ref, ours_, ratio = report["config"], report["reference"] or {}, report["ours"], report["ratios"]
    rows = [("tokens/s", "tokens_per_s", ".2f"), ("  slowest run", "tokens_per_s_min", ".2f"),
            ("  fastest run", "tokens_per_s_max", ".2f"), ("ms per step (median)", "ms_per_step", ".1f"),
            ("time to first frame, s", "first_frame_s", ".3f"), ("EnCodec decode, s", "encodec_s", ".3f"),
            ("T5, s", "t5_s", ".4f"), ("peak RSS, MB", "peak_rss_mb", ".0f"),
            ("bandwidth floor, ms per step", "floor_ms", ".2f"), ("share of the floor", "floor_share", ".1%")]
    if cfg["shared"]:
        rows += [(f"tokens/s, {cfg['shared']} spinning", "shared_tokens_per_s", ".2f"),
                 ("  slowest run", "shared_tokens_per_s_min", ".2f"), ("speed kept", "kept", ".0%")]
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    lines = [f"shape {cfg['shape']}, decoder {cfg['variant']}, batch {cfg['batch']} x guidance {GUIDANCE:g}, top-k "
             f"{TOP_K}, {cfg['tokens']} tokens, {cfg['runs']} fresh-process runs a side x {cfg['repeats']} timed, "
             f"copy bandwidth {report['bandwidth_gbps']:.1f} GB/s, load "
             f"{report['loadavg'][0]:.2f} -> {report['loadavg'][1]:.2f}",
             f"reference: {ref.get('framework', 'skipped')} on {ref.get('device', '-')}",
             f"ours:      {ours_['framework']} on {ours_['device']}", "",
             f"{'':30}{'reference':>12}{'ours':>12}{'ours/ref':>10}"]
    lines += [f"{label:30}{fmt(ref.get(k), s):>12}{fmt(ours_.get(k), s):>12}{fmt(ratio.get(k), '.2f'):>10}"
              for label, k, s in rows]
    if "drift" in ours_:
        lines.append(f"logits drift from float32: {json.dumps(ours_['drift'])}")
    return "\n".join(lines + [""] + [f"{k}: {v}" for k, v in DEFINITIONS.items()])


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else the platform's processor string."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def pair_ratios(report: dict) -> list[float]:
    """ours / reference tokens/s of each pair of fresh processes run back to back: how far the ratio moves."""
    ref, ours_ = report["reference"], report["ours"]
    return [o["tokens_per_s"] / r["tokens_per_s"] for r, o in zip(ref["process_runs"], ours_["process_runs"])]


def shown_options(argv: list[str]) -> list[str]:
    """The command line without where the results went (--json, --markdown): what a reader reruns."""
    shown, skip = [], False
    for arg in argv:
        if skip or arg.startswith(("--json=", "--markdown=")):
            skip = False
            continue
        skip = arg in ("--json", "--markdown")
        if not skip:
            shown.append(arg)
    return shown


def markdown(report: dict) -> str:
    """The run as a Markdown section for the README or docs/performance.md: the machine, the copy bandwidth, the
    date and the settings, then the table of medians and ratios, and how far the ratio moved between pairs."""
    cfg, ref, ours_, ratio = report["config"], report["reference"], report["ours"], report["ratios"]
    rows = [("tokens/s (whole generate: T5, steps, EnCodec), median", "tokens_per_s", ".2f"),
            ("slowest .. fastest run", None, None), ("ms per decoding step, median", "ms_per_step", ".1f"),
            ("share of the bandwidth floor", "floor_share", ".0%"), ("EnCodec decode, s", "encodec_s", ".2f"),
            ("T5, s", "t5_s", ".3f"), ("time to the first frame, s", "first_frame_s", ".2f"),
            ("peak RSS, MB", "peak_rss_mb", ".0f")]
    if cfg["shared"]:
        rows.append((f"tokens/s with {cfg['shared']} core(s) kept busy", "shared_tokens_per_s", ".2f"))
    machine = report["machine"]
    lines = [f"Measured {report['date']} by `benchmarks/bench_generate.py {' '.join(report['argv'])}` on "
             f"{cpu_model()} ({machine['cpus']} cores, {machine['platform']}), copy bandwidth "
             f"{report['bandwidth_gbps']:.1f} GB/s; shape {cfg['shape']}, decoder {cfg['variant']}, batch "
             f"{cfg['batch']} with guidance {GUIDANCE:g}, top-k {TOP_K}, {cfg['tokens']} tokens, {cfg['runs']} fresh "
             f"processes a side taking turns. Reference: {ref['framework'] if ref else 'skipped'}; ours: "
             f"{ours_['framework']} on {ours_['device']}.", "",
             "| | reference | ours | ours / reference |", "|---|---|---|---|"]
    for label, key, spec in rows:
        if key is None:
            spread = lambda side: f"{side['tokens_per_s_min']:.2f} .. {side['tokens_per_s_max']:.2f}"  # noqa: E731
            lines.append(f"| {label} | {spread(ref) if ref else '-'} | {spread(ours_)} | |")
            continue
        value = lambda side: "-" if not side or side.get(key) is None else format(side[key], spec)  # noqa: E731
        shown = f"{ratio[key]:.2f}" if key in ratio else ""
        lines.append(f"| {label} | {value(ref)} | {value(ours_)} | {'**' + shown + 'x**' if key == 'tokens_per_s' and shown else shown} |")
    if ref:
        pairs = pair_ratios(report)
        lines += ["", f"The ratio moves with the machine and the day: in this run, pair by pair, ours / reference "
                      f"ran from {min(pairs):.2f}x to {max(pairs):.2f}x. Compare within one run, not across days."]
    return "\n".join(lines) + "\n"


def fixture_key(shape) -> str:
    """The cache key of a shape's random checkpoint: the shape and the code that builds it."""
    return hashlib.sha1((repr(shape) + Path(fixtures.__file__).read_text()).encode()).hexdigest()[:10]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)  # see shown_options
    p.add_argument("--shape", choices=SHAPES, default="small", help="random-weight model shape")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, default=500, help="decoder steps (500: 10 s at 50 Hz)")
    length.add_argument("--duration", type=float, default=None, help="seconds of audio instead of --tokens")
    p.add_argument("--batch", type=int, default=1, help="prompts (each doubled by guidance)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="our decoder's")
    p.add_argument("-q", "--q-bits", type=int, choices=[4, 8], default=None, help="quantize our decoder")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--runs", type=int, default=3, help="fresh processes per side (medians, and the spread)")
    p.add_argument("--repeats", type=int, default=1, help="timed generations in each process")
    p.add_argument("--shared", type=int, default=0, help="also run with this many processes spinning on the CPU")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads and MKL_NUM_THREADS in our child (default: each side's own choice)")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment variable for our child (repeatable), e.g. MKL_NUM_THREADS=2")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--blas", choices=["mkl", "openblas"], default=None, help="MLX_MUSICGEN_BLAS in our child")
    p.add_argument("--portable", action="store_true", help="MLX_MUSICGEN_PORTABLE=1 in our child (no CPU paths)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".bench_cache")
    p.add_argument("--bandwidth-mb", type=int, default=512, help="array size of the copy (keep it above the L3)")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    p.add_argument("--markdown", type=Path, default=None,
                   help="write the run as a Markdown section here (the machine, the bandwidth, the date, the table)")
    p.add_argument("--magnet", action="store_true",
                   help="MAGNeT here against audiocraft's on torch and our MusicGen, for --duration s (default 10; "
                        "see benchmarks/magnet_bench.py)")
    p.add_argument("--decoding-steps", default="20,10,10,10", help="MAGNeT's passes per codebook (with --magnet)")
    args = p.parse_args()
    if args.magnet:
        import magnet_bench

        magnet_bench.run(args, sys.modules[__name__])
        return

    shape = SHAPES[args.shape]
    first_frame_steps = shape.num_codebooks // shape.audio_channels
    hop = 1
    for r in shape.upsampling_ratios:
        hop *= r
    tokens = args.tokens
    if args.duration is not None:  # frames = steps + 1 - codebooks per channel
        tokens = round(args.duration * shape.sampling_rate / hop) + first_frame_steps - 1
    if tokens < first_frame_steps + 2 or min(args.batch, args.repeats, args.runs) < 1 or args.shared < 0:
        p.error(f"need at least {first_frame_steps + 2} tokens (3 frames), a batch, a run and a repeat")
    if any(not item.partition("=")[0] or "=" not in item for item in args.env):
        p.error("--env takes NAME=VALUE")
    variant = args.dtype + (f"-q{args.q_bits}g{args.q_group_size}" if args.q_bits else "")
    key = fixture_key(shape)
    variants = {("float32", "float32", None), (variant, args.dtype, args.q_bits)}
    print(f"[bench] checkpoint and conversions in {args.cache_dir / f'{args.shape}-{key}'}", file=sys.stderr)
    folders = child("prepare", {"root": str(args.cache_dir / f"{args.shape}-{key}"), "shape": args.shape,
                                "variants": sorted(variants), "q_group_size": args.q_group_size})

    loadavg = [os.getloadavg()[0]]
    bandwidth = copy_bandwidth(args.bandwidth_mb)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    cfg = {"texts": texts, "batch": args.batch, "tokens": tokens, "warmup_tokens": min(10, tokens),
           "repeats": args.repeats, "threads": args.threads, "first_frame_step": first_frame_steps - 1}
    env = {**({"MKL_NUM_THREADS": str(args.threads)} if args.threads else {}),
           **({"MLX_MUSICGEN_BLAS": args.blas} if args.blas else {}),
           **({"MLX_MUSICGEN_PORTABLE": "1"} if args.portable else {}), **dict(e.split("=", 1) for e in args.env)}
    drift_from = folders["float32"] if variant != "float32" else None
    sides = {"ours": lambda: child("ours", {**cfg, "folder": folders[variant], "drift_from": drift_from}, env)}
    if not args.skip_reference:
        sides = {"reference": lambda: child("reference", {**cfg, "hf": folders["hf"]}), **sides}
    quiet = run_sides(sides, args.runs)
    if args.shared:
        for name, busy in run_sides(sides, args.runs, args.shared).items():
            quiet[name].update(shared_tokens_per_s=busy["tokens_per_s"],
                               shared_tokens_per_s_min=busy["tokens_per_s_min"],
                               kept=busy["tokens_per_s"] / quiet[name]["tokens_per_s"], shared_runs=busy["process_runs"])
    ref, ours_ = quiet.get("reference"), quiet["ours"]
    loadavg.append(os.getloadavg()[0])

    for side, folder in ((ref, folders["hf"]), (ours_, folders[variant])):
        if side:
            side["step_bytes"] = step_bytes(folder, rows=2 * args.batch)
            side["floor_ms"] = 1000 * side["step_bytes"]["per_step"] / (bandwidth * 1e9)
            side["floor_share"] = side["floor_ms"] / side["ms_per_step"]
    compared = ("tokens_per_s", "tokens_per_s_min", "tokens_per_s_max", "ms_per_step", "first_frame_s", "encodec_s",
                "t5_s", "peak_rss_mb", "floor_ms", "floor_share") + (
                ("shared_tokens_per_s", "shared_tokens_per_s_min", "kept") if args.shared else ())
    ratios = {k: ours_[k] / ref[k] for k in compared} if ref else {}
    report = {"config": {"shape": args.shape, "shape_fields": dataclasses.asdict(shape), "variant": variant,
                         "frames": tokens + 1 - first_frame_steps, "guidance_scale": GUIDANCE, "top_k": TOP_K,
                         "seed": SEED, "blas": args.blas, "portable": args.portable, "runs": args.runs,
                         "shared": args.shared, "our_env": env, **cfg, "folders": folders},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
              "bandwidth_gbps": bandwidth, "loadavg": loadavg, "reference": ref, "ours": ours_, "ratios": ratios,
              "definitions": DEFINITIONS, "date": time.strftime("%Y-%m-%d"), "argv": shown_options(sys.argv[1:])}
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown(report))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # bench_generate.py --child KIND CONFIG_JSON OUT_PATH, from child()
        kind, config, out_path = sys.argv[2:]
        import magnet_bench

        result = {"prepare": prepare, "reference": reference, "ours": ours, "magnet_prepare": magnet_bench.prepare,
                  "magnet_reference": magnet_bench.reference, "magnet_ours": magnet_bench.ours,
                  "musicgen_clip": magnet_bench.musicgen}[kind](json.loads(config))
        Path(out_path).write_text(json.dumps(result))
    else:
        main()
