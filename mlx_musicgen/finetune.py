"""Fine-tune MusicGen on your own music with LoRA (or the whole decoder), in MLX (the `mlx_musicgen.finetune`
command; finetune.py runs it too).

    mlx_musicgen.finetune --model facebook/musicgen-small --data my_clips --adapter-path my_style --iters 1000
    mlx_musicgen.generate --model facebook/musicgen-small --adapter my_style --text "my style, calm" --output x.wav
    mlx_musicgen.finetune --fuse --adapter-path my_style --mlx-path my_model      # the adapters merged in

The data folder holds audio files with captions (FILE.txt beside each, or metadata.jsonl with file_name and
text, or --caption for all); OUT gets adapters.safetensors, adapter_config.json, metrics.jsonl, loss.png and a
checkpoint/ to --resume from (Ctrl-C saves one).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import atomic, lora, training
from .dataset import Example, load_examples, split
from .melody import null_chroma
from .plot import plot_losses

CHECKPOINT = "checkpoint"


@dataclass
class TrainConfig:
    iters: int = 1000
    batch_size: int = 1
    grad_accum: int = 1
    learning_rate: float = 1e-4
    warmup: int | None = None  # steps of linear warm-up; None: a tenth of iters, at most 100
    weight_decay: float | None = None  # None: 0 for LoRA, 0.1 (audiocraft's) for full fine-tuning
    max_grad_norm: float = 1.0
    cond_dropout: float = 0.3
    val_fraction: float = 0.1
    val_every: int = 100
    log_every: int = 10
    save_every: int = 100
    seed: int = 0
    grad_checkpoint: bool = False

    def check(self) -> None:
        for name in ("iters", "batch_size", "grad_accum", "val_every", "log_every", "save_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}.")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 1):
            raise ValueError(f"--learning-rate must be above 0 and at most 1, got {self.learning_rate}.")
        if not 0 <= self.cond_dropout <= 1:
            raise ValueError(f"--cond-dropout must be from 0 to 1, got {self.cond_dropout}.")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"--val-fraction must be from 0 to below 1, got {self.val_fraction}.")
        if self.warmup is not None and self.warmup < 0:
            raise ValueError(f"--warmup must be >= 0, got {self.warmup}.")

    def schedule(self):
        """Linear warm-up to the learning rate, then cosine decay to a tenth of it at the last step."""
        warmup = min(100, self.iters // 10) if self.warmup is None else min(self.warmup, self.iters)
        decay = optim.cosine_decay(self.learning_rate, max(1, self.iters - warmup), self.learning_rate / 10)
        if warmup == 0:
            return decay
        return optim.join_schedules([optim.linear_schedule(0.0, self.learning_rate, warmup), decay], [warmup])


def make_batch(model, examples: list[Example], unconditioned: np.ndarray | None = None) -> training.Batch:
    """Examples -> a padded training batch (texts padded with masked zeros, melody chroma with silence's)."""
    pad = model.config.decoder.pad_token_id
    inputs, labels = training.delayed_sequences([e.codes for e in examples], pad, model.audio_channels)
    longest = max(e.text_states.shape[0] for e in examples)
    states = np.stack([np.pad(e.text_states, ((0, longest - e.text_states.shape[0]), (0, 0))) for e in examples])
    mask = np.stack([np.pad(e.text_mask, (0, longest - e.text_mask.shape[0])) for e in examples])
    chroma = None
    if model.config.melody is not None:
        frames = max(e.chroma.shape[0] for e in examples)
        chroma = null_chroma(len(examples), frames, model.config.melody.num_chroma)
        for i, e in enumerate(examples):
            chroma[i, : e.chroma.shape[0]] = e.chroma
    return training.Batch(mx.array(inputs), mx.array(labels), mx.array(states), mx.array(mask), chroma,
                          None if unconditioned is None else mx.array(unconditioned))


def predicted_tokens(batch: training.Batch, pad: int) -> int:
    return int((batch.labels != pad).sum())


class Trainer:
    """The training loop over a model with adapters (or a trainable decoder), its optimizer and its records:
    each step's examples, condition dropout and LoRA dropout follow from (seed, step), so a resumed run
    continues the same loss curve."""

    def __init__(self, model, train: list[Example], val: list[Example], out: Path, config: TrainConfig,
                 adapters: lora.AdapterConfig, model_name: str):
        config.check()
        self.model, self.train_set, self.val_set, self.out = model, train, val, out
        self.config, self.adapters, self.model_name = config, adapters, model_name
        if adapters.full:
            lora.unfreeze_for_full(model)
        else:
            lora.apply_lora(model, adapters)
        decay = config.weight_decay if config.weight_decay is not None else (0.1 if adapters.full else 0.0)
        self.optimizer = optim.AdamW(learning_rate=config.schedule(), betas=[0.9, 0.95], weight_decay=decay)
        self.step = 0
        self.history: list[dict] = []
        self.pad = model.config.decoder.pad_token_id
        self.loss_and_grad = nn.value_and_grad(model, lambda m, b: training.loss(m, b, config.grad_checkpoint))

    def trainable_count(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.model.trainable_parameters()))

    def examples_for(self, step: int, micro: int) -> list[Example]:
        """The examples of a micro-batch: epochs of seeded permutations, read in order."""
        n, size = len(self.train_set), self.config.batch_size
        first = (step * self.config.grad_accum + micro) * size
        picked = []
        for index in range(first, first + size):
            epoch, position = divmod(index, n)
            order = np.random.default_rng([self.config.seed, epoch]).permutation(n)
            picked.append(self.train_set[order[position]])
        return picked

    def train_step(self) -> tuple[float, int]:
        """One optimizer step over grad_accum micro-batches -> (loss, codes predicted)."""
        config, grads_sum, loss_sum, tokens = self.config, None, 0.0, 0
        self.model.train()
        for micro in range(config.grad_accum):
            examples = self.examples_for(self.step, micro)
            rng = np.random.default_rng([config.seed, self.step, micro, 1])
            dropped = (rng.random(len(examples)) < config.cond_dropout).astype(np.int32)
            batch = make_batch(self.model, examples, dropped)
            mx.random.seed(hash((config.seed, self.step, micro)) % 2**32)  # LoRA dropout's draws
            value, grads = self.loss_and_grad(self.model, batch)
            grads_sum = grads if grads_sum is None else tree_map(mx.add, grads_sum, grads)
            loss_sum = loss_sum + value
            mx.eval(grads_sum, loss_sum)  # one micro-batch's activations alive at a time
            tokens += predicted_tokens(batch, self.pad)
        grads = tree_map(lambda g: g / config.grad_accum, grads_sum)
        grads, _ = optim.clip_grad_norm(grads, config.max_grad_norm)
        self.optimizer.update(self.model, grads)
        self.step += 1  # with the update: a Ctrl-C from here on saves the updated weights with this step
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        return loss_sum.item() / config.grad_accum, tokens

    def validation_loss(self) -> float | None:
        """The mean loss over the validation examples, conditioned (no dropout of any kind)."""
        if not self.val_set:
            return None
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(self.val_set), self.config.batch_size):
            examples = self.val_set[i : i + self.config.batch_size]
            total += training.loss(self.model, make_batch(self.model, examples)).item() * len(examples)
            count += len(examples)
        self.model.train()
        return total / count

    # ---- records

    def record(self, entry: dict) -> None:
        self.history.append(entry)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        train = [(e["step"], e["train_loss"]) for e in self.history if "train_loss" in e]
        val = [(e["step"], e["val_loss"]) for e in self.history if e.get("val_loss") is not None]
        plot_losses(self.out / "loss.png", train, val)

    def save_adapters(self) -> None:
        extra = {"model": self.model_name, "step": self.step, "training": asdict(self.config)}
        lora.save_adapters(self.model, self.adapters, self.out, extra)

    def save_checkpoint(self) -> None:
        """The trainable weights, the optimizer's state and the step, in OUT/checkpoint/, swapped in whole."""
        path = self.out / CHECKPOINT
        staging = atomic.temp_folder(path)
        with atomic.removed_on_error(lambda: shutil.rmtree(staging, ignore_errors=True), self.out):
            mx.save_safetensors(str(staging / "trainable.safetensors"),
                                dict(tree_flatten(self.model.trainable_parameters())))
            state = dict(tree_flatten(self.optimizer.state))
            mx.save_safetensors(str(staging / "optimizer.safetensors"), {k: v for k, v in state.items()
                                                                         if isinstance(v, mx.array)})
            (staging / "state.json").write_text(json.dumps({"step": self.step, "history": self.history,
                                                            "adapters": asdict(self.adapters),
                                                            "training": asdict(self.config)}))
            atomic.give_normal_mode(staging)
            atomic.replace_folder(staging, path)

    def resume(self) -> None:
        """Continue from OUT/checkpoint: the weights, the optimizer's state, the step and the records so far."""
        from .loading import CheckpointError

        path = self.out / CHECKPOINT
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{path} holds no checkpoint to resume from: train without --resume first.")
        state = json.loads((path / "state.json").read_text())
        if state["adapters"] != asdict(self.adapters):
            raise ValueError(f"the checkpoint in {path} was trained with other adapter settings "
                             f"({state['adapters']}): give the same ones, or another --adapter-path.")
        self.model.load_weights(list(mx.load(str(path / "trainable.safetensors")).items()), strict=False)
        self.optimizer.init(self.model.trainable_parameters())
        saved = mx.load(str(path / "optimizer.safetensors"))
        current = dict(tree_flatten(self.optimizer.state))
        current.update(saved)
        self.optimizer.state = tree_unflatten(list(current.items()))
        self.step = state["step"]
        self.history = state["history"]
        lines = [json.dumps(e) for e in self.history]
        atomic.write_text(self.out / "metrics.jsonl", "".join(line + "\n" for line in lines))

    def run(self, progress=None, log=print) -> None:
        """Train to config.iters steps, logging, validating and saving as configured; Ctrl-C saves a checkpoint
        and the adapters, then stops."""
        config = self.config
        log(f"training {self.trainable_count():,} parameters ({'full decoder' if self.adapters.full else 'LoRA'}) "
            f"on {len(self.train_set)} windows ({len(self.val_set)} for validation), {config.iters} steps")
        window_loss, window_tokens, started = [], 0, time.perf_counter()
        try:
            while self.step < config.iters:
                value, tokens = self.train_step()
                window_loss.append(value)
                window_tokens += tokens
                step = self.step
                val = self.validation_loss() if step % config.val_every == 0 or step == config.iters else None
                if step % config.log_every == 0 or val is not None or step == config.iters:
                    elapsed = time.perf_counter() - started
                    entry = {"step": step, "train_loss": float(np.mean(window_loss)),
                             "learning_rate": float(self.optimizer.learning_rate),
                             "tokens_per_second": window_tokens / elapsed}
                    if val is not None:
                        entry["val_loss"] = val
                    self.record(entry)
                    window_loss, window_tokens, started = [], 0, time.perf_counter()
                    if progress is not None:
                        progress(step, entry)
                if step % config.save_every == 0:
                    self.save_checkpoint()
                    self.save_adapters()
        except KeyboardInterrupt:
            self.save_checkpoint()
            self.save_adapters()
            log(f"saved a checkpoint at step {self.step} in {self.out / CHECKPOINT}: --resume to continue")
            raise
        self.save_checkpoint()
        self.save_adapters()


def fuse(adapter_path: Path, mlx_path: Path, model_id: str | None = None, overwrite: bool = False) -> Path:
    """A converted folder of the base model with the adapters (or the full fine-tune) merged in."""
    from . import loading
    from .convert import check_destination, write_atomically

    adapter_path = Path(adapter_path).expanduser()
    config = lora.read_adapter_config(adapter_path)
    recorded = json.loads((adapter_path / lora.CONFIG_FILE).read_text()).get("model")
    model_id = model_id or recorded
    if model_id is None:
        raise ValueError(f"{adapter_path} does not say which model it adapts: give --model.")
    out = Path(mlx_path).expanduser()
    check_destination(out, overwrite)
    folder = loading.resolve(model_id)
    model, raw = loading.build_model(folder)
    lora.load_adapters(model, adapter_path)
    lora.fuse_lora(model)
    converted = raw.get(loading.CONVERTED_KEY, {})
    raw[loading.CONVERTED_KEY] = {
        "format_version": loading.FORMAT_VERSION, "source": str(model_id), "dtype": converted.get("dtype", "float32"),
        "quantization": None, "max_length": model.config.max_length, "adapters": str(adapter_path),
    }
    write_atomically(out, model, raw, folder)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mlx_musicgen.finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="Hub id, Hub-layout folder or converted folder to fine-tune (for --fuse: "
                                   "default the one the adapters were trained on)")
    p.add_argument("--data", help="folder of audio files with captions")
    p.add_argument("--caption", help="the caption of every clip that has none")
    p.add_argument("--adapter-path", required=True, help="output folder (adapters, metrics, checkpoint)")
    p.add_argument("--iters", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per micro-batch (default 1)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--learning-rate", type=float, default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup", type=int, help="warm-up steps (default a tenth of --iters, at most 100)")
    p.add_argument("--weight-decay", type=float, help="AdamW's (default 0 for LoRA, 0.1 with --full)")
    p.add_argument("--lora-rank", type=int, default=16, help="default 16")
    p.add_argument("--lora-alpha", type=float, default=16.0, help="default 16 (scale alpha / rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0, help="default 0")
    p.add_argument("--lora-targets", default=",".join(lora.TARGETS),
                   help=f"comma-separated modules to adapt (default all: {','.join(lora.TARGETS)})")
    p.add_argument("--full", action="store_true", help="fine-tune the whole decoder instead of LoRA")
    p.add_argument("--cond-dropout", type=float, default=0.3,
                   help="share of steps' rows trained without their text (so guidance still works; default 0.3)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="windows held out for validation (0.1)")
    p.add_argument("--val-every", type=int, default=100, help="steps between validations (default 100)")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics lines (default 10)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--grad-checkpoint", action="store_true", help="recompute activations: less memory, slower")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--resume", action="store_true", help="continue from ADAPTER_PATH/checkpoint")
    p.add_argument("--fuse", action="store_true", help="merge --adapter-path into --model, write --mlx-path")
    p.add_argument("--mlx-path", help="with --fuse: the converted folder to write")
    p.add_argument("--overwrite", action="store_true", help="with --fuse: replace a non-empty --mlx-path")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    from .cli import Bar
    from .loading import load_model

    out = Path(args.adapter_path).expanduser()
    if args.fuse:
        if not args.mlx_path:
            raise ValueError("--fuse writes a converted folder: give --mlx-path.")
        print(f"wrote {fuse(out, Path(args.mlx_path), args.model, args.overwrite)}", file=sys.stderr)
        return
    if not args.model or not args.data:
        raise ValueError("give --model and --data to fine-tune (or --fuse to merge adapters).")
    adapters = lora.AdapterConfig(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout,
                                  targets=[t.strip() for t in args.lora_targets.split(",") if t.strip()],
                                  full=args.full)
    adapters.check()
    config = TrainConfig(iters=args.iters, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         learning_rate=args.learning_rate, warmup=args.warmup, weight_decay=args.weight_decay,
                         cond_dropout=args.cond_dropout, val_fraction=args.val_fraction, val_every=args.val_every,
                         log_every=args.log_every, save_every=args.save_every, seed=args.seed,
                         grad_checkpoint=args.grad_checkpoint)
    config.check()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file: choose another --adapter-path.")
    if not args.resume and (out / lora.WEIGHTS_FILE).exists():
        raise FileExistsError(f"{out} already holds adapters: --resume to continue them, or choose another "
                              f"--adapter-path.")
    from . import _linux

    _linux.use_all_cores_for_blas()  # training's products are large: every core helps (generation keeps one free)
    model = load_model(args.model)  # the portable model: the CPU forms are for generation
    mx.random.seed(args.seed)
    examples = load_examples(model, Path(args.data), args.caption, log=lambda m: print(m, file=sys.stderr))
    train, val = split(examples, config.val_fraction, config.seed)
    out.mkdir(parents=True, exist_ok=True)
    if not args.resume:  # what a run stopped before its first save left
        (out / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(out / CHECKPOINT, ignore_errors=True)
    trainer = Trainer(model, train, val, out, config, adapters, str(args.model))
    if args.resume:
        trainer.resume()
    with Bar(total=config.iters, initial=trainer.step, desc="training", unit="step", disable=args.quiet,
             dynamic_ncols=True) as bar:

        def progress(step: int, entry: dict) -> None:
            bar.update(step - bar.n)
            shown = {"loss": f"{entry['train_loss']:.3f}", "tok/s": f"{entry['tokens_per_second']:.0f}"}
            if "val_loss" in entry:
                shown["val"] = f"{entry['val_loss']:.3f}"
            bar.set_postfix(shown)

        trainer.run(progress, log=lambda m: bar.write(m, file=sys.stderr))
    print(f"wrote {out / lora.WEIGHTS_FILE} (step {trainer.step}); generate with --adapter {out}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    from .cli import run_main

    args = parse_args(argv)
    run_main(lambda: run(args), args.debug)


if __name__ == "__main__":
    main()
