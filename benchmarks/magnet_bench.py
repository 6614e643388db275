"""`bench_generate.py --magnet`: MAGNeT here against audiocraft's MAGNeT on torch, and against our MusicGen of the
same size making the same seconds of audio, in one run, fresh processes taking turns.

The MAGNeT checkpoint is random, built by audiocraft's own builders (tests/audiocraft_reference.py) in the
shape of --shape (its T5 and EnCodec too) and exported as audiocraft exports its releases; audiocraft's side loads
it with load_lm_model_magnet and runs its generate (its attention by torch: xformers is not installed, and its
xformers path is given torch's attention, as in the tests). Each side generates once to warm up (one pass a
codebook), then the timed clip: T5, every pass and EnCodec, as a user waits for it.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

DEFINITIONS = {
    "seconds": "the whole generate of the clip: T5, the passes (MusicGen: the steps) and EnCodec",
    "passes": "forward passes of the transformer over the whole clip (MusicGen: decoding steps)",
    "s_per_pass": "median interval between passes (MusicGen: between steps)",
    "frames_per_s": "batch x frames of the clip / seconds",
    "sooner": "our MusicGen's seconds / our MAGNeT's seconds for the same audio: above 1, MAGNeT's clip arrives first",
}


def prepare(cfg: dict) -> dict:
    """The MAGNeT checkpoint in audiocraft's format (built once): its T5 (the Hub checkpoint's, random) in a folder
    of its own, the LM and the codec exported as audiocraft exports them."""
    import torch
    from transformers import MusicgenForConditionalGeneration

    import audiocraft_reference as acref
    import fixtures

    root = Path(cfg["root"])
    folder, t5 = root / "magnet", root / "t5"
    if (root / "COMPLETE").is_file():
        return {"magnet": str(folder), "t5": str(t5)}
    shutil.rmtree(root, ignore_errors=True)
    shape = fixtures.Shape(**cfg["shape_fields"])
    torch.set_grad_enabled(False)
    hub = MusicgenForConditionalGeneration.from_pretrained(cfg["hf"])
    hub.text_encoder.save_pretrained(t5)
    for name in ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(cfg["hf"]) / name).is_file():
            shutil.copyfile(Path(cfg["hf"]) / name, t5 / name)
    lm_cfg = acref.lm_config("t5-base", dim=shape.decoder_hidden, heads=shape.decoder_heads,
                             layers=shape.decoder_layers, n_q=shape.num_codebooks, card=shape.codebook_size,
                             duration=int(cfg["seconds"]), solver="magnet", sample_rate=shape.sampling_rate)
    with acref.LocalT5(t5, shape.text_hidden), acref.xformers_backend():
        acref.export(folder / "state_dict.bin", acref.random_lm(lm_cfg, head_scale=1.0).state_dict(), lm_cfg)
    codec_cfg = acref.codec_config(sample_rate=shape.sampling_rate, ratios=shape.upsampling_ratios,
                                   n_q=shape.num_codebooks, bins=shape.codebook_size, dimension=shape.codec_hidden,
                                   n_filters=shape.num_filters)
    acref.export(folder / "compression_state_dict.bin", acref.random_codec(codec_cfg).state_dict(), codec_cfg)
    (root / "COMPLETE").touch()
    return {"magnet": str(folder), "t5": str(t5)}


def timed(generate, warm_up) -> dict:
    """warm_up(), then generate(stamp) once, timed; stamp() is called after each pass (or step)."""
    warm_up()
    stamps = []
    start = time.perf_counter()
    generate(lambda *_: stamps.append(time.perf_counter()))
    seconds = time.perf_counter() - start
    intervals = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"seconds": seconds, "passes": len(stamps), "s_per_pass": statistics.median(intervals) if intervals else
            seconds}


def reference(cfg: dict) -> dict:
    import torch

    import audiocraft_reference as acref
    import fixtures

    if cfg["threads"]:
        torch.set_num_threads(cfg["threads"])
    torch.set_grad_enabled(False)
    ac = acref.import_audiocraft()
    shape = fixtures.Shape(**cfg["shape_fields"])
    codec = ac.loaders.load_compression_model(cfg["magnet"])
    with acref.LocalT5(Path(cfg["t5"]), shape.text_hidden), acref.xformers_backend():
        lm = ac.loaders.load_lm_model_magnet(cfg["magnet"], compression_model_frame_rate=int(codec.frame_rate))
    model = ac.MAGNeT(name="bench", compression_model=codec, lm=lm)

    def run(steps, stamp=None):
        model.set_generation_params(decoding_steps=list(steps))
        model.set_custom_progress_callback(stamp)
        torch.manual_seed(0)
        with acref.xformers_stand_in():
            model.generate(cfg["texts"], progress=stamp is not None)

    result = timed(lambda stamp: run(cfg["steps"], stamp), lambda: run([1] * len(cfg["steps"])))
    return {**result, "framework": f"audiocraft {ac.version} + torch {torch.__version__}, "
                                   f"{torch.get_num_threads()} threads"}


def ours(cfg: dict) -> dict:
    import mlx_musicgen  # (BLAS before mlx)
    import mlx.core as mx
    from mlx_musicgen import MusicGen

    model = MusicGen.from_pretrained(cfg["magnet"], text_encoder=cfg["t5"])

    made = []

    def run(steps, stamp=None):
        _, codes = model.generate(cfg["texts"], seed=0, decoding_steps=tuple(steps), progress=stamp,
                                  return_tokens=True)
        made.append(codes.shape[-1])  # whole spans: 498 of 500 frames under nonoverlap masking

    result = timed(lambda stamp: run(cfg["steps"], stamp), lambda: run([1] * len(cfg["steps"])))
    blas = getattr(getattr(mlx_musicgen, "_linux", None), "LOADED", None)
    return {**result, "frames": made[-1],
            "framework": f"mlx {mx.__version__}" + (f" + {blas}" if blas else "")}


def musicgen(cfg: dict) -> dict:
    from mlx_musicgen import MusicGen

    model = MusicGen.from_pretrained(cfg["folder"])
    return timed(lambda stamp: model.generate(cfg["texts"], duration=cfg["seconds"], seed=0, progress=stamp),
                 lambda: model.generate(cfg["texts"], max_new_tokens=10, seed=0))


def run(args, bench) -> None:
    """The parent of --magnet: prepare, run the three sides in turn --runs times, report."""
    import dataclasses
    import hashlib
    import json
    import os
    import platform
    import sys

    shape = bench.SHAPES[args.shape]
    seconds = args.duration or 10.0
    if not float(seconds).is_integer():
        raise SystemExit("bench: --magnet takes whole seconds (audiocraft's MAGNeT sizes its masks by them)")
    key = hashlib.sha1((repr(shape) + repr(seconds)).encode()).hexdigest()[:10]
    folders = bench.child("prepare", {"root": str(args.cache_dir / f"{args.shape}-{bench.fixture_key(shape)}"),
                                      "shape": args.shape, "variants": [("float32", "float32", None)],
                                      "q_group_size": args.q_group_size})
    made = bench.child("magnet_prepare", {"root": str(args.cache_dir / f"magnet-{args.shape}-{key}"),
                                          "hf": folders["hf"], "shape_fields": dataclasses.asdict(shape),
                                          "seconds": seconds})
    texts = [bench.PROMPTS[i % len(bench.PROMPTS)] for i in range(args.batch)]
    steps = [int(n) for n in args.decoding_steps.split(",")]
    cfg = {"texts": texts, "steps": steps, "threads": args.threads, "seconds": seconds,
           "shape_fields": dataclasses.asdict(shape), **made}
    sides = {"reference": lambda: bench.child("magnet_reference", cfg),
             "ours": lambda: bench.child("magnet_ours", cfg),
             "musicgen": lambda: bench.child("musicgen_clip", {**cfg, "folder": folders["float32"]})}
    if args.skip_reference:
        del sides["reference"]
    bandwidth = bench.copy_bandwidth(args.bandwidth_mb)
    results = {name: [] for name in sides}
    for _ in range(args.runs):
        for name, start in sides.items():
            results[name].append(start())
    frames = results["ours"][0]["frames"]
    report = {name: {**runs[0], **{k: statistics.median(r[k] for r in runs) for k in ("seconds", "passes",
                                                                                       "s_per_pass")},
                     "seconds_min": min(r["seconds"] for r in runs), "seconds_max": max(r["seconds"] for r in runs),
                     "runs": runs} for name, runs in results.items()}
    for side in report.values():
        side["frames_per_s"] = args.batch * frames / side["seconds"]
    report = {"config": {"shape": args.shape, "seconds": seconds, "frames": frames, "batch": args.batch,
                         "decoding_steps": steps, "runs": args.runs},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "cpu": bench.cpu_model()},
              "bandwidth_gbps": bandwidth, "sides": report, "definitions": DEFINITIONS,
              "date": time.strftime("%Y-%m-%d"), "argv": bench.shown_options(sys.argv[1:])}
    measured = report["sides"]
    report["ratios"] = {"ours_vs_audiocraft": measured["reference"]["seconds"] / measured["ours"]["seconds"]
                        if "reference" in measured else None,
                        "sooner": measured["musicgen"]["seconds"] / measured["ours"]["seconds"]}
    text = markdown(report)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text)


def markdown(report: dict) -> str:
    cfg, sides, ratios = report["config"], report["sides"], report["ratios"]
    names = {"reference": "audiocraft MAGNeT (torch)", "ours": "MAGNeT here", "musicgen": "MusicGen here"}
    shown = [name for name in names if name in sides]
    rows = [("passes (MusicGen: steps)", "passes", ".0f"), ("seconds per clip, median", "seconds", ".1f"),
            ("  fastest .. slowest", None, None), ("s per pass (MusicGen: per step)", "s_per_pass", ".3f"),
            ("frames/s", "frames_per_s", ".1f")]
    lines = [f"Measured {report['date']} by `benchmarks/bench_generate.py {' '.join(report['argv'])}` on "
             f"{report['machine']['cpu']} ({report['machine']['cpus']} cores), copy bandwidth "
             f"{report['bandwidth_gbps']:.1f} GB/s; shape {cfg['shape']}, {cfg['seconds']:g} s of audio "
             f"({cfg['frames']} frames), batch {cfg['batch']} with guidance, passes {cfg['decoding_steps']}, "
             f"{cfg['runs']} fresh process(es) a side taking turns. "
             + "; ".join(f"{names[n]}: {sides[n]['framework']}" for n in shown if "framework" in sides[n]) + ".",
             "", "| | " + " | ".join(names[n] for n in shown) + " |", "|---|" + "---|" * len(shown)]
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{sides[n]['seconds_min']:.1f} .. {sides[n]['seconds_max']:.1f}" for n in shown]
        else:
            cells = [format(sides[n][key], fmt) for n in shown]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
    if ratios["ours_vs_audiocraft"] is not None:
        lines.append(f"MAGNeT here runs at {ratios['ours_vs_audiocraft']:.2f}x audiocraft's speed "
                     f"(its seconds / ours).")
    sooner = ratios["sooner"]
    lines.append(f"For the same {cfg['seconds']:g} s ({cfg['frames']} frames from MAGNeT), MAGNeT's clip arrives "
                 + (f"{sooner:.2f}x sooner than MusicGen's" if sooner >= 1 else
                    f"later than MusicGen's, in {1 / sooner:.2f}x its time")
                 + " here: MAGNeT's passes are arithmetic over the whole clip, MusicGen's steps read the weights "
                   "once per frame, so the answer depends on the device's compute against its bandwidth.")
    return "\n".join(lines) + "\n"
