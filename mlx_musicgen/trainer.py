"""The training loop: `Trainer`, configured by `TrainConfig`, steps AdamW (`FusedAdamW`) over micro-batches of
examples (training.make_batch), each one's loss and gradients from training.loss_and_grad_for_training; it logs
metrics.jsonl and loss.png, and saves the adapters and a checkpoint to resume from.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import atomic, cpu, lora
from .dataset import Example
from .plot import plot_losses
from .training import loss, loss_and_grad_for_training, make_batch, predicted_tokens, use_cpu_training_forms

CHECKPOINT = "checkpoint"  # OUT/checkpoint: what --resume continues from
NO_PLOT = 'loss.png needs matplotlib: pip install "mlx-musicgen[train]" (training goes on without the plot).'


@partial(mx.compile, shapeless=True)
def adamw_step(gradient: mx.array, parameter: mx.array, m: mx.array, v: mx.array, lr: mx.array, scale: mx.array,
               b1: float, b2: float, eps: float, weight_decay: float) -> tuple[mx.array, mx.array, mx.array]:
    """One weight's AdamW update (decoupled decay, no bias correction: mlx.optimizers.AdamW's by default) with
    the gradient times `scale` (a float32 scalar: clipping's; the product cast back, as clip_grad_norm's) -> the
    weight, m and v."""
    gradient = (gradient * scale).astype(gradient.dtype)
    m = b1 * m + (1 - b1) * gradient
    v = b2 * v + (1 - b2) * mx.square(gradient)
    return parameter * (1 - lr * weight_decay) - lr * m / (mx.sqrt(v) + eps), m, v


class FusedAdamW(optim.AdamW):
    """mlx.optimizers.AdamW (the same state, the same update) with each weight's update one compiled function:
    one pass over the weight and its state instead of a dozen element-wise ones; `clip_and_update` folds the
    gradients' clipping (and an average's division) into that pass. A full fine-tune updates every weight of the
    decoder (docs/performance.md)."""

    gradient_scale: mx.array | None = None  # what clip_and_update multiplies the gradients by, during its update

    def clip_and_update(self, model, gradients: dict, max_norm: float, divisor: int = 1) -> None:
        """self.update(model, optim.clip_grad_norm(gradients / divisor, max_norm)[0]), the same update, with the
        division and the clipping applied inside each weight's update instead of in passes of their own. The norm
        is summed in float32 (as clip_grad_norm's: half-precision squares underflow)."""
        if not max_norm > 0:
            raise ValueError(f"the gradients' largest norm must be above 0, got {max_norm}")
        squares = sum(mx.sum(mx.square(g.astype(mx.float32))) for _, g in tree_flatten(gradients))
        norm = mx.sqrt(squares) / divisor
        self.gradient_scale = mx.where(norm < max_norm, 1.0, max_norm / (norm + 1e-6)) / divisor
        try:
            self.update(model, gradients)
        finally:
            self.gradient_scale = None

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        scale = mx.array(1.0) if self.gradient_scale is None else self.gradient_scale
        if self.bias_correction:
            return super().apply_single((gradient * scale).astype(gradient.dtype), parameter, state)
        b1, b2 = self.betas
        parameter, state["m"], state["v"] = adamw_step(gradient, parameter, state["m"], state["v"],
                                                       self.learning_rate.astype(gradient.dtype), scale, b1, b2,
                                                       self.eps, self.weight_decay)
        return parameter


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
        if not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError(f"max_grad_norm (the gradients' clipping) must be above 0, got {self.max_grad_norm}.")
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


def checkpoint_state(out: Path) -> dict | None:
    """What OUT/checkpoint/state.json records (step, history, adapters, started_from, training), or None."""
    file = out / CHECKPOINT / "state.json"
    return json.loads(file.read_text()) if file.is_file() else None


class Trainer:
    """The training loop over a model with adapters (or a trainable decoder), its optimizer and its records:
    each step's examples, condition dropout and LoRA dropout follow from (seed, step), so a resumed run
    continues the same loss curve."""

    def __init__(self, model, train: list[Example], val: list[Example], out: Path, config: TrainConfig,
                 adapters: lora.AdapterConfig, model_name: str, start_from: str | Path | None = None):
        """`adapters`: the new LoRA (or full fine-tune) to train; or `start_from`: an adapter folder or Hub id
        (PEFT's format too) whose adapters train further instead, with their own settings, from step 0."""
        config.check()
        self.model, self.train_set, self.val_set, self.out = model, train, val, out
        self.config, self.model_name = config, model_name
        self.started_from = None if start_from is None else str(start_from)
        if start_from is not None:
            adapters = lora.load_for_training(model, start_from, model_name)
        elif adapters.full:
            lora.unfreeze_for_full(model)
        else:
            lora.apply_lora(model, adapters)
        if config.grad_checkpoint and adapters.dropout:
            raise ValueError("LoRA dropout and --grad-checkpoint do not go together (the recomputed pass would draw "
                             "other dropout masks than the forward pass): drop one of them.")
        self.adapters = adapters
        use_cpu_training_forms(model)
        decay = config.weight_decay if config.weight_decay is not None else (0.1 if adapters.full else 0.0)
        self.optimizer = FusedAdamW(learning_rate=config.schedule(), betas=[0.9, 0.95], weight_decay=decay)
        self.step = 0
        self.history: list[dict] = []
        self.plotting = True  # until matplotlib turns out to be missing
        self.pad = model.config.decoder.pad_token_id
        self.loss_and_grad = loss_and_grad_for_training(model, config.grad_checkpoint)
        numpy_form = isinstance(self.loss_and_grad, cpu.numpy_training.NumpyTraining)
        self.loss_of = self.loss_and_grad.loss if numpy_form else loss  # for validation: the same form's loss

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
        # the micro-batches' mean, clipped: in AdamW's own pass over each weight
        self.optimizer.clip_and_update(self.model, grads_sum, config.max_grad_norm, config.grad_accum)
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
            total += self.loss_of(self.model, make_batch(self.model, examples)).item() * len(examples)
            count += len(examples)
        self.model.train()
        return total / count

    # ---- records

    def record(self, entry: dict) -> None:
        """One more line of metrics.jsonl, and loss.png drawn again (a warning, once, without matplotlib)."""
        self.history.append(entry)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(entry) + "\n")
        if self.plotting:
            train = [(e["step"], e["train_loss"]) for e in self.history if "train_loss" in e]
            val = [(e["step"], e["val_loss"]) for e in self.history if e.get("val_loss") is not None]
            self.plotting = plot_losses(self.out / "loss.png", train, val)
            if not self.plotting:
                warnings.warn(NO_PLOT)

    def save_adapters(self) -> None:
        extra = {"model": self.model_name, "step": self.step, "training": asdict(self.config)}
        if self.started_from is not None:
            extra["started_from"] = self.started_from
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
                                                            "started_from": self.started_from,
                                                            "training": asdict(self.config)}))
            atomic.give_normal_mode(staging)
            atomic.replace_folder(staging, path)

    def save(self) -> None:
        self.save_checkpoint()
        self.save_adapters()

    def resume(self) -> None:
        """Continue from OUT/checkpoint: the weights, the optimizer's state, the step and the records so far."""
        from .checkpoint_files import CheckpointError

        path = self.out / CHECKPOINT
        state = checkpoint_state(self.out)
        if state is None:
            raise CheckpointError(f"{path} holds no checkpoint to resume from: train without --resume first.")
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
        self.started_from = state.get("started_from")  # the adapter the run began from, not OUT
        lines = [json.dumps(e) for e in self.history]
        atomic.write_text(self.out / "metrics.jsonl", "".join(line + "\n" for line in lines))

    def run(self, progress: Callable[[int, dict], None] | None = None, log: Callable[[str], None] = print) -> None:
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
                    self.save()
        except KeyboardInterrupt:
            self.save()
            log(f"saved a checkpoint at step {self.step} in {self.out / CHECKPOINT}: --resume to continue")
            raise
        self.save()
