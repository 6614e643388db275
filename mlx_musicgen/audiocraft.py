"""audiocraft's own checkpoints (MusicGen, stereo or mono, and AudioGen), read without torch: `state_dict.bin`
(the LM and its training config) and `compression_state_dict.bin` (the EnCodec, or a pointer to a pretrained one),
as audiocraft's utils/export.py writes them and its models/loaders.py reads them.

The files are read by torch_bin (nothing in them runs) and the config by PyYAML's safe_load. What they describe
is checked against what this port runs, and then laid out as a transformers checkpoint: a config.json-shaped dict
and tensors under transformers' names (the inverse of transformers' convert_musicgen_transformers.py and
convert_encodec_checkpoint.py), so that one loader (loading.build_model) serves both formats. The T5 is named in
the config, not stored: it comes from the Hub (or its cache, offline), or from a folder the user gives.

Where audiocraft computes differently from transformers, the config says so and the model follows audiocraft
(MusicGenConfig.attend_text_padding, DecoderConfig.sinusoids).
"""

from __future__ import annotations

import math
import pickle
import re
from pathlib import Path

import numpy as np

from . import torch_bin
from .names import compile_names, renamed

LM_FILE, CODEC_FILE = "state_dict.bin", "compression_state_dict.bin"
# audiocraft's windows (max_duration) by family, set by its MusicGen.get_pretrained and AudioGen.get_pretrained
WINDOW_SECONDS = {"musicgen": 30.0, "audiogen": 10.0}
TRANSFORMERS_REPOS = "facebook/musicgen-melody or facebook/musicgen-melody-large (and their -stereo ones)"


class AudiocraftError(ValueError):
    """An audiocraft checkpoint that cannot be used here, with what to do (loading makes it a CheckpointError)."""


def is_audiocraft(folder: Path) -> bool:
    return (folder / LM_FILE).is_file()


def read_package(file: Path, what: str) -> dict:
    """One of the two files: a dict as export.py saves it, read by torch_bin."""
    if not file.is_file():
        raise AudiocraftError(f"{file} is missing: an audiocraft checkpoint has {LM_FILE} and {CODEC_FILE}; "
                              f"download the model again.")
    try:
        package = torch_bin.read_torch_bin(file)
    except (ValueError, pickle.UnpicklingError) as error:
        raise AudiocraftError(str(error)) from None
    if not isinstance(package, dict) or not ("best_state" in package or "pretrained" in package):
        raise AudiocraftError(f"{file} is not an exported audiocraft {what} (no best_state): export it with "
                              f"audiocraft's utils/export.py.")
    return package


def read_xp_config(package: dict, file: Path) -> dict:
    """The training config saved with the weights (YAML text), read by PyYAML's safe_load (no tags run)."""
    import yaml

    text = package.get("xp.cfg")
    if not isinstance(text, str):
        raise AudiocraftError(f"{file} holds no training config (xp.cfg): export it with audiocraft's "
                              f"utils/export.py.")
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise AudiocraftError(f"{file}: its config is not valid YAML ({str(error).splitlines()[0]}).") from None
    if not isinstance(config, dict):
        raise AudiocraftError(f"{file}: its config is not a table of settings.")
    return config


def setting(config: dict, path: str, file: Path, default=None):
    """config["a"]["b"] for path "a.b" (`default` where a part is absent)."""
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def require(condition: bool, file: Path, what: str) -> None:
    if not condition:
        raise AudiocraftError(f"{file}: {what}, which this port does not run (the released MusicGen and AudioGen "
                              f"models do not use it).")


def family(config: dict) -> str:
    """"audiogen" for AudioGen's solver, otherwise "musicgen"."""
    return "audiogen" if config.get("solver") == "audiogen" else "musicgen"


def check_conditioners(config: dict, file: Path) -> str:
    """The text conditioning this port runs: T5 on `description`, cross-attended; returns the T5's Hub name.
    Melody (a chroma of Demucs stems) and MusicGen-Style conditioners are refused in one line."""
    conditioners = setting(config, "conditioners", file) or {}
    if not isinstance(conditioners, dict):
        raise AudiocraftError(f"{file}: its conditioners are not a table.")
    wav = setting(conditioners, "self_wav.model", file)
    if wav == "chroma_stem":
        raise AudiocraftError(f"{file} is an audiocraft-format melody checkpoint, which conditions through Demucs "
                              f"stem separation: load the transformers-format repository instead "
                              f"({TRANSFORMERS_REPOS}), or pass --checkpoint-format transformers.")
    if wav == "style":
        raise AudiocraftError(f"{file} is MusicGen-Style, whose style conditioner is not supported yet.")
    others = sorted(set(conditioners) - {"description", "args"})
    if others:
        raise AudiocraftError(f"{file} conditions on {', '.join(others)}, which this port does not run; "
                              f"supported: text (T5) only.")
    model = setting(conditioners, "description.model", file)
    name = setting(conditioners, "description.t5.name", file)
    require(model == "t5" and isinstance(name, str) and name, file, f"its text conditioner is {model!r}, not T5")
    require(not setting(conditioners, "description.t5.normalize_text", file, False), file,
            "it normalises texts (normalize_text)")
    fuser = setting(config, "fuser", file) or {}
    require(list(fuser.get("cross") or []) == ["description"] and not fuser.get("sum") and not fuser.get("prepend")
            and not fuser.get("input_interpolate"), file, f"its fuser is {fuser}, not the text cross-attended")
    require(not fuser.get("cross_attention_pos_emb", False), file, "it adds positions to the text (fuser)")
    return name


def delays(config: dict, file: Path, n_q: int, channels: int) -> None:
    """audiocraft's delay pattern, as this port's (delay.codebook_delays) lays it out."""
    pattern = setting(config, "codebooks_pattern", file) or {}
    require(pattern.get("modeling") == "delay", file, f"its codebook pattern is {pattern.get('modeling')!r}, "
                                                      f"not 'delay'")
    expected = [k // channels for k in range(n_q)]
    got = setting(pattern, "delay.delays", file)
    require(got is None and channels == 1 or list(got or []) == expected, file,
            f"its codebook delays are {got}, not {expected}")
    require(not setting(pattern, "delay.flatten_first", file, 0) and not setting(pattern, "delay.empty_initial",
                                                                                 file, 0),
            file, "its delay pattern flattens or leaves initial steps empty")


def decoder_section(config: dict, file: Path, channels: int) -> dict:
    """transformers' MusicgenDecoderConfig fields from `transformer_lm`, after checking that the LM is the one
    MusicGen and AudioGen release: pre-norm, no biases, GELU, sinusoidal positions, plain attention."""
    lm = setting(config, "transformer_lm", file)
    if not isinstance(lm, dict):
        raise AudiocraftError(f"{file}: its config has no transformer_lm section.")
    kind = config.get("lm_model")
    if kind == "transformer_lm_magnet":
        raise AudiocraftError(f"{file} is a MAGNeT checkpoint, which this version does not run yet.")
    require(kind == "transformer_lm", file, f"its LM is {kind!r}")
    expected = {"norm_first": True, "bias_ff": False, "bias_attn": False, "bias_proj": False, "activation": "gelu",
                "positional_embedding": "sin", "norm": "layer_norm", "layer_scale": None, "qk_layer_norm": False,
                "qk_layer_norm_cross": False, "kv_repeat": 1, "past_context": None, "causal": True, "xpos": False,
                "positional_scale": 1.0, "max_period": 10000, "two_step_cfg": False}
    for name, value in expected.items():
        got = lm.get(name, value if name in ("positional_scale", "max_period", "xpos", "two_step_cfg") else None)
        require(got == value, file, f"its transformer_lm.{name} is {got!r}, not {value!r}")
    sizes = {name: lm.get(name) for name in ("dim", "num_heads", "num_layers", "n_q", "card", "hidden_scale")}
    for name, value in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise AudiocraftError(f"{file}: transformer_lm.{name} must be a whole number >= 1, got {value!r}: the "
                                  f"config is broken; download the model again.")
    delays(config, file, sizes["n_q"], channels)
    return {"vocab_size": sizes["card"], "hidden_size": sizes["dim"], "num_hidden_layers": sizes["num_layers"],
            "num_attention_heads": sizes["num_heads"], "ffn_dim": sizes["dim"] * sizes["hidden_scale"],
            "num_codebooks": sizes["n_q"], "audio_channels": channels, "activation_function": "gelu",
            "scale_embedding": False, "sinusoids": "audiocraft", "pad_token_id": sizes["card"],
            "bos_token_id": sizes["card"], "model_type": "musicgen_decoder"}


def codec_section(config: dict, file: Path) -> dict:
    """transformers' EncodecConfig fields from a SEANet EnCodec's training config (audiocraft's
    get_compression_model: `encodec`, `seanet` with its encoder and decoder overrides, `rvq`)."""
    encodec, seanet, rvq = (setting(config, name, file) for name in ("encodec", "seanet", "rvq"))
    require(config.get("compression_model") == "encodec" and isinstance(encodec, dict) and isinstance(seanet, dict)
            and isinstance(rvq, dict), file, f"its compression model is {config.get('compression_model')!r}")
    require(encodec.get("autoencoder") == "seanet" and encodec.get("quantizer") == "rvq", file,
            "its codec is not SEANet with residual vector quantization")
    require(not encodec.get("renormalize") and not encodec.get("renorm"), file, "its codec renormalises audio")
    base = {k: v for k, v in seanet.items() if k not in ("encoder", "decoder")}
    encoder, decoder = ({**base, **(seanet.get(part) or {})} for part in ("encoder", "decoder"))
    shared = {k: v for k, v in decoder.items() if k not in ("trim_right_ratio", "final_activation",
                                                            "final_activation_params")}
    require(all(encoder.get(k) == v for k, v in shared.items()), file, "its encoder and decoder differ in shape")
    require(decoder.get("final_activation") is None, file, "its decoder ends in an activation")
    require(base.get("activation") == "ELU" and (base.get("activation_params") or {}).get("alpha", 1.0) == 1.0,
            file, f"its activation is {base.get('activation')!r}")
    require(base.get("norm") == "weight_norm", file, f"its convolutions' norm is {base.get('norm')!r}")
    require(not base.get("disable_norm_outer_blocks"), file, "its outer blocks have no weight norm")
    require(base.get("pad_mode") in ("reflect", "constant"), file, f"its padding is {base.get('pad_mode')!r}")
    rate, bins, n_q, ratios = encodec.get("sample_rate"), rvq.get("bins"), rvq.get("n_q"), base.get("ratios")
    if not (isinstance(rate, int) and isinstance(bins, int) and bins >= 2 and isinstance(n_q, int) and n_q >= 1
            and isinstance(ratios, list) and ratios and all(isinstance(r, int) and r >= 1 for r in ratios)):
        raise AudiocraftError(f"{file}: the codec's sample_rate, rvq.bins, rvq.n_q or seanet.ratios is broken: "
                              f"download the model again.")
    # transformers counts quantizers by bandwidth: this one gives exactly n_q of them
    frame_rate, bits = math.ceil(rate / math.prod(ratios)), math.ceil(math.log2(bins))
    bandwidth = (n_q + 0.5) * frame_rate * bits / 1000
    return {"model_type": "encodec", "sampling_rate": rate, "audio_channels": encodec.get("channels", 1),
            "num_filters": base.get("n_filters"), "hidden_size": base.get("dimension"), "upsampling_ratios": ratios,
            "kernel_size": base.get("kernel_size"), "last_kernel_size": base.get("last_kernel_size"),
            "residual_kernel_size": base.get("residual_kernel_size"), "dilation_growth_rate": base.get("dilation_base"),
            "num_residual_layers": base.get("n_residual_layers"), "num_lstm_layers": base.get("lstm"),
            "compress": base.get("compress"), "use_causal_conv": bool(encodec.get("causal")),
            "pad_mode": base.get("pad_mode"), "norm_type": "weight_norm", "codebook_size": bins,
            "codebook_dim": base.get("dimension"), "target_bandwidths": [bandwidth],
            "use_conv_shortcut": not base.get("true_skip", True), "normalize": False,
            "trim_right_ratio": decoder.get("trim_right_ratio", 1.0)}


# audiocraft's names -> transformers' (convert_musicgen_transformers.py and convert_encodec_checkpoint.py, inverted)
LM_NAMES = compile_names((
    (r"transformer\.layers\.(\d+)\.self_attn\.out_proj\.weight",
     r"decoder.model.decoder.layers.\1.self_attn.out_proj.weight"),
    (r"transformer\.layers\.(\d+)\.cross_attention\.out_proj\.weight",
     r"decoder.model.decoder.layers.\1.encoder_attn.out_proj.weight"),
    (r"transformer\.layers\.(\d+)\.norm1\.(weight|bias)", r"decoder.model.decoder.layers.\1.self_attn_layer_norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm_cross\.(weight|bias)",
     r"decoder.model.decoder.layers.\1.encoder_attn_layer_norm.\2"),
    (r"transformer\.layers\.(\d+)\.norm2\.(weight|bias)", r"decoder.model.decoder.layers.\1.final_layer_norm.\2"),
    (r"transformer\.layers\.(\d+)\.linear1\.weight", r"decoder.model.decoder.layers.\1.fc1.weight"),
    (r"transformer\.layers\.(\d+)\.linear2\.weight", r"decoder.model.decoder.layers.\1.fc2.weight"),
    (r"emb\.(\d+)\.weight", r"decoder.model.decoder.embed_tokens.\1.weight"),
    (r"out_norm\.(weight|bias)", r"decoder.model.decoder.layer_norm.\1"),
    (r"linears\.(\d+)\.weight", r"decoder.lm_heads.\1.weight"),
    (r"condition_provider\.conditioners\.description\.output_proj\.(weight|bias)", r"enc_to_dec_proj.\1"),
))
FUSED = re.compile(r"transformer\.layers\.(\d+)\.(self_attn|cross_attention)\.in_proj_weight")
CODEC_NAMES = compile_names((
    (r"(encoder|decoder)\.model\.(\d+)\.(conv|convtr)\.\3\.(.*)", r"\1.layers.\2.conv.\4"),
    (r"(encoder|decoder)\.model\.(\d+)\.block\.(\d+)\.conv\.conv\.(.*)", r"\1.layers.\2.block.\3.conv.\4"),
    (r"(encoder|decoder)\.model\.(\d+)\.shortcut\.conv\.conv\.(.*)", r"\1.layers.\2.shortcut.conv.\3"),
    (r"(encoder|decoder)\.model\.(\d+)\.lstm\.(.*)", r"\1.layers.\2.lstm.\3"),
    (r"quantizer\.vq\.layers\.(\d+)\._codebook\.(.*)", r"quantizer.layers.\1.codebook.\2"),
))


def lm_weights(state: dict) -> dict:
    """The LM's tensors under transformers' MusicGen names; each fused Q/K/V projection split in three."""
    out = {}
    for key, value in state.items():
        if match := FUSED.fullmatch(key):
            layer, kind = match.groups()
            attention = "self_attn" if kind == "self_attn" else "encoder_attn"
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"decoder.model.decoder.layers.{layer}.{attention}.{name}_proj.weight"] = part
        else:
            out.update(renamed({key: value}, LM_NAMES))
    return out


def codec_weights(state: dict) -> dict:
    """The codec's tensors under transformers' EncodecModel names (prefixed `audio_encoder.`)."""
    return {"audio_encoder." + k: v for k, v in renamed(state, CODEC_NAMES).items()}


class LM:
    """What state_dict.bin holds, checked: the family, the T5's name, the window, and the config's sections and
    tensors in transformers' layout (decoder, projection of the text)."""

    def __init__(self, folder: Path):
        file = folder / LM_FILE
        package = read_package(file, "LM")
        config = read_xp_config(package, file)
        self.family = family(config)
        self.text_encoder = check_conditioners(config, file)
        interleaved = setting(config, "interleave_stereo_codebooks", file) or {}
        self.channels = 2 if interleaved.get("use") else 1
        require(config.get("channels", self.channels) == self.channels, file,
                f"it has {config.get('channels')} channels without interleaved stereo codebooks")
        require(not interleaved.get("per_timestep"), file, "its stereo codebooks interleave by timestep")
        self.sampling_rate = config.get("sample_rate")
        self.decoder = decoder_section(config, file, self.channels)
        self.window_seconds = WINDOW_SECONDS[self.family]
        state = package.get("best_state")
        if not isinstance(state, dict) or not state:
            raise AudiocraftError(f"{file} holds no LM weights (best_state): download the model again.")
        self.weights = lm_weights(state)


class Codec:
    """What compression_state_dict.bin holds: the EnCodec's config section and tensors in transformers' layout,
    or (`pretrained`) the name of the codec it points to."""

    def __init__(self, folder: Path):
        file = folder / CODEC_FILE
        package = read_package(file, "compression model")
        self.pretrained = package.get("pretrained")
        self.section, self.weights = None, {}
        if self.pretrained is not None:
            if not isinstance(self.pretrained, str) or not self.pretrained:
                raise AudiocraftError(f"{file} points to no codec ({self.pretrained!r}).")
            return
        self.section = codec_section(read_xp_config(package, file), file)
        state = package.get("best_state")
        if not isinstance(state, dict) or not state:
            raise AudiocraftError(f"{file} holds no codec weights (best_state): download the model again.")
        self.weights = codec_weights(state)
