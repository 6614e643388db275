"""Low-rank adapters (Hu et al., 2021, "LoRA"): a frozen Linear W plus a trainable update,

    y = W x + b + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r), B = 0 at the start,

on the modules a fine-tune adapts. Saved apart from the model (adapters.safetensors + adapter_config.json) and
fused back into W (W + (alpha / r) B A) for generation, so an adapted model runs as fast as the base one.

A small module of our own rather than mlx-lm's tuner layers: mlx-lm would bring its whole package (and its
dependencies) for one class, and these adapters follow PEFT's conventions (scale alpha / r, A drawn as
kaiming-uniform, B zero), which the reference recipe for MusicGen uses.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import atomic
from .loading import CheckpointError, load_safetensors, mismatches, read_json

# What the known transformers + PEFT recipe adapts: the decoder's attention and feed-forward projections, the
# per-codebook heads, and the projections of the text (and melody) into the decoder.
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_heads", "enc_to_dec_proj",
           "audio_enc_to_dec_proj")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"
FULL_PARTS = ("decoder.", "enc_to_dec_proj", "audio_enc_to_dec_proj")  # what LoRA adapts and a full fine-tune trains


@dataclass
class AdapterConfig:
    """LoRA's rank, alpha, dropout and targets; or `full`: the decoder itself was fine-tuned, and the file holds
    its new weights."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(TARGETS))
    full: bool = False

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or not 1 <= self.rank <= 4096:
            raise ValueError(f"the LoRA rank must be a whole number from 1 to 4096, got {self.rank!r}.")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"the LoRA alpha must be a number above 0, got {self.alpha!r}.")
        if not (isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1):
            raise ValueError(f"the LoRA dropout must be from 0 to below 1, got {self.dropout!r}.")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be some of {', '.join(TARGETS)}, got {', '.join(self.targets)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`linear`) with a trainable low-rank update."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        if not type(linear) is nn.Linear:
            raise ValueError("LoRA adapts float Linear layers: fine-tune a float32 (or float16) model, not a "
                             "quantized one.")
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.scale = scale
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)  # kaiming-uniform with a = sqrt(5), as PEFT draws A
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims)).astype(linear.weight.dtype)
        self.lora_b = mx.zeros((out_dims, rank), dtype=linear.weight.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        update = (self.dropout(x) @ self.lora_a.T) @ self.lora_b.T
        return self.linear(x) + self.scale * update.astype(x.dtype)

    def fused(self) -> nn.Linear:
        """The Linear with the update folded into its weight: W + scale * B A."""
        linear = self.linear
        delta = (self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32)))
        fused = nn.Linear(linear.weight.shape[1], linear.weight.shape[0], bias="bias" in linear)
        fused.weight = (linear.weight.astype(mx.float32) + delta).astype(linear.weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        return fused


def is_target(name: str, targets: list[str]) -> bool:
    """Whether a Linear's path names a target: the decoder's projections by their own names, its heads as
    lm_heads, and the model's projections into it; T5 and EnCodec never."""
    parts = name.split(".")
    if not name.startswith(FULL_PARTS):
        return False
    return parts[-1] in targets or (len(parts) > 1 and parts[-2] == "lm_heads" and "lm_heads" in targets)


def apply_lora(model, config: AdapterConfig) -> None:
    """Freeze the model and put a LoRALinear on every targeted Linear; only the adapters train."""
    config.check()
    model.freeze()
    adapters = [(name, LoRALinear(module, config.rank, config.scale, config.dropout))
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and is_target(name, config.targets)]
    model.update_modules(tree_unflatten(adapters))


def fuse_lora(model) -> None:
    """Fold every LoRALinear of a model into a plain Linear, in place."""
    fused = [(name, module.fused()) for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if fused:
        model.update_modules(tree_unflatten(fused))


def unfreeze_for_full(model) -> None:
    """Full fine-tuning: the decoder and the projections into it train; T5 and EnCodec stay frozen."""
    model.freeze()
    for name in ("decoder", "enc_to_dec_proj", "audio_enc_to_dec_proj"):
        if name in model:
            model[name].unfreeze()


def adapter_weights(model, full: bool = False) -> dict[str, mx.array]:
    """What an adapter file holds: the LoRA matrices, or (full) the fine-tuned decoder and projections."""
    if full:
        return {k: v for k, v in tree_flatten(model.parameters()) if k.startswith(FULL_PARTS)}
    return {k: v for k, v in tree_flatten(model.parameters()) if k.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}


def save_adapters(model, config: AdapterConfig, folder: Path, extra: dict | None = None) -> None:
    """adapters.safetensors + adapter_config.json, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    atomic.save_safetensors(folder / WEIGHTS_FILE, adapter_weights(model, config.full))
    atomic.write_text(folder / CONFIG_FILE, json.dumps({**asdict(config), **(extra or {})}, indent=2) + "\n")


def read_adapter_config(folder: Path) -> AdapterConfig:
    file = folder / CONFIG_FILE
    if not file.is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{folder} holds no adapters ({CONFIG_FILE} and {WEIGHTS_FILE}): give the "
                              f"--adapter-path a fine-tune wrote.")
    raw = read_json(file)
    try:
        config = AdapterConfig(rank=raw["rank"], alpha=raw["alpha"], dropout=raw.get("dropout", 0.0),
                               targets=list(raw["targets"]), full=bool(raw.get("full", False)))
        config.check()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is broken ({e}); train the adapters again.") from None
    return config


def load_adapters(model, folder: Path) -> AdapterConfig:
    """Put the adapters of `folder` on a model (or, for a full fine-tune, its weights into the model),
    strictly: every tensor present with its shape."""
    folder = Path(folder).expanduser()
    config = read_adapter_config(folder)
    if not config.full:
        apply_lora(model, config)
    expected = adapter_weights(model, config.full)
    weights = load_safetensors(folder / WEIGHTS_FILE)
    missing, unexpected, wrong = mismatches(weights, expected)
    if missing or unexpected or wrong:
        raise CheckpointError(f"the adapters in {folder} do not fit this model ({len(missing)} missing, "
                              f"{len(unexpected)} unexpected, {len(wrong)} misshapen, e.g. "
                              f"{(missing + unexpected + wrong)[0]}): they were trained on another model.")
    model.load_weights(list(weights.items()), strict=False)
    model.freeze()
    return config
