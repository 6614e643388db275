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
import reprlib
from pathlib import Path

import numpy as np

from . import torch_bin
from .names import compile_names, renamed

LM_FILE, CODEC_FILE = "state_dict.bin", "compression_state_dict.bin"
# audiocraft's window (max_duration) is the config's dataset.segment_duration; these where it has none
WINDOW_SECONDS = {"musicgen": 30.0, "audiogen": 10.0}
MAX_CONFIG = 2**20  # characters of YAML: audiocraft's training configs are a few thousand
PRETRAINED_OTHERS = ("dac_44khz", "dac_24khz", "debug_compression_model")  # codecs audiocraft names, not run here
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
    """The training config saved with the weights (YAML text), read by PyYAML's safe_load (no tags run, no
    aliases: OmegaConf writes none, and a chain of them can expand to any size), its `${a.b}` references (which
    OmegaConf.to_yaml leaves unresolved) resolved."""
    import yaml

    class Loader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                raise yaml.YAMLError("it uses YAML aliases, which audiocraft's configs do not")
            return super().compose_node(parent, index)

    text = package.get("xp.cfg")
    if not isinstance(text, str):
        raise AudiocraftError(f"{file} holds no training config (xp.cfg): export it with audiocraft's "
                              f"utils/export.py.")
    if len(text) > MAX_CONFIG:
        raise AudiocraftError(f"{file}: its config is {len(text)} characters long, beyond any audiocraft config: "
                              f"the file is not an audiocraft checkpoint.")
    try:
        config = yaml.load(text, Loader=Loader)  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, RecursionError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise AudiocraftError(f"{file}: its config is not valid YAML ({first}); download the model again.") from None
    if not isinstance(config, dict):
        raise AudiocraftError(f"{file}: its config is not a table of settings; download the model again.")
    return resolve_references(config, config, file)


REFERENCE = re.compile(r"\$\{([A-Za-z_][\w.]*)\}")  # ${a.b}: OmegaConf's plain interpolation


def resolve_references(node, root: dict, file: Path, depth: int = 0):
    """Each string that is exactly `${a.b}` replaced by root's a.b (itself resolved); other strings as they are."""
    if depth > 64:
        raise AudiocraftError(f"{file}: its config's references go round in a circle; download the model again.")
    if isinstance(node, dict):
        return {key: resolve_references(value, root, file, depth + 1) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve_references(value, root, file, depth + 1) for value in node]
    if isinstance(node, str) and (match := REFERENCE.fullmatch(node)):
        missing = object()
        target = setting(root, match.group(1), missing)
        if target is missing:
            raise AudiocraftError(f"{file}: its config refers to {node}, which it does not hold; download the model "
                                  f"again.")
        return resolve_references(target, root, file, depth + 1)
    return node


def setting(config: dict, path: str, default=None):
    """config["a"]["b"] for path "a.b" (`default` where a part is absent or not a table)."""
    node = config
    for part in path.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


SHOWN = reprlib.Repr()
SHOWN.maxlevel, SHOWN.maxstring, SHOWN.maxother, SHOWN.maxdict, SHOWN.maxlist = 2, 60, 60, 6, 8


def require(condition: bool, file: Path, what: str, value=None) -> None:
    """Refuse what this port does not run, naming `what` (with `value`, shortened, where given)."""
    if not condition:
        shown = "" if value is None else f" ({SHOWN.repr(value)})"
        raise AudiocraftError(f"{file}: {what}{shown}, which this port does not run: it runs the architecture of "
                              f"the released MusicGen, AudioGen and MAGNeT models, and this checkpoint cannot be "
                              f"loaded here.")


def family(config: dict) -> str:
    """"audiogen" for the sound solvers (AudioGen's, MAGNeT's for sound), otherwise "musicgen" (limits.FAMILIES)."""
    return "audiogen" if config.get("solver") in ("audiogen", "audio_magnet") else "musicgen"


def check_conditioners(config: dict, file: Path) -> str:
    """The text conditioning this port runs: T5 on `description`, cross-attended; returns the T5's Hub name.
    Melody (a chroma of Demucs stems) and MusicGen-Style conditioners are refused in one line."""
    conditioners = setting(config, "conditioners") or {}
    if not isinstance(conditioners, dict):
        raise AudiocraftError(f"{file}: its conditioners are not a table.")
    wav = setting(conditioners, "self_wav.model")
    if wav == "chroma_stem":
        raise AudiocraftError(f"{file} is an audiocraft-format melody checkpoint, which conditions through Demucs "
                              f"stem separation: load the transformers-format repository instead "
                              f"({TRANSFORMERS_REPOS}), or pass --checkpoint-format transformers.")
    if wav == "style":
        raise AudiocraftError(f"{file} is MusicGen-Style, whose style conditioner is not supported yet: use "
                              f"facebook/musicgen-small or another text-to-music model.")
    others = sorted(map(str, set(conditioners) - {"description", "args"}))
    require(not others, file, "it conditions on more than text", others)
    model = setting(conditioners, "description.model")
    name = setting(conditioners, "description.t5.name")
    require(model == "t5" and isinstance(name, str) and name.count("/") <= 1 and name.strip() == name and name,
            file, "its text conditioner is not T5 named by a Hub id", model)
    require(not setting(conditioners, "description.t5.normalize_text", False), file,
            "it normalises texts (normalize_text)")
    fuser = setting(config, "fuser") or {}
    require(isinstance(fuser, dict) and fuser.get("cross") == ["description"] and not fuser.get("sum")
            and not fuser.get("prepend") and not fuser.get("input_interpolate")
            and not fuser.get("cross_attention_pos_emb", False), file,
            "its fuser is not the text cross-attended", fuser)
    return name


def delays(config: dict, file: Path, n_q: int, channels: int, magnet: bool) -> None:
    """audiocraft's delay pattern, as this port's (delay.codebook_delays) lays it out; MAGNeT's codebooks are
    parallel (it does not use the pattern to decode)."""
    modeling = setting(config, "codebooks_pattern.modeling")
    if magnet:
        require(modeling == "parallel" and channels == 1, file, "its MAGNeT codebooks are not parallel and mono",
                modeling)
        return
    require(modeling == "delay", file, "its codebook pattern is not 'delay'", modeling)
    expected = [k // channels for k in range(n_q)]
    got = setting(config, "codebooks_pattern.delay.delays", list(range(n_q)))  # audiocraft's default
    require(got == expected, file, f"its codebook delays are not {expected}", got)
    require(not setting(config, "codebooks_pattern.delay.flatten_first", 0)
            and not setting(config, "codebooks_pattern.delay.empty_initial", 0),
            file, "its delay pattern flattens or leaves initial steps empty")


# transformer_lm's settings: (the released models', audiocraft's default where the config has none)
RELEASED_LM = {"norm_first": (True, False), "bias_ff": (False, True), "bias_attn": (False, True),
               "bias_proj": (False, True), "activation": ("gelu", "relu"), "positional_embedding": ("sin", "sin"),
               "norm": ("layer_norm", "layer_norm"), "layer_scale": (None, None), "qk_layer_norm": (False, False),
               "qk_layer_norm_cross": (False, False), "kv_repeat": (1, 1), "past_context": (None, None),
               "causal": (True, False), "xpos": (False, False), "positional_scale": (1.0, 1.0),
               "max_period": (10000, 10000)}


def decoder_section(config: dict, file: Path, channels: int, magnet: bool) -> dict:
    """transformers' MusicgenDecoderConfig fields from `transformer_lm`, after checking that the LM is the one
    MusicGen, AudioGen and MAGNeT release: pre-norm, no biases, GELU, sinusoidal positions, plain attention,
    causal (MAGNeT: not)."""
    lm = setting(config, "transformer_lm")
    if not isinstance(lm, dict):
        raise AudiocraftError(f"{file}: its config has no transformer_lm section; download the model again.")
    # what the released models use; where a key is absent, audiocraft's classes' own default stands in
    for name, (value, default) in RELEASED_LM.items():
        value = False if name == "causal" and magnet else value
        got = lm.get(name, default)
        require(got == value, file, f"its transformer_lm.{name} is not {value!r}", got)
    sizes = {name: lm.get(name) for name in ("dim", "num_heads", "num_layers", "n_q", "card", "hidden_scale")}
    for name, value in sizes.items():
        if not (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
            raise AudiocraftError(f"{file}: transformer_lm.{name} must be a whole number >= 1, got {value!r}: the "
                                  f"config is broken; download the model again.")
    delays(config, file, sizes["n_q"], channels, magnet)
    return {"vocab_size": sizes["card"], "hidden_size": sizes["dim"], "num_hidden_layers": sizes["num_layers"],
            "num_attention_heads": sizes["num_heads"], "ffn_dim": sizes["dim"] * sizes["hidden_scale"],
            "num_codebooks": sizes["n_q"], "audio_channels": channels, "activation_function": "gelu",
            "scale_embedding": False, "sinusoids": "audiocraft", "pad_token_id": sizes["card"],
            "bos_token_id": sizes["card"], "model_type": "musicgen_decoder"}


def codec_section(config: dict, file: Path) -> dict:
    """transformers' EncodecConfig fields from a SEANet EnCodec's training config (audiocraft's
    get_compression_model: `encodec`, `seanet` with its encoder and decoder overrides, `rvq`)."""
    encodec, seanet, rvq = (setting(config, name) for name in ("encodec", "seanet", "rvq"))
    require(config.get("compression_model") == "encodec" and isinstance(encodec, dict) and isinstance(seanet, dict)
            and isinstance(rvq, dict), file, "its compression model is not EnCodec", config.get("compression_model"))
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
            file, "its activation is not ELU", base.get("activation"))
    require(base.get("norm") == "weight_norm", file, "its convolutions' norm is not weight norm", base.get("norm"))
    require(not base.get("disable_norm_outer_blocks"), file, "its outer blocks have no weight norm")
    require(base.get("pad_mode") in ("reflect", "constant"), file, "its padding is neither reflect nor constant",
            base.get("pad_mode"))
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
    (r"transformer\.layers\.(\d+)\.self_attn\.(?:mha\.)?out_proj\.weight",
     r"decoder.model.decoder.layers.\1.self_attn.out_proj.weight"),
    (r"transformer\.layers\.(\d+)\.cross_attention\.(?:mha\.)?out_proj\.weight",
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
    # a T5 fine-tuned with the LM (t5.finetune: true) is saved with it; transformers' T5EncoderModel names
    (r"condition_provider\.conditioners\.description\.t5\.(.*)", r"text_encoder.\1"),
))
# Q, K and V stacked; `mha.` where the attention was torch's own (custom and memory_efficient both false)
FUSED = re.compile(r"transformer\.layers\.(\d+)\.(self_attn|cross_attention)\.(?:mha\.)?in_proj_weight")
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
            if value.ndim != 2 or value.shape[0] != 3 * value.shape[1]:
                raise AudiocraftError(f"{key} is {value.shape}, not Q, K and V stacked (3 x width, width): the "
                                      f"checkpoint is broken; download it again.")
            for name, part in zip("qkv", np.split(value, 3, axis=0)):
                out[f"decoder.model.decoder.layers.{layer}.{attention}.{name}_proj.weight"] = part
        else:
            out.update(renamed({key: value}, LM_NAMES))
    return out


def codec_weights(state: dict) -> dict:
    """The codec's tensors under transformers' EncodecModel names (prefixed `audio_encoder.`)."""
    return {"audio_encoder." + k: v for k, v in renamed(state, CODEC_NAMES).items()}


def parsed(make):
    """`make()`, a config's wrong types (a list where a table belongs, ...) refused in one line."""
    def checked(self, folder: Path):
        try:
            make(self, folder)
        except (TypeError, AttributeError, KeyError) as error:
            raise AudiocraftError(f"{folder}: its audiocraft config is broken ({SHOWN.repr(str(error))}); download "
                                  f"the model again.") from None
    return checked


def magnet_settings(config: dict, file: Path) -> dict:
    """MAGNeT's span of masking (masking.span_len) and the context of codebooks above the first
    (transformer_lm.subcodes_context), as audiocraft's load_lm_model_magnet passes them on; the clip is the
    window (dataset.segment_duration, required)."""
    span_len = setting(config, "masking.span_len", 3)
    context = setting(config, "transformer_lm.subcodes_context", 5)
    segment = setting(config, "dataset.segment_duration")
    for name, value, low in (("masking.span_len", span_len, 1), ("transformer_lm.subcodes_context", context, -1)):
        if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= 2**20):
            raise AudiocraftError(f"{file}: {name} must be a whole number from {low}, got {SHOWN.repr(value)}: the "
                                  f"config is broken; download the model again.")
    if segment is None:
        raise AudiocraftError(f"{file}: a MAGNeT config must give its clip's length (dataset.segment_duration); "
                              f"download the model again.")
    return {"span_len": span_len, "subcodes_context": context}


class LM:
    """What state_dict.bin holds, checked: the family, the T5's name, the window (the config's
    dataset.segment_duration, audiocraft's max_duration), and the config's sections and tensors in transformers'
    layout (decoder, projection of the text, a fine-tuned T5)."""

    @parsed
    def __init__(self, folder: Path):
        file = folder / LM_FILE
        package = read_package(file, "LM")
        config = read_xp_config(package, file)
        self.family = family(config)
        self.text_encoder = check_conditioners(config, file)
        interleaved = setting(config, "interleave_stereo_codebooks") or {}
        self.channels = 2 if interleaved.get("use") else 1
        require(config.get("channels", self.channels) == self.channels, file,
                "its channels are not mono, nor stereo by interleaved codebooks", config.get("channels"))
        require(not interleaved.get("per_timestep"), file, "its stereo codebooks interleave by timestep")
        self.sampling_rate = config.get("sample_rate")
        kind = config.get("lm_model")
        require(kind in ("transformer_lm", "transformer_lm_magnet"), file, "its LM is not audiocraft's "
                "transformer_lm (MusicGen, AudioGen) or transformer_lm_magnet (MAGNeT)", kind)
        magnet = kind == "transformer_lm_magnet"
        self.decoder = decoder_section(config, file, self.channels, magnet)
        self.magnet = magnet_settings(config, file) if magnet else None
        window = setting(config, "dataset.segment_duration", WINDOW_SECONDS[self.family])
        if not (isinstance(window, (int, float)) and not isinstance(window, bool) and 0 < window <= 3600):
            raise AudiocraftError(f"{file}: dataset.segment_duration must be seconds from 0 to 3600, got "
                                  f"{SHOWN.repr(window)}: the config is broken; download the model again.")
        self.window_seconds = float(window)
        state = package.get("best_state")
        if not isinstance(state, dict) or not state:
            raise AudiocraftError(f"{file} holds no LM weights (best_state): download the model again.")
        self.weights = lm_weights(state)


class Codec:
    """What compression_state_dict.bin holds: the EnCodec's config section and tensors in transformers' layout,
    or (`pretrained`) the Hub id of the codec it points to."""

    @parsed
    def __init__(self, folder: Path):
        file = folder / CODEC_FILE
        package = read_package(file, "compression model")
        self.pretrained = package.get("pretrained")
        self.section, self.weights = None, {}
        if self.pretrained is not None:
            if self.pretrained in PRETRAINED_OTHERS:
                raise AudiocraftError(f"{file} points to the codec {self.pretrained}, which this port does not run "
                                      f"(it runs EnCodec).")
            if not (isinstance(self.pretrained, str) and self.pretrained.count("/") == 1
                    and not self.pretrained.startswith((".", "/", "~"))):
                raise AudiocraftError(f"{file} points to the codec {SHOWN.repr(self.pretrained)}, not a Hub id like "
                                      f"facebook/encodec_32khz: a checkpoint names codecs on the Hub only (put "
                                      f"a codec's own {CODEC_FILE} beside {LM_FILE} instead).")
            return
        self.section = codec_section(read_xp_config(package, file), file)
        state = package.get("best_state")
        if not isinstance(state, dict) or not state:
            raise AudiocraftError(f"{file} holds no codec weights (best_state): download the model again.")
        self.weights = codec_weights(state)
