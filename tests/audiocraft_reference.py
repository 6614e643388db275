"""audiocraft 1.3.0 as a reference in tests (installed with `pip install --no-deps`, as the README's test command
does: its pins ask for an old torch). Its model code is imported with stand-ins for the heavy modules it imports
at module level but never calls on the paths tested here (torchaudio cannot load beside torch 2.13; av, spacy,
xformers, librosa, torchmetrics and demucs are not installed); the stand-ins leave sys.modules once audiocraft is
imported, so nothing else sees them. Random-weight checkpoints are saved exactly as audiocraft's
`utils/export.py` saves its releases."""

from __future__ import annotations

import contextlib
import importlib.machinery
import sys
import types
from pathlib import Path

import torch

HEAVY_MODULES = ("av", "spacy", "torchaudio", "torchaudio.functional", "torchaudio.transforms", "xformers",
                 "xformers.ops", "librosa", "librosa.filters", "torchmetrics", "demucs", "demucs.apply",
                 "demucs.audio")


def stand_in(name: str) -> types.ModuleType:
    """A module whose every public attribute is a placeholder class (what `from x import Y` needs at import)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)
    module.__path__ = []

    def placeholder(attribute: str):
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return type(attribute, (), {})

    module.__getattr__ = placeholder
    return module


@contextlib.contextmanager
def stand_ins(names=HEAVY_MODULES):
    """The modules `names` that are not installed, as stand-ins, within the block only."""
    added = [name for name in names if name not in sys.modules]
    sys.modules.update({name: stand_in(name) for name in added})
    try:
        yield
    finally:
        for name in added:
            del sys.modules[name]


def xformers_stand_in():
    """audiocraft's attention with `memory_efficient: true` (as released configs have) checks that xformers
    imports, and takes its LowerTriangularMask only as "causal"; the attention that runs is torch's
    (audiocraft's default backend). Within the block, a stand-in answers the import."""
    return stand_ins(("xformers", "xformers.ops"))


def xformers_attention(q, k, v, attn_bias=None, p: float = 0.0):
    """xformers.ops.memory_efficient_attention ((B, T, heads, D) in and out) by torch's attention: `attn_bias`
    None, a LowerTriangularMask (the stand-in's: causal) or an additive tensor (MAGNeT's restricted context)."""
    q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    tensor = isinstance(attn_bias, torch.Tensor)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=attn_bias if tensor else None, is_causal=attn_bias is not None and not tensor,
        dropout_p=p)
    return out.transpose(1, 2)


@contextlib.contextmanager
def xformers_backend():
    """Within the block, audiocraft's attention takes its xformers path (as MAGNeT's loader sets it: its torch
    path drops MAGNeT's restricted-context masks), run by xformers_attention."""
    from audiocraft.modules import transformer

    transformer.set_efficient_attention_backend("xformers")
    try:
        with xformers_stand_in():
            yield
    finally:
        transformer.set_efficient_attention_backend("torch")


def import_audiocraft() -> types.SimpleNamespace:
    """audiocraft's builders, loaders and OmegaConf, imported once with the stand-ins in place."""
    if "audiocraft.models.builders" not in sys.modules:
        with stand_ins():
            import audiocraft.models.builders  # noqa: F401
            import audiocraft.models.loaders  # noqa: F401
        # transformer.py bound `from xformers import ops` to the stand-in; what it calls of it, torch does
        from audiocraft.modules import transformer
        transformer.ops = types.SimpleNamespace(unbind=torch.unbind, memory_efficient_attention=xformers_attention)
    import audiocraft
    from audiocraft.models import MAGNeT, AudioGen, MusicGen, builders, encodec, loaders
    from omegaconf import OmegaConf

    return types.SimpleNamespace(version=audiocraft.__version__, builders=builders, loaders=loaders,
                                 OmegaConf=OmegaConf, MusicGen=MusicGen, AudioGen=AudioGen, MAGNeT=MAGNeT,
                                 encodec=encodec)


def codec_config(sample_rate: int = 32000, ratios=(8, 5, 4, 2), n_q: int = 4, bins: int = 64, dimension: int = 16,
                 n_filters: int = 4):
    """A small SEANet EnCodec's training config, laid out as audiocraft's config/model/encodec/default.yaml, its
    `${...}` references left as export.py writes them (unresolved)."""
    ac = import_audiocraft()
    return ac.OmegaConf.create({
        "device": "cpu", "dtype": "float32", "sample_rate": sample_rate, "channels": 1,
        "compression_model": "encodec",
        "encodec": {"autoencoder": "seanet", "quantizer": "rvq", "sample_rate": "${sample_rate}",
                    "channels": "${channels}", "causal": False, "renormalize": False},
        "seanet": {"dimension": dimension, "channels": "${channels}", "causal": "${encodec.causal}", "n_filters": n_filters,
                   "n_residual_layers": 1,
                   "ratios": list(ratios), "activation": "ELU", "activation_params": {"alpha": 1.0},
                   "norm": "weight_norm", "norm_params": {}, "kernel_size": 7, "residual_kernel_size": 3,
                   "last_kernel_size": 7, "dilation_base": 2, "pad_mode": "constant", "true_skip": True,
                   "compress": 2, "lstm": 2, "disable_norm_outer_blocks": 0,
                   "decoder": {"trim_right_ratio": 1.0, "final_activation": None,
                               "final_activation_params": None},
                   "encoder": {}},
        "rvq": {"n_q": n_q, "q_dropout": False, "bins": bins, "decay": 0.99, "kmeans_init": False,
                "kmeans_iters": 50, "threshold_ema_dead_code": 2, "orthogonal_reg_weight": 0.0,
                "orthogonal_reg_active_codes_only": False},
    })


def random_codec(cfg, seed: int = 0) -> torch.nn.Module:
    """audiocraft's EnCodec built from `cfg` by its own builder, every parameter and codebook drawn at random."""
    ac = import_audiocraft()
    torch.manual_seed(seed)
    return randomized(ac.builders.get_compression_model(cfg).eval(),
                      lambda name: 0.5 if "codebook" in name or "embed" in name else 0.1)


def randomized(model: torch.nn.Module, scale) -> torch.nn.Module:
    """`model` with every floating-point tensor drawn from a normal of standard deviation scale(its name)."""
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * scale(name))
    return model


def export(path: Path, best_state: dict, cfg) -> Path:
    """What audiocraft's export_lm / export_encodec write: the best state, the config as YAML, the version."""
    ac = import_audiocraft()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"best_state": best_state, "xp.cfg": ac.OmegaConf.to_yaml(cfg), "version": ac.version,
                "exported": True}, path)
    return path


def export_pointer(path: Path, pretrained: str) -> Path:
    """What export_pretrained_compression_model writes for a named codec: a reference, no weights."""
    ac = import_audiocraft()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"pretrained": pretrained, "exported": True, "version": ac.version}, path)
    return path


def lm_config(t5_name: str = "t5-base", dim: int = 32, heads: int = 2, layers: int = 2, n_q: int = 4,
              card: int = 64, duration: float = 30.0, solver: str = "musicgen", sample_rate: int = 32000,
              channels: int = 1, subcodes_context: int = 5):
    """A small LM's training config, laid out as audiocraft's config/model/lm/musicgen_lm.yaml with
    conditioner/text2music.yaml (delay pattern, T5 cross-attention, pre-norm, no biases), or AudioGen's
    (`solver` "audiogen"); stereo (`channels` 2) interleaves n_q codebooks L0, R0, L1, ... as
    config/solver/musicgen/musicgen_base_32khz stereo configs do; MAGNeT's (`solver` "magnet" or
    "audio_magnet"): non-causal, parallel codebooks, spans of 3, `subcodes_context` frames for codebooks above
    the first (config/solver/magnet)."""
    ac = import_audiocraft()
    magnet = solver in ("magnet", "audio_magnet")
    return ac.OmegaConf.create({
        "device": "cpu", "dtype": "float32", "lm_model": "transformer_lm_magnet" if magnet else "transformer_lm",
        "solver": solver, "masking": {"span_len": 3},
        "sample_rate": sample_rate, "channels": channels,
        "interleave_stereo_codebooks": {"use": channels == 2, "per_timestep": False},
        "dataset": {"segment_duration": duration},
        "codebooks_pattern": {"modeling": "parallel", "parallel": {"empty_initial": -1}} if magnet else {
            "modeling": "delay", "delay": {"delays": [k // channels for k in range(n_q)], "flatten_first": 0,
                                           "empty_initial": 0}},
        "transformer_lm": {"dim": dim, "num_heads": heads, "num_layers": layers, "hidden_scale": 4, "n_q": n_q,
                           "card": card, "dropout": 0.0, "emb_lr": None, "activation": "gelu", "norm_first": True,
                           "bias_ff": False, "bias_attn": False, "bias_proj": False, "past_context": None,
                           "causal": not magnet, "custom": False, "memory_efficient": True,
                           "attention_as_float32": False, "layer_scale": None, "positional_embedding": "sin",
                           "xpos": False, "checkpointing": "none", "weight_init": "gaussian",
                           "depthwise_init": "current", "zero_bias_init": True, "norm": "layer_norm",
                           "cross_attention": False, "qk_layer_norm": False, "qk_layer_norm_cross": False,
                           "attention_dropout": None, "kv_repeat": 1, "two_step_cfg": False,
                           # MAGNeT's (its loader sets the last three from the dataset, masking and codec)
                           **({"subcodes_context": subcodes_context, "compression_model_framerate": 50,
                               "segment_duration": 0, "span_len": -1} if magnet else {})},
        "classifier_free_guidance": {"training_dropout": 0.3, "inference_coef": 3.0},
        "attribute_dropout": {},
        "fuser": {"cross_attention_pos_emb": False, "cross_attention_pos_emb_scale": 1, "sum": [], "prepend": [],
                  "cross": ["description"], "input_interpolate": []},
        "conditioners": {"description": {"model": "t5", "t5": {"name": t5_name, "finetune": False,
                                                                 "word_dropout": 0.3, "normalize_text": False}}},
    })


class LocalT5:
    """Within the block, audiocraft's T5Conditioner takes the T5 it names (`t5-base`) from `folder` (a
    transformers T5 encoder with spiece.model), of width `dim`, instead of the Hub; and its transformer's check
    that xformers imports (for `memory_efficient: true`, as released configs have) passes on a stand-in, while
    the attention that runs is torch's (audiocraft's default backend)."""

    def __init__(self, folder: Path, dim: int, name: str = "t5-base"):
        self.folder, self.dim, self.name = folder, dim, name

    def __enter__(self):
        from audiocraft.modules import conditioners

        self.module, self.saved = conditioners, (conditioners.T5Tokenizer, conditioners.T5EncoderModel,
                                                 dict(conditioners.T5Conditioner.MODELS_DIMS))
        folder, name = str(self.folder), self.name

        def redirected(cls):
            class Local(cls):
                @classmethod
                def from_pretrained(cls_, requested, *args, **kwargs):
                    return cls.from_pretrained(folder if requested == name else requested, *args, **kwargs)
            return Local

        conditioners.T5Tokenizer = redirected(self.saved[0])
        conditioners.T5EncoderModel = redirected(self.saved[1])
        conditioners.T5Conditioner.MODELS_DIMS[name] = self.dim
        self.xformers = xformers_stand_in()
        self.xformers.__enter__()
        return self

    def __exit__(self, *exc):
        self.xformers.__exit__(*exc)
        conditioners = self.module
        conditioners.T5Tokenizer, conditioners.T5EncoderModel = self.saved[:2]
        conditioners.T5Conditioner.MODELS_DIMS.clear()
        conditioners.T5Conditioner.MODELS_DIMS.update(self.saved[2])


def random_lm(cfg, seed: int = 0, head_scale: float = 0.1) -> torch.nn.Module:
    """audiocraft's LM built from `cfg` by its own builder (inside LocalT5), every weight drawn at random (normal,
    of standard deviation 0.1; `head_scale` for the output heads)."""
    ac = import_audiocraft()
    torch.manual_seed(seed)
    return randomized(ac.builders.get_lm_model(cfg).eval(),
                      lambda name: head_scale if name.startswith("linears.") else 0.1)


@contextlib.contextmanager
def hf_codec(name: str, folder: Path):
    """Within the block, audiocraft's CompressionModel.get_pretrained(`name`) takes transformers' EnCodec from
    `folder` instead of the Hub."""
    ac = import_audiocraft()
    saved = ac.encodec.HFEncodecModel

    class Local(saved):
        @classmethod
        def from_pretrained(cls, requested, *args, **kwargs):
            return saved.from_pretrained(str(folder) if requested == name else requested, *args, **kwargs)

    ac.encodec.HFEncodecModel = Local
    try:
        yield
    finally:
        ac.encodec.HFEncodecModel = saved
