"""PEFT's LoRA format: what `peft` saves of a LoRA on transformers' MusicGen (`save_pretrained`:
adapter_config.json + adapter_model.safetensors), read into our module names and written from them.

    base_model.model.decoder.model.decoder.layers.0.self_attn.q_proj.lora_A.weight   A (r, in)
    base_model.model.decoder.model.decoder.layers.0.self_attn.q_proj.lora_B.weight   B (out, r)
    base_model.model.decoder.model.decoder.embed_tokens.0.lora_embedding_A           A (r, num_embeddings)
    base_model.model.decoder.model.decoder.embed_tokens.0.lora_embedding_B           B (dim, r)
    base_model.model.decoder.lm_heads.0.lora_A.weight, base_model.model.enc_to_dec_proj.lora_B.weight, ...

are our decoder.layers.0.self_attn.q_proj, decoder.embed_tokens.0, decoder.lm_heads.0 and enc_to_dec_proj, with
A and B as they are (PEFT's layer math, peft/tuners/lora/layer.py):

    Linear      y = W x + scale * B A x
    Embedding   y = E[x] + scale * A.T[x] B.T          (E + scale * (B A).T, fused)
    scale       alpha / r, or alpha / sqrt(r) with use_rslora; r and alpha per module by rank_pattern and
                alpha_pattern, matched on transformers' module name as peft's get_pattern_key matches them.

fan_in_fan_out only transposes the update of a transformers Conv1D; MusicGen's targets are nn.Linear, for which
peft sets it back to False (and embeddings ignore it), so it changes nothing here either. What cannot be applied
as W + scale B A (DoRA, biases, modules_to_save, other PEFT methods, ...) is refused in one line that names it.
Only the format lives here: names, configs and arrays; lora.py puts the updates on a model.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import ClassVar
from pathlib import Path

import mlx.core as mx

from .checkpoint_files import CheckpointError, load_safetensors, read_json

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel's path to the model it wraps
TENSOR = re.compile(r"^base_model\.model\.(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$")
# what peft can save that is not W + scale B A: refused by the config field's name when set
REFUSED = ("use_dora", "lora_bias", "modules_to_save", "layer_replication", "trainable_token_indices",
           "target_parameters", "alora_invocation_tokens", "use_qalora", "use_bdlora", "megatron_config",
           "arrow_config", "kasa_config", "velora_config", "monteclora_config")
# initialisations that change the base weights too: the adapter is then relative to a model we do not have
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")


@dataclass
class PeftAdapter:
    """A PEFT LoRA config, as far as it matters here: the default r and alpha, rsLoRA, the per-module
    patterns (regex -> r or alpha), the dropout a further fine-tune trains with, the base model's name (None when
    unknown), and `raw`: the whole file, written back as it is when the adapter is trained further here."""

    r: int
    alpha: float
    use_rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    dropout: float = 0.0
    base: str | None = None
    raw: dict = field(default_factory=dict)
    full: ClassVar[bool] = False  # a LoRA, never a full fine-tune (as lora.AdapterConfig says of itself)

    def settings(self, module: str) -> tuple[int, float]:
        """(r, scale) of one module, by transformers' module name (e.g. decoder.model.decoder.layers.0.fc1)."""
        r = self.rank_pattern.get(pattern_key(self.rank_pattern, module), self.r)
        alpha = self.alpha_pattern.get(pattern_key(self.alpha_pattern, module), self.alpha)
        return r, alpha / (math.sqrt(r) if self.use_rslora else r)


@dataclass
class Update:
    """One module's update: `a` (r, in | num_embeddings), `b` (out | dim, r), `scale`, whether it adapts an
    embedding table, and `source`: its name in the adapter file (for messages)."""

    a: mx.array
    b: mx.array
    scale: float
    embedding: bool
    source: str


def pattern_key(patterns: dict, module: str) -> str:
    """peft's get_pattern_key: the first pattern that matches the end of the module name after a dot (or the
    whole name), else the name itself (which then picks no pattern)."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return module


def is_peft_config(raw) -> bool:
    return isinstance(raw, dict) and "peft_type" in raw


def refusal(raw: dict) -> str | None:
    """Why a PEFT config cannot be applied exactly as W + scale B A, or None."""
    if raw.get("peft_type") != "LORA":
        return f"a PEFT {raw.get('peft_type')} adapter, and only LoRA adapters (peft_type LORA) load here"
    if raw.get("use_dora"):
        return "a DoRA adapter (use_dora), which this loader cannot apply: only plain LoRA loads here"
    if raw.get("bias", "none") != "none":
        return f"trained with bias={raw['bias']!r} (biases changed), which this loader cannot apply: use bias='none'"
    for name in REFUSED:
        if raw.get(name):
            return f"made with {name}={raw[name]!r}, which this loader cannot apply: only plain LoRA loads here"
    init = str(raw.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        return (f"initialised with {init!r}, which changes the base weights: save it from peft with "
                f"path_initial_model_for_weight_conversion so that it applies to the original model")
    return None


def read_config(file: Path) -> PeftAdapter:
    """PEFT's adapter_config.json, refused in one line when it is not a plain LoRA (see refusal)."""
    raw = read_json(file)
    why = refusal(raw)
    if why:
        raise CheckpointError(f"{file.parent} holds {why}.")
    try:
        adapter = PeftAdapter(r=raw["r"], alpha=raw["lora_alpha"], use_rslora=bool(raw.get("use_rslora")),
                              rank_pattern=dict(raw.get("rank_pattern") or {}),
                              alpha_pattern=dict(raw.get("alpha_pattern") or {}),
                              dropout=raw.get("lora_dropout") or 0.0,
                              base=raw.get("base_model_name_or_path") or None, raw=raw)
        numbers = [adapter.r, adapter.alpha, *adapter.rank_pattern.values(), *adapter.alpha_pattern.values()]
        if not all(isinstance(n, (int, float)) and not isinstance(n, bool) and math.isfinite(n) for n in numbers):
            raise ValueError("r, lora_alpha and the patterns must be numbers")
        if not (isinstance(adapter.dropout, (int, float)) and 0 <= adapter.dropout < 1):
            raise ValueError(f"lora_dropout must be from 0 to below 1, got {adapter.dropout!r}")
        for pattern in (*adapter.rank_pattern, *adapter.alpha_pattern):
            re.compile(pattern)
    except (KeyError, TypeError, ValueError, re.error) as e:
        raise CheckpointError(f"{file} is not a valid PEFT LoRA config ({e}); save the adapter again.") from None
    return adapter


# ---- names: transformers' modules <-> ours


def our_module(theirs: str) -> str | None:
    """transformers' module name -> ours, for the modules adapted here (the decoder and the projections into
    it); None for any other (T5, EnCodec)."""
    if theirs.startswith("decoder.model.decoder."):
        return "decoder." + theirs.removeprefix("decoder.model.decoder.")
    if theirs.startswith("decoder.lm_heads.") or theirs in ("enc_to_dec_proj", "audio_enc_to_dec_proj"):
        return theirs
    return None


def their_module(ours: str) -> str:
    """Our module name -> transformers' (the inverse of our_module)."""
    if ours.startswith("decoder.") and not ours.startswith("decoder.lm_heads."):
        return "decoder.model.decoder." + ours.removeprefix("decoder.")
    return ours


def read_updates(folder: Path, adapter: PeftAdapter) -> dict[str, Update]:
    """adapter_model.safetensors -> {our module name: Update}; one-line refusals of a tensor that is not a LoRA
    matrix, a module not adapted here, a half-present pair, or a rank that is not the config's."""
    file = folder / WEIGHTS_FILE
    pairs: dict[str, dict[str, mx.array]] = {}
    for name, value in load_safetensors(file).items():
        match = TENSOR.match(name)
        if not match:
            raise CheckpointError(f"{file} holds {name}, which is not a LoRA matrix: only plain PEFT LoRA "
                                  f"adapters load here.")
        pairs.setdefault(match[1], {})[match[2]] = value
    if not pairs:
        raise CheckpointError(f"{file} holds no LoRA matrices: save the adapter again.")
    updates = {}
    for theirs, tensors in sorted(pairs.items()):
        ours = our_module(theirs)
        if ours is None:
            raise CheckpointError(f"the adapter in {folder} adapts {theirs}: only the decoder and the projections "
                                  f"into it take adapters here (not T5 or EnCodec).")
        embedding = "lora_embedding_A" in tensors or "lora_embedding_B" in tensors
        a, b = (tensors.get(f"lora_embedding_{m}" if embedding else f"lora_{m}.weight") for m in "AB")
        if a is None or b is None or len(tensors) != 2 or a.ndim != 2 or b.ndim != 2:
            raise CheckpointError(f"{file} holds {theirs} without a pair of 2-D LoRA matrices A and B: save the "
                                  f"adapter again.")
        r, scale = adapter.settings(theirs)
        if not a.shape[0] == b.shape[1] == r:
            raise CheckpointError(f"{file}: {theirs} has rank {a.shape[0]}, its config says {r}: the config does "
                                  f"not belong to these weights.")
        updates[ours] = Update(a, b, scale, embedding, theirs)
    return updates


def check_base(adapter: PeftAdapter, folder: Path, model_name: str | Path | None) -> None:
    """Warn (one line) when the adapter names a base model other than the one it is put on."""
    if adapter.base is None or model_name is None or same_model(adapter.base, str(model_name)):
        return
    warnings.warn(f"the adapter {folder} was made for {adapter.base}, and this model is {model_name}: if they "
                  f"are not the same model, the adapter will not do what it was trained to.", stacklevel=4)


def model_names(name: str) -> tuple[set[str], bool]:
    """The names a model is known by (as given, its full path, a converted folder's source) and whether it is
    a local folder."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return {name.rstrip("/")}, False
    names = {name.rstrip("/"), str(path.resolve())}
    config = path / "config.json"
    raw = read_json(config) if config.is_file() else {}
    source = raw.get("mlx_musicgen") if isinstance(raw, dict) else None
    source = source.get("source") if isinstance(source, dict) else None
    if isinstance(source, str):
        names.add(source.rstrip("/"))
    return names, True


def same_model(base: str, model_name: str) -> bool:
    """Whether the base model an adapter names is the model's: the same Hub id or path; or, where either is a
    local folder, the same last part (a folder named after its Hub repo, a converted folder's source)."""
    ours, local = model_names(model_name)
    theirs, their_local = model_names(base)
    if ours & theirs:
        return True
    return (local or their_local) and bool({Path(n).name for n in ours} & {Path(n).name for n in theirs})


# ---- writing ours in PEFT's format


def tensors(updates: dict[str, tuple[mx.array, mx.array, bool]]) -> dict[str, mx.array]:
    """{our module: (a, b, embedding)} -> adapter_model.safetensors' tensors, by PEFT's names."""
    out = {}
    for ours, (a, b, embedding) in updates.items():
        base = PREFIX + their_module(ours)
        names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A.weight", "lora_B.weight")
        out[f"{base}.{names[0]}"], out[f"{base}.{names[1]}"] = a, b
    return out


def target_names(modules: list[str]) -> list[str]:
    """The target_modules that pick exactly these modules in transformers' model: each module's last name, or
    its last two for the members of a list (lm_heads.0: `lm_heads` alone would name the list itself)."""
    names = set()
    for module in modules:
        parts = their_module(module).split(".")
        names.add(".".join(parts[-2:]) if parts[-1].isdigit() else parts[-1])
    return sorted(names)


def continued_config(adapter: PeftAdapter) -> dict:
    """The adapter_config.json of a PEFT adapter trained further here: its own, every field kept (targets, patterns,
    rsLoRA, ...), naming the base model it now trained on when it named none."""
    return {**adapter.raw, "base_model_name_or_path": adapter.base, "inference_mode": True}


def config(r: int, alpha: float, dropout: float, modules: list[str], base: str | None, melody: bool) -> dict:
    """PEFT's adapter_config.json of a LoRA of rank r and alpha on `modules` (our names) of a MusicGen."""
    kind = "MusicgenMelodyForConditionalGeneration" if melody else "MusicgenForConditionalGeneration"
    library = "transformers.models." + ("musicgen_melody.modeling_musicgen_melody" if melody
                                        else "musicgen.modeling_musicgen")
    return {
        "peft_type": "LORA", "task_type": None, "auto_mapping": {"base_model_class": kind, "parent_library": library},
        "base_model_name_or_path": base, "revision": None, "inference_mode": True,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": target_names(modules),
        "exclude_modules": None, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
        "modules_to_save": None, "init_lora_weights": True, "layers_to_transform": None, "layers_pattern": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False, "layer_replication": None,
    }
