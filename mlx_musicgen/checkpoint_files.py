"""A checkpoint's files read safely: JSON settings, safetensors (their header checked against the file before any
tensor is trusted) and torch .bin state dicts (read by torch_bin, nothing in them run); what is wrong is named in
a one-line CheckpointError that says what to do.
"""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import torch_bin

MAX_SIZE = 2**31 - 1  # the largest dimension MLX arrays take
MAX_HEADER = 100 * 2**20  # safetensors' own limit on its JSON header
SAFETENSORS_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "I16": 2, "F16": 2,
                        "BF16": 2, "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used, with a message that says what to do."""

def read_json(file: Path):
    try:
        return json.loads(file.read_text())
    except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, numbers or nesting beyond parsing
        raise CheckpointError(f"{file} is not valid JSON ({e}); download or convert the model again.") from None


def read_settings(file: Path) -> dict:
    """A JSON file that must hold a table of settings."""
    config = read_json(file)
    if not isinstance(config, dict):
        raise CheckpointError(f"{file} is not a table of settings; download or convert the model again.")
    return config


def check_safetensors_header(file: Path) -> None:
    """A safetensors file's header, read before any tensor and checked against the file: a header length past
    the end, offsets outside the data or overlapping, sizes that are not dtype x shape are refused as corrupt,
    so that nothing trusts a header that lies."""

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{file} is truncated or corrupt ({why}); download or convert it again.")

    size = file.stat().st_size
    with open(file, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt(f"{size} bytes, shorter than a safetensors header")
        length = int.from_bytes(prefix, "little")
        if length > min(MAX_HEADER, size - 8):
            raise corrupt(f"its header claims {length} bytes, the file holds {size - 8}")
        try:
            header = json.loads(f.read(length))
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, numbers or nesting beyond parsing
            raise corrupt(f"its header is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a table of tensors")
    data, spans = size - 8 - length, []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (info.get(k) for k in ("dtype", "shape", "data_offsets")) if isinstance(
            info, dict) else (None, None, None)
        if (not isinstance(dtype, str) or dtype not in SAFETENSORS_ITEMSIZE or not isinstance(shape, list) or not isinstance(offsets, list)
                or not all(isinstance(n, int) and 0 <= n <= MAX_SIZE for n in shape)
                or len(offsets) != 2 or not all(isinstance(n, int) for n in offsets)):
            raise corrupt(f"tensor {name!r} has a broken entry")
        begin, end = offsets
        if not 0 <= begin <= end <= data or end - begin != math.prod(shape) * SAFETENSORS_ITEMSIZE[dtype]:
            raise corrupt(f"tensor {name!r} claims bytes {begin}..{end} for {dtype}{shape} in {data} bytes of data")
        spans.append((begin, end))
    spans.sort()
    if any(end > next_begin for (_, end), (next_begin, _) in zip(spans, spans[1:])):
        raise corrupt("tensors overlap")


def load_safetensors(file: Path) -> dict[str, mx.array]:
    """The tensors of a safetensors file, its header checked first (check_safetensors_header), loaded lazily:
    no tensor is read before it is used."""
    if not file.is_file():
        raise CheckpointError(f"{file} is missing: download or convert the model again.")
    check_safetensors_header(file)
    try:
        return mx.load(str(file))
    except Exception as e:  # mlx reports truncation and bad headers as plain runtime errors
        raise CheckpointError(f"{file} is truncated or corrupt ({e}); download or convert it again.") from None


def load_hf_weights(folder: Path) -> dict[str, mx.array]:
    """All tensors of a Hub-layout checkpoint: one safetensors file, or shards with an index; or, where it has
    none, its torch .bin files (read without torch and without running anything from them: torch_bin)."""
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
    if bins:
        weights = {}
        for file in bins:
            weights.update(load_torch_bin(file))
        return weights
    raise CheckpointError(f"{folder} has no model.safetensors (or shards, or pytorch_model.bin).")


def load_torch_bin(file: Path) -> dict[str, mx.array]:
    """The state dict in a torch .bin file, every tensor float32 (as torch's `.float()` made them before)."""
    try:
        state = torch_bin.read_state_dict(file)
    except (ValueError, pickle.UnpicklingError) as error:
        raise CheckpointError(str(error)) from None
    return as_mlx(state)


def as_mlx(state: dict[str, np.ndarray]) -> dict[str, mx.array]:
    """numpy tensors (torch_bin's) as MLX arrays, every one float32 (as torch's `.float()` made them before),
    taken out of `state` one by one, so that each numpy copy is freed as its MLX one is made."""
    return {name: mx.array(np.asarray(state.pop(name)).astype(np.float32, copy=False)) for name in list(state)}
