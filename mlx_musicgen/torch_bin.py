"""torch's .bin checkpoints read without torch and without running anything from them.

`torch.save` writes a zip archive: `<name>/data.pkl`, a pickle of the saved object whose tensors are persistent
references to storages, each storage's bytes in a record `<name>/data/<key>`. A pickle can name any callable
and have it called; this unpickler knows only what a saved state dict needs (tensor and storage rebuilds,
OrderedDict, plain containers and scalars), refuses every other name in one line before importing it, and builds
the tensors as numpy arrays straight from the records. Python's pickle machinery is used as is (the protocol's
opcodes); what runs is only the functions below. torch's pre-1.6 format (a bare pickle, not a zip) is refused.

    read_torch_bin(path) -> the saved object, tensors as numpy arrays (bfloat16 as float32)
"""

from __future__ import annotations

import _compat_pickle  # pickle's own map of Python 2 names (protocol 2, torch's default)
import collections
import io
import pickle
import zipfile
import zlib
from pathlib import Path

import numpy as np

STORAGE_DTYPES = {
    "DoubleStorage": np.float64, "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": "bfloat16",
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16, "CharStorage": np.int8,
    "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """The file asks for something a checkpoint does not need (and that is not done)."""


class StorageType:
    """What the pickle's `torch.<Name>Storage` stands for: the dtype of a storage's bytes."""

    def __init__(self, name: str):
        self.name, self.dtype = name, STORAGE_DTYPES[name]


class Storage:
    """A storage's elements (1-D numpy array) as read from its record."""

    def __init__(self, elements: np.ndarray):
        self.elements = elements


def rebuild_tensor(storage: Storage, offset: int, size, stride, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, copied out; every element
    it reaches checked to lie inside the storage."""
    elements = storage.elements
    size, stride = tuple(int(n) for n in size), tuple(int(n) for n in stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
        raise UnsafeCheckpointError("a tensor in this checkpoint has a malformed shape or stride.")
    if 0 in size:
        return np.zeros(size, dtype=elements.dtype)
    last = int(offset) + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= elements.size:
        raise UnsafeCheckpointError(f"a tensor in this checkpoint reaches element {last} of a storage of "
                                    f"{elements.size}: the file is damaged.")
    item = elements.itemsize
    view = np.lib.stride_tricks.as_strided(elements[offset:], size, tuple(s * item for s in stride), writeable=False)
    return np.array(view)


def rebuild_parameter(data: np.ndarray, *_ignored) -> np.ndarray:
    """torch._utils._rebuild_parameter: a Parameter is its data."""
    return data


def ordered_dict(*args) -> collections.OrderedDict:
    return collections.OrderedDict(*args)


# What a state dict's pickle may name, and what each name becomes here. Nothing else is imported or called.
ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("collections", "OrderedDict"): ordered_dict,
    ("torch", "Size"): tuple,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, Storage] = {}

    def find_class(self, module: str, name: str):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)  # a new one each time: nothing a file does to it outlives the file
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(
                f"this checkpoint's pickle names {module}.{name}, which a checkpoint of weights does not need; "
                f"it was not loaded (nothing in the file was run)."
            ) from None

    def persistent_load(self, pid):
        """('storage', storage type, key, location, numel) -> the storage, its bytes from data/<key>."""
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], StorageType)):
            raise UnsafeCheckpointError(f"this checkpoint refers to {str(pid)[:60]!r}, which is not a storage.")
        _, kind, key, _, numel = pid
        key = str(key)
        if key not in self.storages:
            self.storages[key] = Storage(self.read_storage(kind, key, int(numel)))
        return self.storages[key]

    def read_storage(self, kind: StorageType, key: str, numel: int) -> np.ndarray:
        try:
            data = self.archive.read(f"{self.prefix}/data/{key}")
        except KeyError:
            raise UnsafeCheckpointError(f"this checkpoint has no data record {key!r}: the file is damaged.") from None
        dtype = np.dtype(np.uint16 if kind.dtype == "bfloat16" else kind.dtype)
        if numel < 0 or numel * dtype.itemsize > len(data):
            raise UnsafeCheckpointError(f"a storage of this checkpoint claims {numel} elements, more than its "
                                        f"record of {len(data)} bytes holds: the file is damaged.")
        elements = np.frombuffer(data, dtype=dtype.newbyteorder("<" if self.byteorder == "little" else ">"),
                                 count=numel)
        if kind.dtype == "bfloat16":  # the upper half of a float32
            return (elements.astype(np.uint32) << 16).view(np.float32)
        return elements.astype(dtype.newbyteorder("="), copy=False)


def read_torch_bin(path: str | Path) -> object:
    """The object torch.save wrote to `path`, its tensors as numpy arrays; raises UnsafeCheckpointError (a
    pickle.UnpicklingError) for anything but weights, ValueError for a file that is not torch's zip format."""
    path = Path(path)
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as error:
        raise ValueError(f"{path} is not a torch checkpoint in torch's zip format (torch >= 1.6), or it is "
                         f"damaged ({error}); download it again.") from None
    with archive:
        pickles = [name for name in archive.namelist() if name.endswith("/data.pkl") and name.count("/") == 1]
        if len(pickles) != 1:
            raise ValueError(f"{path} is not a torch checkpoint (no single data.pkl in the archive).")
        prefix = pickles[0].split("/")[0]
        try:
            byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        except KeyError:
            byteorder = "little"  # torch before 2.1 wrote none, and wrote little-endian
        try:
            payload = archive.read(pickles[0])
            return RestrictedUnpickler(io.BytesIO(payload), archive, prefix, byteorder).load()
        except UnsafeCheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError, OverflowError,
                IndexError, KeyError, AttributeError, zlib.error) as error:
            raise ValueError(f"{path} is damaged ({type(error).__name__}: {str(error)[:80]}); download it again.") \
                from None


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A saved state dict (name -> tensor), checked to be one."""
    state = read_torch_bin(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (tensors by name).")
    return dict(state)
