"""Loading a model: resolve (Hub id or folder: hub) -> config -> model -> sanitize -> quantize -> strict load, the
files read by checkpoint_files (or audiocraft's by audiocraft).

Every file the model needs must be there and every parameter filled by a tensor of its shape; what is wrong
is named in a one-line CheckpointError that says what to do.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten

from . import audiocraft
from .checkpoint_files import (MAX_SIZE, CheckpointError, as_mlx, load_hf_weights, load_safetensors, read_json,
                               read_settings)
from .encodec import EncodecConfig
from .hub import hub_folder, model_folder, resolve
from .limits import MAX_DURATION
from .model import AUDIOCRAFT_KEY, CONVERTED_KEY, MusicGenConfig, MusicGenModel

FORMAT_VERSION = 2  # of converted folders; bump when the layout of weights or config changes (2: portable layout)
SUPPORTED_MODEL_TYPES = ("musicgen", "musicgen_melody")

# What a download needs: configs, tokenizer and weights (the .bin only where a repo has no safetensors).
TOKENIZER_MODELS = ("spiece.model", "tokenizer.json")  # either holds the vocabulary


def checkpoint_format_of(folder: Path, checkpoint_format: str = "auto") -> str:
    """"transformers" (a config.json: transformers' layout or a converted folder) or "audiocraft" (its
    state_dict.bin); where a folder has both, transformers' unless `checkpoint_format` asks for the other."""
    has_config, has_audiocraft = (folder / "config.json").is_file(), audiocraft.is_audiocraft(folder)
    if checkpoint_format == "audiocraft" or (checkpoint_format == "auto" and has_audiocraft and not has_config):
        if not has_audiocraft:
            raise CheckpointError(f"{folder} has no audiocraft checkpoint ({audiocraft.LM_FILE}): leave out "
                                  f"--checkpoint-format audiocraft to load its transformers files.")
        return "audiocraft"
    return "transformers"


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no config.json: it is not a MusicGen checkpoint.")
    config = read_json(file)
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{file} has no model_type: {folder} is not a MusicGen checkpoint.")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{folder} holds a {model_type!r} model; supported: MusicGen checkpoints (facebook/musicgen-small, "
            "-medium, -large, -melody, -melody-large and their -stereo ones), not other kinds."
        )
    parts = [name for name in ("text_encoder", "decoder", "audio_encoder") if not isinstance(config.get(name), dict)]
    if parts:
        raise CheckpointError(
            f"{file} lacks the {', '.join(parts)} section(s) of a MusicGen config: download or convert it again."
        )
    converted = config.get(CONVERTED_KEY)
    version = converted.get("format_version") if isinstance(converted, dict) else None
    if converted is not None and version != FORMAT_VERSION:
        raise CheckpointError(
            f"{folder} was converted by another version of mlx-musicgen (format {version},"
            f" this one reads {FORMAT_VERSION}): convert the original checkpoint again."
        )
    return config


def is_converted(config: dict) -> bool:
    return CONVERTED_KEY in config


def read_generation_config(folder: Path) -> dict:
    file = folder / "generation_config.json"
    return read_settings(file) if file.is_file() else {}


MELODY_EXTRACTOR = "MusicgenMelodyFeatureExtractor"


def preprocessor_source(folder: Path) -> tuple[Path, str | None] | None:
    """Where a melody checkpoint keeps its chroma settings: preprocessor_config.json (transformers 4, the Hub),
    or, where there is none, the "feature_extractor" section of processor_config.json (transformers 5's
    processor.save_pretrained writes only that file). Returns (file, section or None), None if neither holds
    them; a section naming another extractor (plain MusicGen's EnCodec one) holds no chroma settings."""
    file = folder / "preprocessor_config.json"
    if file.is_file():
        return file, None
    file = folder / "processor_config.json"
    if not file.is_file():
        return None
    nested = read_settings(file).get("feature_extractor")
    if isinstance(nested, dict) and nested.get("feature_extractor_type", MELODY_EXTRACTOR) != MELODY_EXTRACTOR:
        return None
    return (file, "feature_extractor") if nested is not None else None


def read_preprocessor_config(folder: Path, raw: dict) -> dict | None:
    """A melody checkpoint's chroma settings (see preprocessor_source), each source checked the same way; None
    for other kinds of checkpoint."""
    if raw.get("model_type") != "musicgen_melody":
        return None
    source = preprocessor_source(folder)
    if source is None:
        raise CheckpointError(f"{folder} has no preprocessor_config.json, which holds a melody model's chroma "
                              f"settings (nor a processor_config.json with them under \"feature_extractor\"): "
                              f"download the model again, or copy the file from the Hub checkpoint.")
    file, section = source
    settings = read_settings(file)
    if section is None:
        return settings
    if not isinstance(settings[section], dict):
        raise CheckpointError(f"{file}: its \"{section}\" is not a table of settings; download or save the "
                              f"model again.")
    return settings[section]


def check_tokenizer_files(folder: Path) -> None:
    """Without spiece.model or tokenizer.json transformers would make a default T5 tokenizer that maps every
    word to <unk>, and the music would silently ignore the text."""
    if not any((folder / name).is_file() for name in TOKENIZER_MODELS):
        raise CheckpointError(
            f"{folder} has no tokenizer ({' or '.join(TOKENIZER_MODELS)}): download the model again, or copy "
            f"the tokenizer files of the Hub checkpoint it came from into the folder."
        )


def load_tokenizer(folder: Path, vocab_size: int):
    """The checkpoint's own tokenizer (its files checked by build_model), refused if its vocabulary is larger
    than the text encoder's embedding table (`vocab_size` rows): another model's."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # transformers reads config.json on the way and warns that MusicGen's pad id (2048) lies outside the
    # codebook vocabulary, which is by design; keep that off the user's terminal.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not load the tokenizer from {folder} ({e}).") from None
    finally:
        logging.set_verbosity(verbosity)
    if len(tokenizer) > vocab_size:
        raise CheckpointError(
            f"the tokenizer in {folder} has {len(tokenizer)} tokens but the text encoder only {vocab_size}: the "
            f"tokenizer files belong to another model; download the model again."
        )
    return tokenizer


def check_fields(config, section: str, file: Path) -> None:
    """Every field of a config dataclass as its type says, sizes within 1..2**31 - 1 (MLX's dimensions):
    what a broken or hostile config.json holds is refused before anything is built from it."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        value, kind = getattr(config, field.name), hints[field.name]
        options = typing.get_args(kind) if isinstance(kind, types.UnionType) else (kind,)
        if value is None and type(None) in options:
            continue
        kind = next(k for k in options if k is not type(None))
        listed = typing.get_origin(kind) is tuple
        item = typing.get_args(kind)[0] if listed else kind
        items = value if listed and isinstance(value, tuple) else (value,)
        if item is int:
            valid = all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SIZE for v in items)
            want = "a whole number from 1 to 2**31 - 1"
        elif item is float:
            valid = all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1e300
                        for v in items)  # NaN fails both comparisons, infinity and ints past a double the second
            want = "a finite number above 0"
        else:
            valid, want = isinstance(value, item), f"a {item.__name__}"
        if listed:
            valid = valid and isinstance(value, tuple) and 0 < len(value) <= 64
            want = f"a list of 1 to 64 items, each {want}"
        if not valid:
            raise CheckpointError(f"{file}: {section}.{field.name} must be {want}, got {value!r}: the config is "
                                  f"broken; download or convert the model again.")


def check_config(config: MusicGenConfig, file: Path, tensors: int) -> None:
    """A config's fields (check_fields), each part's own rules, and its counts against the weights: a config
    can only ask for as many layers, codebooks or quantizers as the weights hold tensors, so that an absurd
    count is refused at once instead of building a model for minutes before the shapes disagree."""
    parts = {"text_encoder": config.text_encoder, "decoder": config.decoder, "audio_encoder": config.audio_encoder}
    if config.melody is not None:
        source = preprocessor_source(file.parent)
        check_fields(config.melody.features, "preprocessor", source[0] if source else file.parent)
        parts["melody"] = config.melody

    if config.magnet is not None:  # its own check: subcodes_context may be -1
        try:
            config.magnet.check()
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}; download or convert the model again.") from None
    for section, part in parts.items():
        check_fields(part, section, file)
        try:
            part.check()
        except ValueError as e:
            raise CheckpointError(f"{file}: {e}; download or convert the model again.") from None
    audio = config.audio_encoder
    longest = int(MAX_DURATION * audio.frame_rate)
    if not (isinstance(config.max_length, int) and not isinstance(config.max_length, bool)
            and 4 <= config.max_length <= longest):
        raise CheckpointError(f"{file.parent / 'generation_config.json'}: max_length must be from 4 to {longest} "
                              f"(an hour at {audio.frame_rate} Hz), got {config.max_length}.")
    if config.melody is not None and config.melody.chroma_length > config.max_length:
        raise CheckpointError(f"{file}: chroma_length {config.melody.chroma_length} is longer than the generation "
                              f"window ({config.max_length} frames): the config is broken.")
    counts = {
        "decoder.num_hidden_layers": config.decoder.num_hidden_layers,
        "decoder.num_codebooks": config.decoder.num_codebooks,
        "text_encoder.num_layers": config.text_encoder.num_layers,
        "audio_encoder's residual blocks": len(audio.upsampling_ratios) * audio.num_residual_layers,
        "audio_encoder.num_lstm_layers": audio.num_lstm_layers,
        "audio_encoder's quantizers": audio.num_quantizers,
    }
    for name, count in counts.items():
        if count > tensors:
            raise CheckpointError(f"{file}: {name} is {count}, more than the {tensors} tensors of the weights "
                                  f"could fill: the config does not belong to these weights.")


def build_model(folder: Path, *, checkpoint_format: str = "auto", text_encoder: str | Path | None = None
                ) -> tuple[MusicGenModel, dict, Path]:
    """The model a checkpoint folder describes, its weights loaded strictly, its raw config (config.json, or for
    audiocraft's files one made from theirs: read_audiocraft) and the folder that holds its tokenizer. The config
    is checked against the weights (loaded lazily: their shapes are known before any is read) before the model
    is built. `checkpoint_format` and `text_encoder`: see checkpoint_format_of and read_audiocraft."""
    if checkpoint_format_of(folder, checkpoint_format) == "audiocraft":
        raw, generation, weights, tokenizer = read_audiocraft(folder, text_encoder)
        preprocessor, file = None, folder / audiocraft.LM_FILE
    elif text_encoder is not None:
        raise CheckpointError(f"{folder} is in transformers' layout, whose text encoder is inside: --text-encoder is "
                              f"for audiocraft checkpoints; leave it out.")
    else:
        raw, tokenizer, file = read_config(folder), folder, folder / "config.json"
        generation, preprocessor = read_generation_config(folder), read_preprocessor_config(folder, raw)
        weights = load_safetensors(folder / "model.safetensors") if is_converted(raw) else load_hf_weights(folder)
    check_tokenizer_files(tokenizer)  # a converted folder holds them too
    try:
        config = MusicGenConfig.from_dict(raw, generation, preprocessor)
    except (TypeError, ValueError, KeyError, AttributeError, OverflowError) as e:
        raise CheckpointError(f"{file} is broken ({e}); download or convert the model again.") from None
    if not weights:
        raise CheckpointError(f"{folder / 'model.safetensors'} holds no tensors: download or convert the model again.")
    check_config(config, file, len(weights))
    model = MusicGenModel(config)
    if not is_converted(raw):
        # Contiguous, as a converted folder's are: the same layouts give the same kernels, hence the same bits.
        weights = {k: mx.contiguous(v) for k, v in MusicGenModel.sanitize(weights).items()}
    load_weights(model, weights, folder)
    return model, raw, tokenizer


def read_audiocraft(folder: Path, text_encoder: str | Path | None = None) -> tuple[dict, dict, dict, Path]:
    """audiocraft's two files (see audiocraft) -> what a transformers checkpoint folder holds: a config.json-shaped
    dict (its AUDIOCRAFT_KEY section says what follows audiocraft), the generation settings (the window: 30 s for
    MusicGen, 10 s for AudioGen), every tensor under transformers' names, and the folder of the T5 and its
    tokenizer: `text_encoder` (a folder or Hub id), by default the one the config names, from the Hub or its
    cache. A codec file that points to a pretrained codec takes it by its Hub id (pretrained_codec)."""
    try:
        lm = audiocraft.LM(folder)
        codec = audiocraft.Codec(folder)
        if codec.pretrained is None:
            codec_config, codec_weights = codec.section, as_mlx(codec.weights)
        else:
            codec_config, codec_weights = pretrained_codec(codec.pretrained)
    except audiocraft.AudiocraftError as error:
        raise CheckpointError(str(error)) from None
    codec_rate = codec_config.get("sampling_rate")
    if lm.sampling_rate is not None and codec_rate != lm.sampling_rate:
        raise CheckpointError(f"{folder}: the LM was trained at {lm.sampling_rate} Hz, its codec runs at "
                              f"{codec_rate} Hz: the two files do not belong together; download the model again.")
    # the config's name is taken as a Hub id only: a checkpoint does not choose folders on this machine
    t5 = model_folder(text_encoder, "text encoder") if text_encoder is not None else \
        hub_folder(lm.text_encoder, "text encoder")
    t5_config = read_settings(required(t5 / "config.json", "text encoder"))
    t5_weights = {"text_encoder." + k: v for k, v in load_hf_weights(t5).items()
                  if k == "shared.weight" or k.startswith("encoder.")}  # a whole T5 has a decoder too
    projection = lm.weights.get("enc_to_dec_proj.weight")
    if projection is not None and projection.shape[-1] != t5_config.get("d_model"):
        raise CheckpointError(f"the text encoder in {t5} is {t5_config.get('d_model')} wide, the LM reads "
                              f"{projection.shape[-1]}: give the T5 its config names ({lm.text_encoder}).")
    frame_rate = EncodecConfig.from_dict(codec_config).frame_rate
    window = int(lm.window_seconds * frame_rate)  # audiocraft's int(max_duration * frame_rate)
    raw = {"model_type": "musicgen", "text_encoder": t5_config, "decoder": lm.decoder, "audio_encoder": codec_config,
           AUDIOCRAFT_KEY: {"family": lm.family, "text_encoder": lm.text_encoder,
                            "compression_model": codec.pretrained,
                            "magnet": None if lm.magnet is None else {**lm.magnet, "frames": window}}}
    generation = {"max_length": window}
    # a T5 fine-tuned with the LM comes with it, and takes the place of the Hub's
    return raw, generation, {**t5_weights, **as_mlx(lm.weights), **codec_weights}, t5


def required(file: Path, what: str) -> Path:
    if not file.is_file():
        raise CheckpointError(f"{file.parent} has no {file.name}: it is not the {what} it should be; download it "
                              f"again.")
    return file


def pretrained_codec(name: str) -> tuple[dict, dict]:
    """The codec a compression file points to by its Hub id (facebook/encodec_32khz), in transformers' EncodecModel
    layout, as audiocraft's CompressionModel.get_pretrained takes it."""
    folder = hub_folder(name, "codec")
    config = read_settings(required(folder / "config.json", "codec"))
    if config.get("model_type") != "encodec":
        raise CheckpointError(f"{folder} holds a {config.get('model_type')!r} model, not the EnCodec codec that "
                              f"{audiocraft.CODEC_FILE} points to: the checkpoint names the wrong codec.")
    return config, {"audio_encoder." + k: v for k, v in load_hf_weights(folder).items()}


def load_model(path_or_id: str | Path, *, dtype: mx.Dtype | None = None, checkpoint_format: str = "auto",
               text_encoder: str | Path | None = None) -> tuple[MusicGenModel, object]:
    """A converted folder, a Hub-layout folder (converted in memory), audiocraft's files or a Hub id -> the model
    and its tokenizer, the decoder in `dtype` if given (the portable model: see MusicGen.from_pretrained for the
    device's)."""
    folder = resolve(path_or_id, checkpoint_format)
    model, _, tokenizer = build_model(folder, checkpoint_format=checkpoint_format, text_encoder=text_encoder)
    if dtype is not None:
        model.set_decoder_dtype(dtype)
    return model, load_tokenizer(tokenizer, model.config.text_encoder.vocab_size)


def mismatches(weights: dict[str, mx.array], expected: dict[str, mx.array]) -> tuple[list, list, list]:
    """The names of tensors `weights` lacks, those it has beyond `expected`, and those of another shape."""
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    return missing, unexpected, wrong


def load_weights(model: MusicGenModel, weights: dict[str, mx.array], source: Path | str) -> None:
    """Strict loading: every tensor must fill a parameter of the same shape, and every parameter be filled."""
    expected = dict(tree_flatten(model.parameters()))
    missing, unexpected, wrong = mismatches(weights, expected)
    problems = []
    for what, names in (("unexpected tensors", unexpected), ("missing tensors", missing), ("wrong shapes", wrong)):
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if wrong:
        first = wrong[0]
        problems.append(f"{first} is {tuple(weights[first].shape)} in the weights, {tuple(expected[first].shape)} "
                        f"by the config")
    if problems:
        raise CheckpointError(f"{source} does not match the MusicGen architecture of its config: {'; '.join(problems)}.")
    model.load_weights(list(weights.items()), strict=True)
