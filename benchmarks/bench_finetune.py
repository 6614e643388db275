#!/usr/bin/env python
"""Fine-tuning speed and memory: this MLX port against transformers + torch, same random weights, same batch
(codes of --seconds of audio and a text), LoRA and full fine-tuning, in one run.

    python benchmarks/bench_finetune.py --shape small --seconds 10 --steps 3 --runs 3 --json finetune.json
    python benchmarks/bench_finetune.py --shape tiny --seconds 1 --steps 2 --runs 1              # smoke run

Each side and mode runs in fresh child processes (--runs a side, taking turns): one warm-up step, then --steps
timed optimizer steps (the loss, its gradients, clipping to norm 1 and an AdamW update); a side's figures are the
medians over its processes, with the slowest and fastest, and each pair's ratio says how far this machine moves
it. The report gives the machine, its copy bandwidth and the date. tokens/s counts the codes predicted (the
reference's loss counts the same ones); peak RSS is the child's, the loaded model included. The reference's LoRA
is the same update built with forward hooks around transformers' modules (rank 16, alpha 16, the same targets).
The checkpoint is bench_generate.py's, built once and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_generate import (REPO, SHAPES, copy_bandwidth, cpu_model, peak_rss_mb, prepare,  # noqa: E402
                            run_sides)

TEXT = "80s pop track with bassy drums and synth"


def codes_for(cfg: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    return [rng.integers(0, 2048, (cfg["codebooks"], cfg["frames"])) for _ in range(cfg["batch"])]


def ours(cfg: dict) -> dict:
    import mlx_musicgen  # noqa: F401  (BLAS before mlx)
    import mlx.core as mx

    from mlx_musicgen import _linux, lora, trainer, training
    from mlx_musicgen.loading import load_model

    variables = _linux.training_environment()  # as finetune.py restarts
    if variables:
        _linux.restart_with(variables)
    _linux.use_all_cores_for_blas()  # as finetune.py does

    model, tokenizer = load_model(cfg["hf"])  # the portable model, as finetune.py trains it
    if cfg["mode"] == "full":
        lora.unfreeze_for_full(model)
    else:
        lora.apply_lora(model, lora.AdapterConfig())
    training.use_cpu_training_forms(model)  # as trainer.Trainer does
    tokens = tokenizer([TEXT] * cfg["batch"], return_tensors="np")
    states = model.text_encoder(mx.array(tokens["input_ids"]), mx.array(tokens["attention_mask"]))
    inputs, labels = training.delayed_sequences(codes_for(cfg), 2048, model.config.decoder.audio_channels)
    batch = training.Batch(mx.array(inputs), mx.array(labels), states, mx.array(tokens["attention_mask"]))
    predicted = int((batch.labels != 2048).sum())
    optimizer = trainer.FusedAdamW(learning_rate=1e-4, betas=[0.9, 0.95])  # the trainer's
    step = training.loss_and_grad_for_training(model, cfg["checkpoint"])  # the trainer's

    def one_step():
        loss, grads = step(model, batch)
        optimizer.clip_and_update(model, grads, 1.0)  # as the trainer clips and updates
        mx.eval(model.trainable_parameters(), optimizer.state, loss)
        return loss.item()

    return {**measure(one_step, predicted, cfg), "blas": _linux.LOADED}


def reference(cfg: dict) -> dict:
    import torch
    from transformers import AutoProcessor, MusicgenForConditionalGeneration

    torch.manual_seed(0)
    model = MusicgenForConditionalGeneration.from_pretrained(cfg["hf"]).train()
    model.config.decoder.decoder_start_token_id = 2048
    processor = AutoProcessor.from_pretrained(cfg["hf"])
    inputs = processor(text=[TEXT] * cfg["batch"], padding=True, return_tensors="pt")
    K = cfg["codebooks"]
    labels = []
    for clip in codes_for(cfg):
        ids = torch.cat([torch.full((K, 1), 2048), torch.tensor(clip)], dim=1)
        ids, mask = model.decoder.build_delay_pattern_mask(ids, pad_token_id=2048, max_length=ids.shape[-1] + K)
        labels.append(model.decoder.apply_delay_pattern_mask(ids, mask)[:, 1:])
    labels = torch.stack(labels).transpose(1, 2)
    predicted = int((labels != 2048).sum())
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg["mode"] == "full":
        trainable = list(model.decoder.parameters()) + list(model.enc_to_dec_proj.parameters())
        for p in trainable:
            p.requires_grad_(True)
    else:  # the same LoRA, as forward hooks
        trainable = []
        targets = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_heads.", "enc_to_dec_proj")
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and any(t in name for t in targets) and \
                    not name.startswith(("text_encoder", "audio_encoder")):
                a = torch.nn.Parameter(torch.randn(16, module.in_features) / module.in_features**0.5)
                b = torch.nn.Parameter(torch.zeros(module.out_features, 16))
                trainable += [a, b]
                module.register_forward_hook(lambda mod, args, out, a=a, b=b: out + (args[0] @ a.T) @ b.T)
    if cfg["checkpoint"]:
        model.decoder.gradient_checkpointing_enable()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.95))

    def one_step():
        optimizer.zero_grad()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)  # as both trainers do
        optimizer.step()
        return loss.item()

    return measure(one_step, predicted, cfg)


def measure(one_step, predicted: int, cfg: dict) -> dict:
    one_step()  # warm-up
    peak_rss_mb(reset=True)
    times, losses = [], []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        losses.append(one_step())
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    return {"step_s": step_s, "step_times_s": times, "tokens_per_s": predicted / step_s,
            "peak_rss_mb": peak_rss_mb(), "losses": losses, "predicted_tokens": predicted}


def child(kind: str, cfg: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        if subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(cfg), str(out)]).returncode:
            raise SystemExit(f"bench: the {kind} child failed (its error is above)")
        return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=SHAPES, default="small")
    p.add_argument("--seconds", type=float, default=10.0, help="audio per example (frames at the codec's rate)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps per child (after one warm-up)")
    p.add_argument("--runs", type=int, default=3, help="fresh processes per side and mode, taking turns")
    p.add_argument("--modes", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--grad-checkpoint", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--cache-dir", type=Path, default=REPO / ".bench_cache")
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    if min(args.runs, args.steps, args.batch) < 1 or args.seconds <= 0:
        p.error("--runs, --steps and --batch take at least 1, --seconds more than 0")

    import hashlib

    import fixtures

    shape = SHAPES[args.shape]
    hop = 1
    for r in shape.upsampling_ratios:
        hop *= r
    key = hashlib.sha1((repr(shape) + Path(fixtures.__file__).read_text()).encode()).hexdigest()[:10]
    folders = prepare({"root": str(args.cache_dir / f"{args.shape}-{key}"), "shape": args.shape, "variants": [],
                       "q_group_size": 64})
    cfg = {"hf": folders["hf"], "batch": args.batch, "steps": args.steps, "checkpoint": args.grad_checkpoint,
           "frames": round(args.seconds * shape.sampling_rate / hop), "codebooks": shape.num_codebooks}
    bandwidth = copy_bandwidth(512)
    report = {"config": {**cfg, "shape": args.shape, "seconds": args.seconds, "runs": args.runs},
              "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform()},
              "bandwidth_gbps": bandwidth, "date": time.strftime("%Y-%m-%d"), "results": {}, "ratios": {}}
    sides = ["reference", "ours"] if not args.skip_reference else ["ours"]
    for mode in args.modes.split(","):
        runs = run_sides({side: lambda side=side: child(side, {**cfg, "mode": mode}) for side in sides}, args.runs)
        report["results"].update({f"{side}-{mode}": result for side, result in runs.items()})
        if "reference" in runs:
            ours_r, ref = runs["ours"], runs["reference"]
            report["ratios"][mode] = {
                "tokens_per_s": ours_r["tokens_per_s"] / ref["tokens_per_s"],
                "pairs": [o["tokens_per_s"] / r["tokens_per_s"]
                          for r, o in zip(ref["process_runs"], ours_r["process_runs"])],
                "peak_rss": ours_r["peak_rss_mb"] / ref["peak_rss_mb"]}
    print(f"{report['machine']['cpu']} ({report['machine']['cpus']} cores), copy bandwidth {bandwidth:.1f} GB/s, "
          f"{report['date']}; {args.runs} fresh processes a side, medians (fastest..slowest)")
    print(f"{'':16} {'s/step':>20} {'tokens/s':>9} {'peak RSS MB':>12}  BLAS")
    for name, r in report["results"].items():
        steps = sorted(run["step_s"] for run in r["process_runs"])
        print(f"{name:16} {r['step_s']:6.2f} ({steps[0]:.2f}..{steps[-1]:.2f}) {r['tokens_per_s']:9.1f} "
              f"{r['peak_rss_mb']:12.0f}  {r.get('blas', '')}")
    for mode, ratio in report["ratios"].items():
        print(f"{mode}: ours / reference tokens/s {ratio['tokens_per_s']:.2f}x (pairs: "
              f"{', '.join(f'{x:.2f}' for x in ratio['pairs'])}), peak RSS {ratio['peak_rss']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, cfg, out = sys.argv[2], json.loads(sys.argv[3]), Path(sys.argv[4])
        if kind == "reference":
            import torch

            torch.set_num_threads(os.cpu_count() or 1)
        out.write_text(json.dumps({"ours": ours, "reference": reference}[kind](cfg)))
    else:
        main()
