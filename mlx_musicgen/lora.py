"""Low-rank adapters (Hu et al., 2021, "LoRA"): a frozen Linear W plus a trainable update,

    y = W x + b + (alpha / r) * B A dropout(x),    A: (r, in), B: (out, r), B = 0 at the start,

on the modules a fine-tune adapts (and, on request, the decoder's embeddings: E[x] + (alpha / r) A.T[x] B.T, as
PEFT's). Saved apart from the model in PEFT's format (adapter_config.json + adapter_model.safetensors, see peft),
so that transformers + PEFT load what is trained here, with our own settings and the training's record beside them
(mlx_adapter.json); fused back into W (W + (alpha / r) B A) for generation, so an adapted model runs as fast as
the base one. `adapter=` takes such a folder, a folder PEFT wrote, its Hub id, or a folder written before
(adapter_config.json of ours + adapters.safetensors; a full fine-tune: mlx_adapter.json + adapters.safetensors).

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

from . import atomic, peft
from .checkpoint_files import CheckpointError, load_safetensors, read_json
from .hub import snapshot
from .loading import mismatches

# What the known transformers + PEFT recipe adapts: the decoder's attention and feed-forward projections, the
# per-codebook heads, and the projections of the text (and melody) into the decoder.
TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "lm_heads", "enc_to_dec_proj",
           "audio_enc_to_dec_proj")
EXTRA_TARGETS = ("embed_tokens",)  # adapted only on request: not in the recipe's defaults
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapters.safetensors"  # ours before PEFT's; full fine-tunes
OUR_CONFIG = "mlx_adapter.json"  # our settings and the training's record, beside PEFT's files
ADAPTER_FILES = [CONFIG_FILE, WEIGHTS_FILE, OUR_CONFIG, peft.WEIGHTS_FILE]  # what a Hub id's download takes
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
        unknown = sorted(set(self.targets) - set(TARGETS + EXTRA_TARGETS))
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets must be some of {', '.join(TARGETS + EXTRA_TARGETS)}, got "
                             f"{', '.join(self.targets)}.")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def require_float(module: nn.Module, kind: type) -> None:
    """LoRA adapts float layers (a quantized one has no weight to add the update to)."""
    if type(module) is not kind:
        raise ValueError(f"LoRA adapts float {kind.__name__} layers: fine-tune a float32 (or float16) model, not a "
                         f"quantized one.")


class LoRALinear(nn.Module):
    """A frozen nn.Linear (`linear`) with a trainable low-rank update."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float, dropout: float = 0.0):
        super().__init__()
        require_float(linear, nn.Linear)
        out_dims, in_dims = linear.weight.shape
        self.linear = linear
        self.scale = scale
        self.dropout_rate = dropout  # what cpu.numpy_training reads: it trains LoRA without dropout only
        self.dropout = nn.Dropout(dropout)
        bound = 1 / math.sqrt(in_dims)  # kaiming-uniform with a = sqrt(5), as PEFT draws A
        self.lora_a = mx.random.uniform(-bound, bound, (rank, in_dims)).astype(linear.weight.dtype)
        self.lora_b = mx.zeros((out_dims, rank), dtype=linear.weight.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        """W x + scale B A x; the scale applied to the (rank,) middle, and B's product added into W x's by the
        matmul itself (no separate passes over the output, forward or backward)."""
        middle = (self.dropout(x) @ self.lora_a.T) * self.scale
        return mx.addmm(self.linear(x), middle.astype(x.dtype), self.lora_b.T.astype(x.dtype))

    def fused(self) -> nn.Linear:
        """The Linear with the update folded into its weight: W + scale * B A."""
        linear = self.linear
        delta = (self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32)))
        fused = nn.Linear(linear.weight.shape[1], linear.weight.shape[0], bias="bias" in linear)
        fused.weight = (linear.weight.astype(mx.float32) + delta).astype(linear.weight.dtype)
        if "bias" in linear:
            fused.bias = linear.bias
        return fused


class LoRAEmbedding(nn.Module):
    """A frozen nn.Embedding (`embedding`, (num_embeddings, dim)) with a trainable low-rank update, as PEFT's:
    E[x] + scale * A.T[x] B.T, A (r, num_embeddings) zero at the start, B (dim, r) drawn normal; no dropout
    (PEFT's embeddings have none)."""

    def __init__(self, embedding: nn.Embedding, rank: int, scale: float):
        super().__init__()
        require_float(embedding, nn.Embedding)
        num, dims = embedding.weight.shape
        self.embedding = embedding
        self.scale = scale
        self.lora_a = mx.zeros((rank, num), dtype=embedding.weight.dtype)
        self.lora_b = mx.random.normal((dims, rank)).astype(embedding.weight.dtype)

    def __call__(self, x: mx.array) -> mx.array:
        out = self.embedding(x)
        return out + (self.scale * (self.lora_a.T[x] @ self.lora_b.T)).astype(out.dtype)

    def fused(self) -> nn.Embedding:
        """The Embedding with the update folded into its table: E + scale * (B A).T."""
        weight = self.embedding.weight
        delta = self.scale * (self.lora_b.astype(mx.float32) @ self.lora_a.astype(mx.float32)).T
        fused = nn.Embedding(*weight.shape)
        fused.weight = (weight.astype(mx.float32) + delta).astype(weight.dtype)
        return fused


def is_target(name: str, targets: list[str]) -> bool:
    """Whether a Linear's (or Embedding's) path names a target: the decoder's projections by their own names, its
    heads as lm_heads, its embeddings as embed_tokens, and the model's projections into it; T5 and EnCodec never."""
    parts = name.split(".")
    if not name.startswith(FULL_PARTS):
        return False
    listed = len(parts) > 1 and parts[-2] in ("lm_heads", "embed_tokens") and parts[-2] in targets
    return parts[-1] in targets or listed


def adapted(module: nn.Module, rank: int, scale: float, dropout: float = 0.0) -> nn.Module:
    """A module with a LoRA of its own rank and scale: LoRALinear or LoRAEmbedding by its kind."""
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding(module, rank, scale)
    return LoRALinear(module, rank, scale, dropout)


def apply_lora(model, config: AdapterConfig) -> None:
    """Freeze the model and put a LoRA on every targeted Linear (and Embedding); only the adapters train."""
    config.check()
    model.freeze()
    adapters = [(name, adapted(module, config.rank, config.scale, config.dropout))
                for name, module in model.named_modules()
                if isinstance(module, (nn.Linear, nn.Embedding)) and is_target(name, config.targets)]
    model.update_modules(tree_unflatten(adapters))


def fuse_lora(model) -> None:
    """Fold every LoRA of a model into a plain Linear (or Embedding), in place."""
    fused = [(name, module.fused()) for name, module in model.named_modules()
             if isinstance(module, (LoRALinear, LoRAEmbedding))]
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


# ---- saving and reading adapter folders


def save_adapters(model, config: AdapterConfig | peft.PeftAdapter, folder: Path, extra: dict | None = None) -> None:
    """LoRA: PEFT's adapter_model.safetensors + adapter_config.json (base_model_name_or_path: extra's "model"; a
    PEFT adapter trained further keeps its own config); a full fine-tune: adapters.safetensors (our names); both
    with mlx_adapter.json (the settings and `extra`). Each file is written atomically; files of the other layout,
    which a reader could take instead, go."""
    folder.mkdir(parents=True, exist_ok=True)
    extra = extra or {}
    if config.full:
        atomic.save_safetensors(folder / WEIGHTS_FILE, adapter_weights(model, True))
        stale = [CONFIG_FILE, peft.WEIGHTS_FILE]
    else:
        updates = {name: (m.lora_a, m.lora_b, isinstance(m, LoRAEmbedding)) for name, m in model.named_modules()
                   if isinstance(m, (LoRALinear, LoRAEmbedding))}
        atomic.save_safetensors(folder / peft.WEIGHTS_FILE, peft.tensors(updates))
        if isinstance(config, peft.PeftAdapter):
            their = peft.continued_config(config)
        else:
            their = peft.config(config.rank, config.alpha, config.dropout, sorted(updates), extra.get("model"),
                                model.config.melody is not None)
        atomic.write_text(folder / CONFIG_FILE, json.dumps(their, indent=2) + "\n")
        stale = [WEIGHTS_FILE]
    settings = asdict(config)
    settings.pop("raw", None)  # a PEFT adapter's: adapter_config.json holds it
    atomic.write_text(folder / OUR_CONFIG, json.dumps({**settings, **extra}, indent=2) + "\n")
    for name in stale:
        (folder / name).unlink(missing_ok=True)


def resolve_adapter(path_or_id: str | Path) -> Path:
    """A folder as it is (checked by the reader); a Hub id (owner/name that is no folder here) downloaded, or
    found in the Hugging Face cache when offline."""
    path = Path(path_or_id).expanduser()
    text = str(path_or_id)
    if path.exists() or text.startswith((".", "/", "~")) or text.count("/") != 1:
        return path
    return snapshot(text, ADAPTER_FILES, "adapter")


def peft_config_file(folder: Path) -> Path | None:
    """PEFT's adapter_config.json in a folder, or None when there is none (or the file is ours)."""
    file = folder / CONFIG_FILE
    return file if file.is_file() and peft.is_peft_config(read_json(file)) else None


def our_config(file: Path) -> AdapterConfig:
    raw = read_json(file)
    try:
        config = AdapterConfig(rank=raw["rank"], alpha=raw["alpha"], dropout=raw.get("dropout", 0.0),
                               targets=list(raw["targets"]), full=bool(raw.get("full", False)))
        config.check()
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{file} is broken ({e}); train the adapters again.") from None
    return config


def read_adapter_config(folder: str | Path) -> AdapterConfig | peft.PeftAdapter:
    """The settings of an adapter folder (or Hub id), refused in one line when it holds no adapters that can be
    applied: PEFT's LoRA config (see peft.read_config), or ours (a full fine-tune, or the layout before)."""
    folder = resolve_adapter(folder)
    peft_file = peft_config_file(folder)
    if peft_file is not None:
        if not (folder / peft.WEIGHTS_FILE).is_file():
            bin_only = (folder / "adapter_model.bin").is_file()
            raise CheckpointError(f"{folder} has PEFT's {CONFIG_FILE} but no {peft.WEIGHTS_FILE}" + (
                ", only adapter_model.bin: save it again with peft's save_pretrained(safe_serialization=True)."
                if bin_only else ": copy the adapter folder whole."))
        return peft.read_config(peft_file)
    for name in (OUR_CONFIG, CONFIG_FILE):
        if (folder / name).is_file() and (folder / WEIGHTS_FILE).is_file():
            return our_config(folder / name)
    raise CheckpointError(f"{folder} holds no adapters ({CONFIG_FILE} and {WEIGHTS_FILE}), nor PEFT's ({CONFIG_FILE} "
                          f"and {peft.WEIGHTS_FILE}): give the --adapter-path a fine-tune wrote, or a PEFT LoRA "
                          f"folder or Hub id.")


def recorded_model(folder: str | Path) -> str | None:
    """The base model an adapter folder names: the fine-tune's --model (ours), or PEFT's base_model_name_or_path."""
    folder = resolve_adapter(folder)
    for name, key in ((OUR_CONFIG, "model"), (CONFIG_FILE, "model"), (CONFIG_FILE, "base_model_name_or_path")):
        raw = read_json(folder / name) if (folder / name).is_file() else None
        if isinstance(raw, dict) and isinstance(raw.get(key), str) and raw[key]:
            return raw[key]
    return None


def holds_adapters(folder: Path) -> bool:
    """Whether a folder holds adapter weights of any layout (a fine-tune would replace them)."""
    return (folder / WEIGHTS_FILE).exists() or (folder / peft.WEIGHTS_FILE).exists()


def attach_updates(model, updates: dict[str, peft.Update], folder: Path, dropout: float = 0.0) -> None:
    """Put PEFT's updates on a model, each as a LoRA of its own rank and scale (and, for training further, the
    adapter's dropout); one-line refusals of a module this model has not, or of another shape (the adapter was made
    on another model)."""
    modules = dict(model.named_modules())
    attached = []
    for name, update in updates.items():
        module = modules.get(name)
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            raise CheckpointError(f"the adapter in {folder} merges into float weights, and {update.source} is "
                                  f"quantized here: load the float32 (or float16) model, not a quantized one.")
        kind = nn.Embedding if update.embedding else nn.Linear
        if not isinstance(module, kind):
            raise CheckpointError(f"the adapter in {folder} adapts {update.source}, which this model has not as "
                                  f"{'an embedding' if update.embedding else 'a linear layer'}: it was made for "
                                  f"another model.")
        rows, cols = module.weight.shape  # Linear (out, in); Embedding (num_embeddings, dim)
        r = update.a.shape[0]
        a_shape, b_shape = ((r, rows), (cols, r)) if update.embedding else ((r, cols), (rows, r))
        if update.a.shape != a_shape or update.b.shape != b_shape:
            raise CheckpointError(f"the adapter in {folder} does not fit this model: {update.source}'s A and B are "
                                  f"{tuple(update.a.shape)} and {tuple(update.b.shape)}, this model's takes "
                                  f"{a_shape} and {b_shape}: it was made for a model of another shape.")
        wrapped = adapted(module, r, update.scale, dropout)
        wrapped.lora_a, wrapped.lora_b = update.a, update.b
        attached.append((name, wrapped))
    model.update_modules(tree_unflatten(attached))


def load_adapters(model, folder: str | Path, model_name: str | Path | None = None):
    """Put the adapters of `folder` (or a Hub id) on a model (or, for a full fine-tune, its weights into the
    model), strictly: every tensor present with its shape. `model_name`: the model's path or Hub id, checked
    against the base model a PEFT adapter names (a mismatch warns). Returns the adapter's settings."""
    folder = resolve_adapter(folder)
    config = read_adapter_config(folder)
    if isinstance(config, peft.PeftAdapter):
        peft.check_base(config, folder, model_name)
        model.freeze()
        attach_updates(model, peft.read_updates(folder, config), folder, config.dropout)
        model.freeze()
        return config
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


def load_for_training(model, folder: str | Path, model_name: str | Path):
    """The adapters of `folder` (or a Hub id; PEFT's too) on a model, to train further: their LoRA matrices (a full
    fine-tune: the decoder and the projections into it) trainable, the rest frozen. A PEFT adapter that names no
    base model is given `model_name`. Returns the adapter's settings (AdapterConfig or peft.PeftAdapter)."""
    config = load_adapters(model, folder, model_name)
    if isinstance(config, peft.PeftAdapter):
        config.base = config.base or str(model_name)
        config.raw = peft.continued_config(config)  # as it will be saved (and read back on --resume)
    elif config.full:
        unfreeze_for_full(model)
        return config
    for module in model.modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            # trained in the model's precision (an adapter saved in bfloat16 would round small updates away)
            dtype = (module.linear if isinstance(module, LoRALinear) else module.embedding).weight.dtype
            module.lora_a, module.lora_b = module.lora_a.astype(dtype), module.lora_b.astype(dtype)
            module.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
    return config
