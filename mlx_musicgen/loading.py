"""Loading a model: resolve (Hub id or folder) -> config -> model -> sanitize -> quantize -> strict load.

Every file the model needs must be there and every parameter filled by a tensor of its shape; what is wrong
is named in a one-line CheckpointError that says what to do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import mlx.core as mx
from mlx.utils import tree_flatten

if TYPE_CHECKING:
    from .model import MusicGen

FORMAT_VERSION = 2  # of converted folders; bump when the layout of weights or config changes (2: portable layout)
CONVERTED_KEY = "mlx_musicgen"  # the converted config.json's own section
SUPPORTED_MODEL_TYPES = ("musicgen",)

# What a download needs: configs, tokenizer and weights (the .bin only where a repo has no safetensors).
HUB_PATTERNS = ["*.json", "*.safetensors", "spiece.model", "tokenizer*"]


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says what to do."""


def resolve(path_or_id: str | Path) -> Path:
    """A local folder as it is; otherwise a Hub repo id, downloaded (or found in the cache when offline)."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the folder that holds config.json.")
        return path
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(
            f"{path_or_id} is neither an existing folder nor a Hub id like facebook/musicgen-small."
        )
    return download(str(path_or_id))


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
        if not list(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS + ["pytorch_model*.bin"]))
        return folder
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"No model {repo_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`)."
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached (offline?): "
            f"download it once with `hf download {repo_id}` while online, or pass a local folder."
        ) from None
    except HFValidationError:
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id like facebook/musicgen-small."
        ) from None
    except (HfHubHTTPError, OSError) as e:  # other HTTP errors, network failures, a full disk
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not download {repo_id} ({first_line}): check the connection, or pass a local folder."
        ) from None


def read_config(folder: Path) -> dict:
    file = folder / "config.json"
    if not file.is_file():
        raise CheckpointError(f"{folder} has no config.json: it is not a MusicGen checkpoint.")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file} is not valid JSON ({e}); download or convert the model again.") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise CheckpointError(f"{file} has no model_type: {folder} is not a MusicGen checkpoint.")
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise CheckpointError(
            f"{folder} holds a {model_type!r} model; supported: MusicGen text-to-music checkpoints "
            "(facebook/musicgen-small, -medium, -large and the -stereo ones), not melody or other kinds."
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
    return json.loads(file.read_text()) if file.is_file() else {}


def load_safetensors(file: Path) -> dict[str, mx.array]:
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: download or convert the model again.")
    try:
        return mx.load(str(file))
    except Exception as e:  # mlx reports truncation and bad headers as plain runtime errors
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); download or convert it again.") from None


BinReader = Callable[[list[Path]], dict[str, mx.array]]


def load_hf_weights(folder: Path, read_bin: BinReader | None = None) -> dict[str, mx.array]:
    """All tensors of a Hub-layout checkpoint: one safetensors file, or shards with an index. A checkpoint with
    only torch .bin files needs `read_bin`, which only the conversion script supplies (torch is not a run-time
    dependency)."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index} is not a valid shard index; download the model again.") from None
        weights = {}
        for shard in shards:
            weights.update(load_safetensors(folder / shard))
        return weights
    if (folder / "model.safetensors").is_file():
        return load_safetensors(folder / "model.safetensors")
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if bins and read_bin is not None:
        return read_bin(bins)
    if bins:
        raise CheckpointError(
            f"{folder} has only pytorch_model.bin weights: convert it once with "
            f"`python convert.py --hf-path {folder} --mlx-path FOLDER` (needs torch) and load FOLDER."
        )
    raise CheckpointError(f"{folder} has no model.safetensors (or shards, or pytorch_model.bin).")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # transformers reads config.json on the way and warns that MusicGen's pad id (2048) lies outside the
    # codebook vocabulary, which is by design; keep that off the user's terminal.
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        return AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise CheckpointError(f"Could not load the tokenizer from {folder} ({e}).") from None
    finally:
        logging.set_verbosity(verbosity)


def build_model(folder: Path, read_bin: BinReader | None = None) -> tuple[MusicGen, dict]:
    """The model a checkpoint folder describes, its weights loaded strictly, and its raw config."""
    from .model import MusicGen, MusicGenConfig

    raw = read_config(folder)
    config = MusicGenConfig.from_dict(raw, read_generation_config(folder))
    model = MusicGen(config)
    if is_converted(raw):
        weights = load_safetensors(folder / "model.safetensors")
    else:
        # Contiguous, as a converted folder's are: the same layouts give the same kernels, hence the same bits.
        weights = {k: mx.contiguous(v) for k, v in MusicGen.sanitize(load_hf_weights(folder, read_bin)).items()}
    load_weights(model, weights, folder)
    return model, raw


def load_model(path_or_id: str | Path, *, dtype: mx.Dtype | None = None) -> MusicGen:
    """A converted folder, a Hub-layout folder (converted in memory) or a Hub id -> MusicGen with its tokenizer,
    the decoder in `dtype` if given (the portable model: see MusicGen.from_pretrained for the device's)."""
    folder = resolve(path_or_id)
    model, _ = build_model(folder)
    if dtype is not None:
        model.set_decoder_dtype(dtype)
    model.tokenizer = load_tokenizer(folder)
    return model


def load_weights(model: MusicGen, weights: dict[str, mx.array], source: Path | str) -> None:
    """Strict loading: every tensor must fill a parameter of the same shape, and every parameter be filled."""
    expected = dict(tree_flatten(model.parameters()))
    unexpected = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
    problems = []
    for what, names in (("unexpected tensors", unexpected), ("missing tensors", missing), ("wrong shapes", wrong)):
        if names:
            problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
    if problems:
        raise CheckpointError(f"{source} does not match the MusicGen architecture of its config: {'; '.join(problems)}.")
    model.load_weights(list(weights.items()), strict=True)
