"""Where a model comes from: a local folder, or a Hub repo downloaded by huggingface_hub (or found in its cache when
offline), in transformers' layout or audiocraft's; failures are one-line CheckpointErrors that say what to do.
"""

from __future__ import annotations

from pathlib import Path

from . import audiocraft
from .checkpoint_files import CheckpointError

HUB_PATTERNS = ["*.json", "*.safetensors", "spiece.model", "tokenizer*"]
CHECKPOINT_FORMATS = ("auto", "transformers", "audiocraft")  # auto: transformers' where a repo has both

def resolve(path_or_id: str | Path, checkpoint_format: str = "auto") -> Path:
    """A local folder as it is; otherwise a Hub repo id, downloaded (or found in the cache when offline) in
    `checkpoint_format` (see download)."""
    if checkpoint_format not in CHECKPOINT_FORMATS:
        raise ValueError(f"checkpoint_format must be one of {', '.join(CHECKPOINT_FORMATS)}, got "
                         f"{checkpoint_format!r}.")
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path} is a file; give the folder that holds config.json (or audiocraft's "
                                  f"{audiocraft.LM_FILE}).")
        return path
    if str(path_or_id).startswith((".", "/", "~")) or str(path_or_id).count("/") != 1:
        raise CheckpointError(
            f"{path_or_id} is neither an existing folder nor a Hub id like facebook/musicgen-small."
        )
    return download(str(path_or_id), checkpoint_format)


def download(repo_id: str, checkpoint_format: str = "auto") -> Path:
    """A model's Hub snapshot: configs, tokenizer and safetensors (the .bin only where a repo has none) in
    transformers' layout; where the repo has none (or `checkpoint_format` is "audiocraft"), audiocraft's two
    files."""
    if checkpoint_format != "audiocraft":
        folder = hub_folder(repo_id, "model")
        if (folder / "config.json").is_file() or checkpoint_format == "transformers":
            return folder
    return snapshot(repo_id, [audiocraft.LM_FILE, audiocraft.CODEC_FILE])


def snapshot(repo_id: str, patterns: list[str], what: str = "model") -> Path:
    """The files of a Hub repo that match `patterns`, downloaded (or found in the cache when offline), with
    one-line CheckpointErrors that say what to do; `what` the repo holds names it in them (a model, an
    adapter)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    named = repo_id if what == "model" else f"the {what} {repo_id}"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"No {what} {repo_id!r} on the Hugging Face Hub (or it is private: log in with `hf auth login`)."
        ) from None
    except LocalEntryNotFoundError:
        raise CheckpointError(
            f"{named} is not in the local Hugging Face cache and the Hub cannot be reached (offline?): "
            f"download it once with `hf download {repo_id}` while online, or pass a local folder."
        ) from None
    except HFValidationError:
        raise CheckpointError(
            f"{repo_id!r} is neither an existing folder nor a valid Hub id like facebook/musicgen-small."
        ) from None
    except (HfHubHTTPError, OSError) as e:  # other HTTP errors, network failures, a full disk
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"could not download {named} ({first_line}): check the connection, or pass a local folder."
        ) from None


def model_folder(path_or_id: str | Path, what: str) -> Path:
    """A folder as it is, or a Hub repo's configs, tokenizer and weights (see snapshot); `what` it is names it in
    messages."""
    path = Path(path_or_id).expanduser()
    return path if path.is_dir() else hub_folder(str(path_or_id), what)


def hub_folder(repo_id: str, what: str) -> Path:
    """A Hub repo's configs, tokenizer and safetensors (its .bin only where it has none), see snapshot."""
    folder = snapshot(repo_id, HUB_PATTERNS, what)
    if not list(folder.glob("*.safetensors")):
        folder = snapshot(repo_id, HUB_PATTERNS + ["pytorch_model*.bin"], what)
    return folder
