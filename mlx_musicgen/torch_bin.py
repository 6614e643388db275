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
import math
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


class Sealed:
    """What a pickle gets from this module (the allowed callables, storages and tensors): no attribute of it can
    be set or replaced by the pickle's BUILD opcode, whose only hook, __setstate__, refuses."""

    __slots__ = ()

    def __setstate__(self, state):
        raise UnsafeCheckpointError("this checkpoint's pickle modifies an object it was given, which a checkpoint "
                                    "of weights does not do; it was not loaded.")


class StorageType(Sealed):
    """What the pickle's `torch.<Name>Storage` stands for: the type of a storage's elements."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class Storage(Sealed):
    """A storage's elements (1-D numpy array) as read from its record."""

    __slots__ = ("elements",)

    def __init__(self, elements: np.ndarray):
        self.elements = elements


class Tensor(Sealed):
    """A rebuilt tensor, its own copy (unwrapped to the numpy array once the whole pickle is read)."""

    __slots__ = ("array",)

    def __init__(self, array: np.ndarray):
        self.array = array


class Call(Sealed):
    """One of the functions a pickle may call."""

    __slots__ = ("function",)

    def __init__(self, function):
        self.function = function

    def __call__(self, *args):
        return self.function(*args)


class RestrictedUnpickler(pickle.Unpickler):
    """pickle.Unpickler for torch's data.pkl: names resolve only to ALLOWED (and the storage types), storages
    only to the archive's records, and the tensors made add up to at most MAX_EXPANSION x the records' bytes."""

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder = archive, prefix, byteorder
        self.storages: dict[str, Storage] = {}
        self.budget = MAX_EXPANSION * sum(info.file_size for info in archive.infolist()
                                          if info.filename.startswith(f"{prefix}/data/")) + (1 << 20)

    def find_class(self, module: str, name: str):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "torch" and name in STORAGE_DTYPES:
            return StorageType(name)
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return Call(self.rebuild_tensor)
        try:
            return Call(ALLOWED[(module, name)])
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
        data = read_record(self.archive, f"{self.prefix}/data/{key}")
        stored = STORAGE_DTYPES[kind.name]
        dtype = np.dtype(np.uint16 if stored == "bfloat16" else stored)
        if numel < 0 or numel * dtype.itemsize > len(data):
            raise UnsafeCheckpointError(f"a storage of this checkpoint claims {numel} elements, more than its "
                                        f"record of {len(data)} bytes holds: the file is damaged.")
        elements = np.frombuffer(data, dtype=dtype.newbyteorder("<" if self.byteorder == "little" else ">"),
                                 count=numel)
        if stored == "bfloat16":  # the upper half of a float32
            return (elements.astype(np.uint32) << 16).view(np.float32)
        return elements.astype(dtype.newbyteorder("="), copy=False)

    def rebuild_tensor(self, storage: Storage, offset: int, size, stride, *_ignored) -> Tensor:
        """torch._utils._rebuild_tensor_v2: the view (offset, size, stride) of a storage, copied out. Every element
        it reaches lies inside the storage, it has no more elements than the storage (no expanded views), and all
        the tensors made stay within the budget."""
        if not isinstance(storage, Storage):
            raise UnsafeCheckpointError("a tensor in this checkpoint is built on something other than a storage.")
        elements = storage.elements
        size, stride, offset = tuple(int(n) for n in size), tuple(int(n) for n in stride), int(offset)
        if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride) or offset < 0:
            raise UnsafeCheckpointError("a tensor in this checkpoint has a malformed shape or stride.")
        count = math.prod(size)
        if count > elements.size:
            raise UnsafeCheckpointError(f"a tensor in this checkpoint has {count} elements from a storage of "
                                        f"{elements.size}: it is not a checkpoint of weights.")
        self.budget -= count * elements.itemsize
        if self.budget < 0:
            raise UnsafeCheckpointError("this checkpoint's tensors add up to far more than its data: it is not a "
                                        "checkpoint of weights.")
        if count == 0:
            return Tensor(np.zeros(size, dtype=elements.dtype))
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= elements.size:
            raise UnsafeCheckpointError(f"a tensor in this checkpoint reaches element {last} of a storage of "
                                        f"{elements.size}: the file is damaged.")
        item = elements.itemsize
        view = np.lib.stride_tricks.as_strided(elements[offset:], size, tuple(s * item for s in stride),
                                               writeable=False)
        return Tensor(np.array(view))


def rebuild_parameter(data: Tensor, *_ignored) -> Tensor:
    """torch._utils._rebuild_parameter: a Parameter is its data."""
    if not isinstance(data, Tensor):
        raise UnsafeCheckpointError("a parameter in this checkpoint holds something other than a tensor.")
    return data


def ordered_dict(*args) -> collections.OrderedDict:
    """collections.OrderedDict, which state dicts are (a fresh one: BUILD may set its attributes, as torch's
    `_metadata`)."""
    return collections.OrderedDict(*args)


# What a state dict's pickle may name besides the storage types and _rebuild_tensor_v2 (the unpickler's own),
# and what each name becomes here. Nothing else is imported or called.
ALLOWED = {
    ("torch._utils", "_rebuild_parameter"): rebuild_parameter,
    ("collections", "OrderedDict"): ordered_dict,
    ("torch", "Size"): tuple,
}
MAX_EXPANSION = 4  # tensors may view a storage more than once (tied weights), within 4x the data's bytes


def read_record(archive: zipfile.ZipFile, name: str) -> bytes:
    """A record of the archive as torch writes them: stored, not compressed (so no larger than the file)."""
    try:
        info = archive.getinfo(name)
    except KeyError:
        raise UnsafeCheckpointError(f"this checkpoint has no record {name!r}: the file is damaged.") from None
    if info.compress_type != zipfile.ZIP_STORED or info.file_size > Path(archive.filename).stat().st_size:
        raise UnsafeCheckpointError(f"the record {name!r} of this checkpoint is not stored as torch stores it.")
    return archive.read(info)


def unwrap(obj):
    """The unpickled object with its tensors as numpy arrays (through dicts, lists and tuples)."""
    if isinstance(obj, Tensor):
        return obj.array
    if isinstance(obj, dict):
        return type(obj)((key, unwrap(value)) for key, value in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(unwrap(value) for value in obj)
    return obj


def read_torch_bin(path: str | Path) -> object:
    """The object torch.save wrote to `path`, its tensors as numpy arrays (bfloat16 as float32); raises
    UnsafeCheckpointError (a pickle.UnpicklingError) for anything but weights, ValueError for a file that is not
    torch's zip format or is damaged."""
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
            # torch before 2.1 wrote no byteorder, and wrote little-endian
            byteorder = "little"
            if f"{prefix}/byteorder" in archive.namelist():
                byteorder = read_record(archive, f"{prefix}/byteorder").decode("ascii").strip()
            if byteorder not in ("little", "big"):
                raise ValueError(f"unknown byte order {byteorder[:20]!r}")
            payload = read_record(archive, pickles[0])
            return unwrap(RestrictedUnpickler(io.BytesIO(payload), archive, prefix, byteorder).load())
        except UnsafeCheckpointError:
            raise
        except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, ValueError, TypeError, OverflowError,
                IndexError, KeyError, AttributeError, UnicodeDecodeError, RecursionError, zlib.error) as error:
            raise ValueError(f"{path} is damaged ({type(error).__name__}: {str(error)[:80]}); download it again.") \
                from None


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """A saved state dict (name -> tensor), checked to be one."""
    state = read_torch_bin(path)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise ValueError(f"{path} does not hold a state dict (tensors by name).")
    return dict(state)
