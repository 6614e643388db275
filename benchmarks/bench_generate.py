#!/usr/bin/env python
"""Benchmark: this MLX port against the transformers + torch reference, same weights, same prompt, same run.

    python benchmarks/bench_generate.py                      # musicgen-small shape, float32, 500 tokens (10 s)
    python benchmarks/bench_generate.py --dtype float16      # half-precision decoder (+ drift from float32)
    python benchmarks/bench_generate.py -q 8 --skip-reference
    python benchmarks/bench_generate.py --shape tiny --tokens 8 --json out.json   # a smoke run in seconds

What it does, in one command:
1. builds (once; cached under .bench_cache/, keyed by shape) a random-weight Hub-layout checkpoint of the chosen
   shape with transformers (tests/fixtures.py), and converts it (float32, plus the dtype / quantization asked).
2. measures the memory bandwidth (numpy copy; STREAM convention: bytes read + written per second).
3. runs the reference in a child process: MusicgenForConditionalGeneration.generate(do_sample, guidance 3,
   top-k 250, max_new_tokens=N), torch threads = --threads.
4. runs this port in another child process: MusicGen.generate with the same settings, then measures the drift of
   the converted decoder's logits from the float32 model's (when the dtype is not float32 or it is quantized).
Each side gets one short warm-up generation first (excluded from every number) and runs alone, one after the
other, so each child's peak RSS is its own. Timings are the median over --repeats timed generations. The
reference's child never imports mlx_musicgen: its global BLAS preload would also take over torch's BLAS
calls (MKL), halving the reference's matmul speed.

Definitions (also printed): tokens/s = batch * decoder steps / wall seconds of the whole generate (text encoding,
decoding loop and EnCodec); real-time factor = seconds of audio made / wall seconds; time to first audio = the
whole generate (neither side streams); time to first frame = until the first frame of codes is complete (all
its codebooks, i.e. 4 decoding steps for mono; T5 included). The split: T5 = text encoder (+ projection, ours),
EnCodec = audio decode, steps = the rest.
Bandwidth floor = bytes of decoder weights one step reads (layers without the cross-attention K/V projections,
which both sides compute once per generation; final norm; the LM heads; the embedding rows looked up) / the
measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import multiprocessing as mp
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # fixtures.py builds the random checkpoints

import fixtures  # noqa: E402  (light: no torch or mlx at import time)

# Nothing here imports mlx or torch at module level: each child imports what it needs, and the MLX side imports
# mlx_musicgen before mlx.core (it loads MKL or OpenBLAS into the process first on Linux).

SHAPES = {
    "tiny": fixtures.Shape(),
    "small": fixtures.SMALL,
    "medium": dataclasses.replace(fixtures.SMALL, decoder_hidden=1536, decoder_layers=48, decoder_heads=24,
                                  decoder_ffn=4 * 1536),
    "large": dataclasses.replace(fixtures.SMALL, decoder_hidden=2048, decoder_layers=48, decoder_heads=32,
                                 decoder_ffn=4 * 2048),
}
PROMPTS = [
    "80s pop track with bassy drums and synth",
    "90s rock song with loud guitars and heavy drums",
    "lofi slow bpm electro chill with organic samples",
    "jazz trumpet solo",
]
GUIDANCE, TOP_K, SEED = 3.0, 250, 0
TARGET_RATIO, TARGET_FLOOR = 1.2, 0.8


# ---------------------------------------------------------------- helpers shared by parent and children


def rss_mb() -> dict:
    """Current and peak resident set size of this process (MB), from /proc (Linux) or getrusage."""
    try:
        status = open("/proc/self/status").read()
        now = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024
        return {"rss": now, "peak": peak}
    except (OSError, AttributeError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux
        return {"rss": None, "peak": peak}


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def machine_busy_s() -> float | None:
    """CPU-seconds the whole machine has been busy (all processes), from /proc/stat; None where unavailable."""
    try:
        fields = open("/proc/stat").readline().split()[1:]
        user, nice, system, idle, iowait, irq, softirq, steal = (int(x) for x in fields[:8])
        return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        return None


class Contention:
    """How much CPU other processes took while we timed: the machine's busy CPU-seconds minus our own.
    On a 2-core machine anything beyond a few percent of (cores x wall) means the timings are noisy."""

    def __enter__(self):
        self.busy, self.own, self.wall = machine_busy_s(), sum(os.times()[:2]), time.perf_counter()
        return self

    def __exit__(self, *exc):
        busy = machine_busy_s()
        wall = time.perf_counter() - self.wall
        own = sum(os.times()[:2]) - self.own
        self.result = {"wall_s": wall, "own_cpu_s": own}
        if busy is not None and self.busy is not None:
            other = max(0.0, busy - self.busy - own)
            self.result.update(other_cpu_s=other, other_share_of_machine=other / (wall * (os.cpu_count() or 1)))


def memory_before_timing(after_import: dict, after_load: dict) -> dict:
    """Peak RSS so far (imports, load, warm-up), then reset the peak for the timed runs.

    VmHWM belongs to the process image since exec, so a spawned child does not inherit its parent's peak
    (ru_maxrss does: Linux carries it across fork + exec)."""
    return {
        "rss_after_import_mb": after_import["rss"],
        "rss_after_load_mb": after_load["rss"],
        "peak_rss_load_warmup_mb": rss_mb()["peak"],
        "peak_reset": reset_peak_rss(),
    }


def memory_after_timing(memory: dict) -> dict:
    peak = rss_mb()["peak"]
    memory["peak_rss_generate_mb"] = peak if memory.pop("peak_reset") else None
    memory["peak_rss_mb"] = max(peak, memory["peak_rss_load_warmup_mb"])
    return memory


def shape_key(name: str, shape: fixtures.Shape) -> str:
    """Cache folder name: the shape and the fixture builder's source, so a change to either rebuilds."""
    digest = hashlib.sha1((repr(shape) + Path(fixtures.__file__).read_text()).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def variant_name(dtype: str, q_bits: int | None, q_group_size: int) -> str:
    return f"{dtype}" + (f"-q{q_bits}g{q_group_size}" if q_bits else "")


def tokens_for(shape: fixtures.Shape, tokens: int | None, duration: float | None) -> int:
    """Decoder steps: given, or for a duration (frames = steps + 1 - codebooks per channel, as generate does)."""
    if tokens is not None:
        return tokens
    hop = 1
    for r in shape.upsampling_ratios:
        hop *= r
    frames = round(duration * shape.sampling_rate / hop)
    return frames + shape.num_codebooks // shape.audio_channels - 1


def best_window_ms(stamps: list[float], window: int = 50) -> float | None:
    """Mean ms/step of the fastest `window` consecutive steps: the steady state with the least interference
    from other processes (a noisy machine slows some stretches, not all)."""
    if len(stamps) <= window:
        return None
    return 1000 * min(stamps[i + window] - stamps[i] for i in range(len(stamps) - window)) / window


def summarize(values: list[float]) -> float:
    return statistics.median(values)


def run_child(target, config: dict) -> dict:
    """Run target(config, conn) in a fresh spawned process and return what it sends; re-raise its failure."""
    ctx = mp.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child_main, args=(target, config, child_conn), daemon=False)
    process.start()
    child_conn.close()
    result = None
    try:
        result = parent_conn.recv()
    except EOFError:
        pass
    process.join()
    if result is None:
        raise SystemExit(f"{target.__name__} died with exit code {process.exitcode} (out of memory?).")
    if "error" in result:
        raise SystemExit(f"{target.__name__} failed:\n{result['error']}")
    return result


def _child_main(target, config, conn):
    try:
        conn.send(target(config))
    except BaseException:
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- bandwidth


def measure_gemv_bandwidth(megabytes: int = 1024, repeats: int = 5) -> float:
    """GB/s at which numpy's BLAS streams a large float32 matrix through a matrix-vector product (sgemv): the
    fastest single pass over weights this machine offers to a one-row decoding step."""
    import numpy as np

    cols = 8192
    w = np.ones((max(1, megabytes * 2**20 // (4 * cols)), cols), dtype=np.float32)
    x = np.ones(cols, dtype=np.float32)
    w @ x
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        w @ x
        best = min(best, time.perf_counter() - t)
    return w.nbytes / best / 1e9


def measure_copy_bandwidth(megabytes: int = 512, repeats: int = 7) -> float:
    """GB/s of a large numpy copy, counting bytes read + written (the STREAM 'copy' convention); best of repeats."""
    import numpy as np

    n = megabytes * 2**20 // 4
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch the pages
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t)
    return 2 * src.nbytes / best / 1e9


# ---------------------------------------------------------------- child: build and convert


def prepare_worker(cfg: dict) -> dict:
    """Build the Hub-layout checkpoint (once) and the MLX conversions asked for (once each), atomically."""
    import mlx_musicgen  # noqa: F401  (BLAS first)
    from mlx_musicgen import loading
    from mlx_musicgen.convert import convert

    root = Path(cfg["cache_dir"]) / cfg["key"]
    root.mkdir(parents=True, exist_ok=True)
    hf = root / "hf"
    out = {"hf": str(hf), "built": False, "converted": [], "build_s": 0.0, "convert_s": 0.0}
    if not (hf / "COMPLETE").is_file():
        import logging

        logging.getLogger("transformers").setLevel(logging.ERROR)
        shape = SHAPES[cfg["shape"]]
        t = time.perf_counter()
        staging = Path(tempfile.mkdtemp(prefix=".hf.", dir=root))
        try:
            fixtures.build_checkpoint(staging, shape, seed=0)
            (staging / "COMPLETE").write_text(repr(shape))
            if hf.exists():
                shutil.rmtree(hf)
            os.replace(staging, hf)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        out["built"], out["build_s"] = True, time.perf_counter() - t
    out["variants"] = {}
    for dtype, q_bits in cfg["variants"]:
        name = variant_name(dtype, q_bits, cfg["q_group_size"])
        folder = root / f"mlx-{name}"
        usable = (folder / "model.safetensors").is_file()
        if usable:
            try:
                loading.read_config(folder)  # refuses another format version
            except loading.CheckpointError:
                usable = False
        if not usable:
            t = time.perf_counter()
            convert(hf, folder, dtype=dtype, q_bits=q_bits, q_group_size=cfg["q_group_size"], overwrite=True)
            out["convert_s"] += time.perf_counter() - t
            out["converted"].append(name)
        out["variants"][name] = str(folder)
    return out


# ---------------------------------------------------------------- child: the reference


def torch_device():
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def reference_worker(cfg: dict) -> dict:
    import logging

    import torch
    import transformers
    from transformers import MusicgenForConditionalGeneration, MusicgenProcessor

    logging.getLogger("transformers").setLevel(logging.ERROR)
    transformers.utils.logging.set_verbosity_error()
    after_import = rss_mb()
    torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(False)
    device = torch_device()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()
        elif device.type == "mps":
            torch.mps.synchronize()

    t = time.perf_counter()
    dtype = getattr(torch, cfg["reference_dtype"])
    model = MusicgenForConditionalGeneration.from_pretrained(cfg["hf"], dtype=dtype).to(device).eval()
    processor = MusicgenProcessor.from_pretrained(cfg["hf"])
    sync()
    load_s = time.perf_counter() - t
    after_load = rss_mb()

    timers = {"t5": 0.0, "encodec": 0.0, "steps": []}

    def timed(module, name, record):
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = original(*args, **kwargs)
            sync()
            end = time.perf_counter()
            record(start, end)
            return result

        setattr(module, name, wrapper)

    timed(model.text_encoder, "forward", lambda s, e: timers.__setitem__("t5", timers["t5"] + e - s))
    timed(model.audio_encoder, "decode", lambda s, e: timers.__setitem__("encodec", timers["encodec"] + e - s))
    timed(model.decoder, "forward", lambda s, e: timers["steps"].append(e))

    def generate(tokens: int) -> dict:
        timers.update(t5=0.0, encodec=0.0, steps=[])
        torch.manual_seed(SEED)
        sync()
        t0 = time.perf_counter()
        inputs = processor(text=cfg["texts"], padding=True, return_tensors="pt").to(device)
        audio = model.generate(**inputs, do_sample=True, guidance_scale=GUIDANCE, top_k=TOP_K, max_new_tokens=tokens)
        sync()
        total = time.perf_counter() - t0
        steps = timers["steps"]
        extra = max(0, len(steps) - tokens)
        return {
            "total_s": total,
            "t5_s": timers["t5"],
            "encodec_s": timers["encodec"],
            "steps_s": total - timers["t5"] - timers["encodec"],
            # the first frame is complete once every codebook has its first code: after (codebooks per channel)
            # steps. transformers 5 runs one more decoder forward than tokens (generate prefills, then _sample
            # prefills again): the extra one comes first.
            "first_frame_s": steps[extra + cfg["first_frame_steps"] - 1] - t0
            if len(steps) >= extra + cfg["first_frame_steps"] else None,
            "ms_per_step": 1000 * statistics.median(b - a for a, b in zip(steps, steps[1:])) if len(steps) > 2 else None,
            "ms_per_step_best_window": best_window_ms(steps),
            "decoder_calls": len(steps),
            "samples": int(audio.shape[-1]),
        }

    t = time.perf_counter()
    generate(cfg["warmup_tokens"])
    warmup_s = time.perf_counter() - t
    memory = memory_before_timing(after_import, after_load)
    with Contention() as contention:
        runs = [generate(cfg["tokens"]) for _ in range(cfg["repeats"])]
    memory = memory_after_timing(memory)
    if device.type == "cuda":
        memory["device_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {
        "name": "reference",
        "framework": f"transformers {transformers.__version__} + torch {torch.__version__}",
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": cfg["reference_dtype"],
        "load_s": load_s,
        "warmup_s": warmup_s,
        "runs": runs,
        "memory": memory,
        "contention": contention.result,
    }


# ---------------------------------------------------------------- child: this port


def step_bytes(model, rows_per_table: int, texts: list[str]) -> dict:
    """Bytes of decoder parameters one decoding step reads, by part (quantized scales/biases included)."""
    from mlx.utils import tree_flatten

    import re

    # the text's keys and values are projected once per generation: encoder_attn.{k,v}_proj in the plain layers,
    # text_{k,v}_proj in the CPU split layers (mlx_musicgen/cpu.py)
    once = re.compile(r"\.(encoder_attn\.[kv]_proj|text_[kv]_proj)\.")
    parts = {"layers": 0, "heads": 0, "embeddings": 0, "norm": 0, "cross_kv_once": 0}
    for name, p in tree_flatten(model.decoder.parameters()):
        if once.search(name):
            parts["cross_kv_once"] += p.nbytes  # projected once per generation (text_context), not per step
        elif name.startswith("layers."):
            parts["layers"] += p.nbytes
        elif name.startswith("lm_heads."):
            parts["heads"] += p.nbytes
        elif name.startswith("embed_tokens."):
            parts["embeddings"] += p.nbytes // p.shape[0] * min(rows_per_table, p.shape[0])
        else:
            parts["norm"] += p.nbytes
    per_step = sum(v for k, v in parts.items() if k != "cross_kv_once")
    if getattr(model, "enc_to_dec_proj", None) is not None:
        parts["enc_to_dec_proj_once"] = sum(p.nbytes for _, p in tree_flatten(model.enc_to_dec_proj.parameters()))
    return {"per_step": per_step, "ours_per_step": per_step + folding_saves(model, texts), **parts}


def folding_saves(model, texts: list[str]) -> int:
    """Bytes per step that folding cross-attention's query and output projections into these texts' keys and
    values changes (decoder.DecoderLayer.text_kv): minus the two weights, plus the folded keys and values."""
    states, mask = model.conditioning(texts, len(texts), guided=True)
    change = 0
    for layer, text in zip(model.decoder.layers, model.decoder.text_context(states, mask).kv):
        if isinstance(text, dict) and "folded_keys" in text:
            attn = layer.encoder_attn
            change -= attn.q_proj.weight.nbytes + attn.out_proj.weight.nbytes
            change += sum(text[k].nbytes for k in ("folded_keys", "folded_values") if text[k] is not None)
    return change


def kv_cache_bytes(model, rows: int, tokens: int) -> float:
    """Mean bytes of self-attention keys + values read per step over a generation of `tokens` steps."""
    c = model.config.decoder
    itemsize = model.decoder.layer_norm.weight.dtype.size
    mean_positions = (tokens + 1) / 2
    return 2 * c.num_hidden_layers * rows * c.hidden_size * mean_positions * itemsize


def mlx_matvec_bandwidth(mx, rows: int) -> float:
    """GB/s at which MLX streams a 1 GB float32 weight matrix (32768 x 8192, larger than any CPU cache) through
    (rows x 8192) @ W.T, the decoder's projection shape: what its matmuls can reach on this device."""
    w = mx.full((32768, 8192), 0.01)
    x = mx.ones((rows, 8192))
    mx.eval(w, x)
    mx.eval(x @ w.T)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(x @ w.T)
        best = min(best, time.perf_counter() - t)
    del w
    return 32768 * 8192 * 4 / best / 1e9


def mlx_copy_bandwidth(mx) -> float:
    a = mx.ones((64 * 2**20,))
    mx.eval(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        mx.eval(a + 1)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9


def drift(cfg: dict, variant_folder: str, positions: int = 32) -> dict:
    """Logits of the converted decoder against the float32 model's, teacher-forced on the same codes:
    the first decoding step (through the KV cache, as generation runs it) and `positions` steps at once."""
    import mlx.core as mx
    import numpy as np

    from mlx_musicgen import MusicGen, delay
    from mlx_musicgen.sampling import apply_guidance

    def logits(folder: str, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        model = MusicGen.from_pretrained(folder)
        states, mask = model.conditioning(cfg["texts"], len(cfg["texts"]), True)
        text = model.decoder.text_context(states, mask)
        guided_codes = mx.array(np.concatenate([codes, codes]))
        cache = model.decoder.make_cache(guided_codes.shape[0], codes.shape[-1])
        first = model.decoder(guided_codes[:, :, :1], text, cache)
        every = model.decoder(guided_codes, text)
        result = np.array(first.astype(mx.float32)), np.array(every.astype(mx.float32))
        del model
        mx.clear_cache()
        return result

    config = json.loads((Path(variant_folder) / "config.json").read_text())
    pad = config["decoder"]["vocab_size"]
    K = config["decoder"]["num_codebooks"]
    channels = config["decoder"].get("audio_channels", 1)
    rng = np.random.default_rng(SEED)
    prompt = rng.integers(0, pad, size=(len(cfg["texts"]), K, positions)).astype(np.int32)
    prompt[:, :, 0] = pad  # the start column
    codes = delay.delay_pattern(prompt, positions, pad, channels)

    def rel(a, e):
        return float(np.max(np.abs(a - e)) / max(float(np.max(np.abs(e))), 1e-12))

    ref_first, ref_every = logits(cfg["variants"]["float32"], codes)
    got_first, got_every = logits(variant_folder, codes)
    guided = lambda x: np.array(apply_guidance(mx.array(x), GUIDANCE))  # noqa: E731
    g_ref, g_got = guided(ref_every), guided(got_every)
    return {
        "first_step_max_rel_err": rel(got_first, ref_first),
        "first_step_guided_max_rel_err": rel(guided(got_first), guided(ref_first)),
        f"teacher_forced_{positions}_max_rel_err": rel(got_every, ref_every),
        f"teacher_forced_{positions}_guided_max_rel_err": rel(g_got, g_ref),
        "top1_agreement_guided": float(np.mean(g_got.argmax(-1) == g_ref.argmax(-1))),
        "positions": positions,
        "definition": "max |x - x_float32| / max |x_float32| over rows, codebooks, positions and vocabulary",
    }


def mlx_worker(cfg: dict) -> dict:
    if cfg.get("threads"):  # read when MKL loads (OpenBLAS keeps mlx_musicgen's one thread: see mlx_musicgen/_linux.py)
        os.environ.setdefault("MKL_NUM_THREADS", str(cfg["threads"]))
    if cfg.get("blas"):
        os.environ["MLX_MUSICGEN_BLAS"] = cfg["blas"]
    import mlx_musicgen  # noqa: F401  (loads the optimized BLAS before mlx.core)
    import mlx.core as mx

    blas = mlx_musicgen.BLAS

    from mlx_musicgen import MusicGen

    after_import = rss_mb()
    folder = cfg["variants"][cfg["variant"]]
    t = time.perf_counter()
    model = MusicGen.from_pretrained(folder)
    load_s = time.perf_counter() - t
    after_load = rss_mb()
    active_after_load = mx.get_active_memory() / 2**20

    timers = {"t5": 0.0, "tokens": 0.0, "encodec": 0.0, "progress": []}
    conditioning, generate_tokens, decode = model.conditioning, model.generate_tokens, model.decode

    def timed_conditioning(*args, **kwargs):
        start = time.perf_counter()
        result = conditioning(*args, **kwargs)
        mx.eval(result)  # T5 (+ projection) on its own, so the split is exact; it would run in step 1 anyway
        timers["t5"] += time.perf_counter() - start
        return result

    def timed_generate_tokens(*args, **kwargs):
        start = time.perf_counter()
        result = generate_tokens(*args, **kwargs)
        timers["tokens"] += time.perf_counter() - start
        return result

    def timed_decode(*args, **kwargs):
        start = time.perf_counter()
        result = decode(*args, **kwargs)
        timers["encodec"] += time.perf_counter() - start
        return result

    model.conditioning, model.generate_tokens, model.decode = timed_conditioning, timed_generate_tokens, timed_decode

    def generate(tokens: int) -> dict:
        timers.update(t5=0.0, tokens=0.0, encodec=0.0, progress=[])
        t0 = time.perf_counter()
        audio = model.generate(cfg["texts"], max_new_tokens=tokens, do_sample=True, guidance_scale=GUIDANCE,
                               top_k=TOP_K, seed=SEED, progress=lambda i, n: timers["progress"].append(time.perf_counter()))
        total = time.perf_counter() - t0
        # progress is called as frames of codes come out of the decoding loop, each as soon as all its codebooks
        # are decoded: the first call is the first complete frame, then one frame per step.
        done = timers["progress"]
        samples = audio.shape[-1] if hasattr(audio, "shape") else audio[0].shape[-1]
        return {
            "total_s": total,
            "t5_s": timers["t5"],
            "encodec_s": timers["encodec"],
            "steps_s": total - timers["t5"] - timers["encodec"],
            "first_frame_s": done[0] - t0 if done else None,
            "ms_per_step": 1000 * statistics.median(b - a for a, b in zip(done, done[1:])) if len(done) > 2 else None,
            "ms_per_step_best_window": best_window_ms(done),
            "progress_calls": len(done),
            "samples": int(samples),
        }

    t = time.perf_counter()
    generate(cfg["warmup_tokens"])
    warmup_s = time.perf_counter() - t
    memory = memory_before_timing(after_import, after_load)
    mx.reset_peak_memory()
    with Contention() as contention:
        runs = [generate(cfg["tokens"]) for _ in range(cfg["repeats"])]
    memory = memory_after_timing(memory)
    memory["mlx_active_after_load_mb"] = active_after_load
    memory["mlx_peak_generate_mb"] = mx.get_peak_memory() / 2**20
    rows = 2 * len(cfg["texts"])  # guidance doubles the batch
    weights = step_bytes(model, rows, cfg["texts"])
    device = mx.default_device()
    bandwidth = {"mlx_matvec_gbps": mlx_matvec_bandwidth(mx, rows)}
    if device.type != mx.cpu:
        bandwidth["mlx_copy_gbps"] = mlx_copy_bandwidth(mx)
    result = {
        "name": "ours",
        "framework": f"mlx {mx.__version__}" + (f" + {blas}" if blas else ""),
        "device": str(device),
        "threads": cfg.get("threads"),
        "dtype": cfg["dtype"],
        "quantization": model.config.quantization,
        "load_s": load_s,
        "warmup_s": warmup_s,
        "runs": runs,
        "memory": memory,
        "contention": contention.result,
        "weight_bytes": weights,
        "kv_cache_bytes_mean_per_step": kv_cache_bytes(model, rows, cfg["tokens"]),
        "bandwidth": bandwidth,
    }
    del model
    mx.clear_cache()
    if cfg["variant"] != "float32":
        result["drift"] = drift(cfg, folder)
    return result


# ---------------------------------------------------------------- parent: report


def side_summary(side: dict, batch: int, tokens: int, sampling_rate: int) -> dict:
    runs = side["runs"]
    total = summarize([r["total_s"] for r in runs])
    audio_s = batch * runs[0]["samples"] / sampling_rate
    summary = {
        "tokens_per_s": batch * tokens / total,
        "decode_loop_tokens_per_s": batch * tokens / summarize([r["steps_s"] for r in runs]),
        "real_time_factor": audio_s / total,
        "total_s": total,
        "time_to_first_audio_s": total,
        "time_to_first_frame_s": summarize([r["first_frame_s"] for r in runs]) if runs[0]["first_frame_s"] else None,
        "t5_s": summarize([r["t5_s"] for r in runs]),
        "steps_s": summarize([r["steps_s"] for r in runs]),
        "encodec_s": summarize([r["encodec_s"] for r in runs]),
        "ms_per_step_mean": 1000 * summarize([r["steps_s"] for r in runs]) / tokens,
        "ms_per_step_median": summarize([r["ms_per_step"] for r in runs]) if runs[0]["ms_per_step"] else None,
        "ms_per_step_best_window": min(r["ms_per_step_best_window"] for r in runs) if runs[0]["ms_per_step_best_window"] else None,
        "audio_s": audio_s,
        "all_totals_s": [r["total_s"] for r in runs],
    }
    return summary


def table(report: dict) -> str:
    ref, ours = report.get("reference"), report["ours"]
    rs, os_ = (ref or {}).get("summary", {}), ours["summary"]
    lines = []
    cfg = report["config"]
    lines.append(
        f"MusicGen generate benchmark - shape {cfg['shape']} (decoder {cfg['decoder']}), batch {cfg['batch']} "
        f"x guidance {GUIDANCE:g} ({2 * cfg['batch']} rows), sampling top-k {TOP_K}, {cfg['tokens']} tokens -> "
        f"{os_['audio_s'] / cfg['batch']:.2f} s of audio per item"
    )
    lines.append(
        f"machine: {report['machine']['platform']}, {report['machine']['cpus']} CPUs, load avg "
        f"{report['machine']['loadavg_before'][0]:.2f} before / {report['machine']['loadavg_after'][0]:.2f} after"
    )
    if ref:
        lines.append(f"reference: {ref['framework']} on {ref['device']}, {ref['threads']} threads, {ref['dtype']}")
    lines.append(
        f"ours:      {ours['framework']} on {ours['device']}, decoder {cfg['variant']}"
        f" (T5 and EnCodec float32)"
    )
    lines.append(
        f"warm-up: one {cfg['warmup_tokens']}-token generation per side, excluded; timed: median of "
        f"{cfg['repeats']} run(s); each side in its own child process, one after the other"
    )
    lines.append("")

    def fmt(v, spec):
        return "-" if v is None else format(v, spec)

    rows = [  # (label, key, format, higher is better)
        ("tokens/s (batch x steps / whole generate)", "tokens_per_s", ".2f", True),
        ("decoding-loop tokens/s (steps only)", "decode_loop_tokens_per_s", ".2f", True),
        ("real-time factor (audio s / wall s)", "real_time_factor", ".3f", True),
        ("whole generate, s", "total_s", ".2f", False),
        ("time to first audio, s (no streaming)", "time_to_first_audio_s", ".2f", False),
        ("time to first frame of codes, s", "time_to_first_frame_s", ".3f", False),
        ("  T5 text encoder, s", "t5_s", ".3f", False),
        ("  decoding steps, s", "steps_s", ".2f", False),
        ("  EnCodec decode, s", "encodec_s", ".2f", False),
        ("ms/step (steps s / steps)", "ms_per_step_mean", ".1f", False),
        ("ms/step (median, steady state)", "ms_per_step_median", ".1f", False),
        ("ms/step (fastest 50 consecutive steps)", "ms_per_step_best_window", ".1f", False),
    ]
    width = 44
    lines.append(f"{'':{width}} {'reference':>12} {'ours':>12} {'speedup':>9}")
    for label, key, spec, higher_better in rows:
        r, o = rs.get(key), os_.get(key)
        ratio = ""
        if r and o:
            ratio = f"{(o / r if higher_better else r / o):.2f}x"
        lines.append(f"{label:{width}} {fmt(r, spec):>12} {fmt(o, spec):>12} {ratio:>9}")
    mem_rows = [
        ("peak RSS of the child (all of it), MB", "peak_rss_mb"),
        ("RSS after imports, MB", "rss_after_import_mb"),
        ("RSS after loading the model, MB", "rss_after_load_mb"),
        ("peak RSS, load + warm-up, MB", "peak_rss_load_warmup_mb"),
        ("peak RSS, timed generation only, MB", "peak_rss_generate_mb"),
        ("MLX allocator: active after load, MB", "mlx_active_after_load_mb"),
        ("MLX allocator: peak during generation, MB", "mlx_peak_generate_mb"),
        ("torch CUDA peak allocated, MB", "device_peak_mb"),
    ]
    for label, key in mem_rows:
        r = (ref or {}).get("memory", {}).get(key)
        o = ours["memory"].get(key)
        if r is None and o is None:
            continue
        lines.append(f"{label:{width}} {fmt(r, '.0f'):>12} {fmt(o, '.0f'):>12}")
    shares = [side.get("contention", {}).get("other_share_of_machine") for side in (ref or {}, ours)]
    if any(x is not None for x in shares):
        lines.append(f"{'other processes CPU share while timing':{width}} "
                     f"{fmt(None if shares[0] is None else 100 * shares[0], '.0f'):>11}% {fmt(None if shares[1] is None else 100 * shares[1], '.0f'):>11}%"
                     + ("   <- timings are noisy" if any(x is not None and x > 0.05 for x in shares) else ""))
    lines.append(f"{'load time, s':{width}} {fmt((ref or {}).get('load_s'), '.1f'):>12} {fmt(ours['load_s'], '.1f'):>12}")
    lines.append("")
    floor = report["floor"]
    lines.append(
        f"bandwidth floor: decoder weights read per step {floor['weight_gb_per_step']:.3f} GB "
        f"(cross-attention K/V projections excluded: once per generation) at {floor['bandwidth_gbps']:.1f} GB/s "
        f"({floor['bandwidth_source']}) -> {floor['floor_ms_per_step']:.1f} ms/step"
    )
    lines.append(
        f"  ours {floor['ours_ms_per_step']:.1f} ms/step (steady median) = {100 * floor['fraction_of_floor']:.0f}% "
        f"of floor speed; with the mean self-attention KV cache read ({floor['kv_gb_per_step']:.3f} GB/step) the floor "
        f"is {floor['floor_with_kv_ms_per_step']:.1f} ms ({100 * floor['fraction_of_floor_with_kv']:.0f}%)"
    )
    if floor["ours_gb_per_step"] != floor["weight_gb_per_step"]:
        lines.append(f"  ours reads {floor['ours_gb_per_step']:.3f} GB/step of them (cross-attention's query and output "
                     f"projections folded into the text's keys and values): its own floor is "
                     f"{floor['ours_floor_ms_per_step']:.1f} ms/step = {100 * floor['ours_fraction_of_own_floor']:.0f}%")
    if "fraction_of_floor_best_window" in floor:
        lines.append(f"  ours over its fastest 50 consecutive steps: {floor['ours_best_window_ms_per_step']:.1f} ms/step = "
                     f"{100 * floor['fraction_of_floor_best_window']:.0f}% of floor speed")
    lines.append(f"  at numpy's sgemv read rate ({floor['numpy_gemv_gbps']:.1f} GB/s, one pass, one row) the floor would be "
                 f"{floor['floor_at_gemv_rate_ms_per_step']:.1f} ms/step")
    lines.append(f"  MLX matmul streaming rate on this device ({2 * cfg['batch']} rows @ a 1 GB float32 matrix): "
                 f"{ours['bandwidth']['mlx_matvec_gbps']:.1f} GB/s")
    if "ref_ms_per_step" in floor:
        lines.append(f"  reference {floor['ref_ms_per_step']:.1f} ms/step = {100 * floor['ref_fraction_of_floor']:.0f}% of floor speed")
    if ours.get("drift"):
        d = ours["drift"]
        lines.append("")
        lines.append(f"drift of the {cfg['variant']} decoder from float32 (max |x - x32| / max |x32|):")
        for k, v in d.items():
            if isinstance(v, float):
                lines.append(f"  {k}: {v:.3g}")
    if report.get("targets"):
        lines.append("")
        for name, t in report["targets"].items():
            verdict = "PASS" if t["pass"] else "FAIL"
            if not t["applicable"]:
                verdict += " (informative: the targets are set for the small shape, float32, 1 prompt, 500 tokens, CPU)"
            lines.append(f"target {name}: {t['value']:.2f} (want >= {t['want']}) -> {verdict}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="small",
                   help="random-weight model shape: musicgen-small/medium/large's, or a tiny one for smoke runs")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="our decoder's dtype")
    p.add_argument("-q", "--q-bits", type=int, choices=[4, 8], default=None, help="quantize our decoder")
    p.add_argument("--q-group-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=1, help="prompts (each doubled by guidance)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--tokens", type=int, default=None, help="decoder steps (default 500: 10 s at 50 Hz)")
    length.add_argument("--duration", type=float, default=None, help="seconds of audio instead of --tokens")
    p.add_argument("--repeats", type=int, default=1, help="timed generations per side (median reported)")
    p.add_argument("--warmup-tokens", type=int, default=10)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (and MKL threads)")
    p.add_argument("--reference-dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--blas", choices=["mkl", "openblas"], default=None,
                   help="our side's BLAS on Linux (default: MKL when installed, else OpenBLAS; see mlx_musicgen/_linux.py)")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".bench_cache")
    p.add_argument("--bandwidth-mb", type=int, default=512,
                   help="array size of the copy-bandwidth measurement (twice it for sgemv); keep it above the L3")
    p.add_argument("--json", type=Path, default=None, help="write every number here")
    args = p.parse_args(argv)
    if args.tokens is None and args.duration is None:
        args.tokens = 500
    shape = SHAPES[args.shape]
    tokens = tokens_for(shape, args.tokens, args.duration)
    if tokens < 1 or args.batch < 1 or args.repeats < 1:
        p.error("tokens, batch and repeats must be positive")
    variant = variant_name(args.dtype, args.q_bits, args.q_group_size)
    texts = [PROMPTS[i % len(PROMPTS)] for i in range(args.batch)]
    loadavg_before = os.getloadavg()

    key = shape_key(args.shape, shape)
    wanted = [("float32", None)] + ([(args.dtype, args.q_bits)] if variant != "float32" else [])
    log(f"checkpoint {args.cache_dir / key} (built once, then reused) and conversions {[variant_name(d, q, args.q_group_size) for d, q in wanted]}")
    prepared = run_child(prepare_worker, {"cache_dir": str(args.cache_dir), "key": key, "shape": args.shape,
                                         "variants": wanted, "q_group_size": args.q_group_size})
    if prepared["built"]:
        log(f"built the checkpoint in {prepared['build_s']:.0f} s")
    if prepared["converted"]:
        log(f"converted {prepared['converted']} in {prepared['convert_s']:.0f} s")

    bandwidth = measure_copy_bandwidth(args.bandwidth_mb)
    gemv_bandwidth = measure_gemv_bandwidth(2 * args.bandwidth_mb)
    log(f"copy bandwidth {bandwidth:.1f} GB/s, numpy sgemv read rate {gemv_bandwidth:.1f} GB/s")
    common = {"first_frame_steps": shape.num_codebooks // shape.audio_channels, "hf": prepared["hf"],
              "variants": prepared["variants"], "texts": texts, "tokens": tokens,
              "warmup_tokens": min(args.warmup_tokens, tokens), "repeats": args.repeats, "threads": args.threads}
    reference = None
    if not args.skip_reference:
        log(f"reference: {args.repeats} x {tokens} tokens")
        reference = run_child(reference_worker, {**common, "reference_dtype": args.reference_dtype})
    log(f"ours ({variant}): {args.repeats} x {tokens} tokens")
    ours = run_child(mlx_worker, {**common, "variant": variant, "dtype": args.dtype, "blas": args.blas})
    loadavg_after = os.getloadavg()

    hop = 1
    for r in shape.upsampling_ratios:
        hop *= r
    sides = [s for s in (reference, ours) if s]
    for side in sides:
        side["summary"] = side_summary(side, args.batch, tokens, shape.sampling_rate)
    on_gpu = not ours["device"].lower().startswith("device(cpu")
    bw, bw_source = bandwidth, "numpy copy, read + write bytes"
    if on_gpu and "mlx_copy_gbps" in ours["bandwidth"]:
        bw, bw_source = ours["bandwidth"]["mlx_copy_gbps"], "MLX device copy, read + write bytes"
    weight_bytes = ours["weight_bytes"]["per_step"]
    kv = ours["kv_cache_bytes_mean_per_step"]
    steady = ours["summary"]["ms_per_step_median"] or ours["summary"]["ms_per_step_mean"]
    floor_ms = 1000 * weight_bytes / (bw * 1e9)
    floor_kv_ms = 1000 * (weight_bytes + kv) / (bw * 1e9)
    floor = {
        "weight_gb_per_step": weight_bytes / 1e9,
        "kv_gb_per_step": kv / 1e9,
        "bandwidth_gbps": bw,
        "bandwidth_source": bw_source,
        "numpy_copy_gbps": bandwidth,
        "numpy_gemv_gbps": gemv_bandwidth,
        "floor_at_gemv_rate_ms_per_step": 1000 * weight_bytes / (gemv_bandwidth * 1e9),
        "floor_ms_per_step": floor_ms,
        "floor_with_kv_ms_per_step": floor_kv_ms,
        "ours_ms_per_step": steady,
        "fraction_of_floor": floor_ms / steady,
        "fraction_of_floor_with_kv": floor_kv_ms / steady,
        "ours_gb_per_step": ours["weight_bytes"]["ours_per_step"] / 1e9,
        "ours_floor_ms_per_step": 1000 * ours["weight_bytes"]["ours_per_step"] / (bw * 1e9),
    }
    floor["ours_fraction_of_own_floor"] = floor["ours_floor_ms_per_step"] / steady
    if ours["summary"]["ms_per_step_best_window"]:
        floor["ours_best_window_ms_per_step"] = ours["summary"]["ms_per_step_best_window"]
        floor["fraction_of_floor_best_window"] = floor_ms / ours["summary"]["ms_per_step_best_window"]
    if reference:
        ref_steady = reference["summary"]["ms_per_step_median"] or reference["summary"]["ms_per_step_mean"]
        # the reference reads the same float32 weights per step (it caches cross-attention K/V after step 1)
        ref_bytes = weight_bytes if args.dtype == "float32" and not args.q_bits else None
        if ref_bytes:
            floor["ref_ms_per_step"] = ref_steady
            floor["ref_fraction_of_floor"] = floor_ms / ref_steady
    targets = {}
    applicable = (args.shape == "small" and variant == "float32" and args.batch == 1 and tokens == 500
                  and not on_gpu)
    if reference:
        ratio = ours["summary"]["tokens_per_s"] / reference["summary"]["tokens_per_s"]
        targets["tokens/s ours / reference"] = {"value": ratio, "want": TARGET_RATIO, "pass": ratio >= TARGET_RATIO,
                                                  "applicable": applicable}
    targets["fraction of bandwidth-floor speed"] = {"value": floor["fraction_of_floor"], "want": TARGET_FLOOR,
                                                    "pass": floor["fraction_of_floor"] >= TARGET_FLOOR,
                                                    "applicable": applicable}
    report = {
        "config": {
            "shape": args.shape, "decoder": f"{shape.decoder_hidden}x{shape.decoder_layers}, {shape.decoder_heads} heads, "
            f"{shape.num_codebooks} codebooks", "shape_fields": dataclasses.asdict(shape), "variant": variant,
            "dtype": args.dtype, "q_bits": args.q_bits, "q_group_size": args.q_group_size, "batch": args.batch,
            "texts": texts, "tokens": tokens, "frames": tokens + 1 - shape.num_codebooks // shape.audio_channels,
            "frame_rate": shape.sampling_rate / hop, "guidance_scale": GUIDANCE, "top_k": TOP_K, "seed": SEED,
            "repeats": args.repeats, "warmup_tokens": common["warmup_tokens"], "threads": args.threads,
            "cache": str(args.cache_dir / key),
        },
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "loadavg_before": loadavg_before, "loadavg_after": loadavg_after},
        "definitions": {
            "tokens_per_s": "batch * decoder steps / wall seconds of the whole generate (T5 + steps + EnCodec)",
            "real_time_factor": "seconds of audio produced / wall seconds of the whole generate",
            "time_to_first_audio_s": "neither side streams: the whole generate",
            "time_to_first_frame_s": "from the call until the first frame of codes is complete (all its codebooks: "
                                     "codebooks-per-channel decoding steps, T5 included); ours from the progress "
                                     "callback, the reference from its decoder calls",
            "split": "t5 = text encoder (+ our projection); encodec = audio decode; steps = the rest",
            "peak_rss_mb": "peak RSS (VmHWM) of each side's own child process: imports, load, warm-up, timed runs "
                           "(our drift check runs after and is not counted)",
            "peak_rss_generate_mb": "VmHWM after resetting it (/proc/self/clear_refs) just before the timed runs",
            "warm_up": "one short generation per side before timing, excluded",
            "floor": "decoder weight bytes read per step / copy bandwidth; fraction = floor ms / measured ms",
        },
        "reference": reference,
        "ours": ours,
        "floor": floor,
        "targets": targets,
    }
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2, default=str))
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
