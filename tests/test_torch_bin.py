"""mlx_musicgen.torch_bin: torch's .bin files read without torch and without running anything from them. What
torch.save writes comes back exactly; a pickle naming anything a checkpoint does not need is refused before it
runs (a side effect proves it), and damaged archives are refused in one line."""

import builtins
import collections
import io
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from mlx_musicgen import torch_bin
from mlx_musicgen.checkpoint_files import CheckpointError, load_torch_bin


def saved(tmp_path: Path, obj, name: str = "state.bin") -> Path:
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_what_torch_saves_comes_back_exactly(tmp_path):
    """audiocraft's layout (a state dict, its YAML config and scalars) with every dtype a checkpoint uses, views
    into shared storages (offsets, transposes), a Parameter and an empty tensor."""
    base = torch.randn(6, 5)
    state = collections.OrderedDict(
        weight=torch.randn(3, 4), half=torch.randn(3).half(), bf16=torch.randn(4).bfloat16(),
        double=torch.randn(2).double(), long=torch.arange(5), int=torch.arange(3, dtype=torch.int32),
        byte=torch.arange(4, dtype=torch.uint8), flags=torch.tensor([True, False]), transposed=base.t(),
        window=base[2:4, 1:3], parameter=torch.nn.Parameter(torch.ones(2)), empty=torch.zeros(0, 3),
        scalar=torch.tensor(2.5))
    state._metadata = {"": {"version": 1}}  # what nn.Module.state_dict attaches
    path = saved(tmp_path, {"best_state": state, "xp.cfg": "lm_model: transformer_lm\n", "version": "1.3.0",
                            "exported": True, "shape": torch.Size([2, 3])})
    got = torch_bin.read_torch_bin(path)
    assert {k: got[k] for k in ("xp.cfg", "version", "exported", "shape")} == {
        "xp.cfg": "lm_model: transformer_lm\n", "version": "1.3.0", "exported": True, "shape": (2, 3)}
    assert list(got["best_state"]) == list(state)
    for name, tensor in state.items():
        expected = tensor.detach().float() if tensor.dtype == torch.bfloat16 else tensor.detach()
        np.testing.assert_array_equal(got["best_state"][name], expected.numpy(), err_msg=name)
        assert got["best_state"][name].dtype == expected.numpy().dtype, name
    assert got["best_state"]["weight"].flags.writeable  # an array of its own, not a view of the archive


class Runs:
    """Pickles to a call of `function(*args)`: what a malicious checkpoint carries."""

    def __init__(self, function, *args):
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


def archive_with(tmp_path: Path, payload: bytes, records: dict[str, bytes] | None = None) -> Path:
    """A zip laid out as torch.save lays one out, with `payload` as its data.pkl."""
    path = tmp_path / "crafted.bin"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("crafted/data.pkl", payload)
        archive.writestr("crafted/byteorder", "little")
        for name, data in (records or {}).items():
            archive.writestr(f"crafted/data/{name}", data)
    return path


@pytest.mark.parametrize("attack", ["os.system", "builtins.eval", "builtins.exec", "other class"])
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(attack, tmp_path):
    marker = tmp_path / "ran"
    payloads = {
        "os.system": Runs(os.system, f"touch {marker}"),
        "builtins.eval": Runs(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.exec": Runs(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "other class": Runs(collections.Counter, "abc"),
    }
    named = {"os.system": os.system.__module__ + ".system", "builtins.eval": "builtins.eval",
             "builtins.exec": "builtins.exec", "other class": "collections.Counter"}[attack]
    payload = pickle.dumps({"best_state": {"w": payloads[attack]}}, protocol=2)
    for path in (archive_with(tmp_path, payload), saved(tmp_path, {"w": payloads[attack]}, "saved.bin")):
        with pytest.raises(torch_bin.UnsafeCheckpointError, match=named.replace(".", r"\.")) as error:
            torch_bin.read_torch_bin(path)
        assert "\n" not in str(error.value)
        assert not marker.exists()
    with pytest.raises(CheckpointError, match=named.replace(".", r"\.")):
        load_torch_bin(archive_with(tmp_path, payload))
    assert not marker.exists()


def test_damaged_archives_are_refused_in_one_line(tmp_path):
    good = saved(tmp_path, {"w": torch.randn(64, 64)})
    data = good.read_bytes()
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(data[: len(data) // 2])
    not_zip = tmp_path / "legacy.bin"
    not_zip.write_bytes(pickle.dumps({"w": 1}))  # torch's pre-1.6 format is a bare pickle stream
    for path in (truncated, not_zip):
        with pytest.raises(ValueError, match="download it again") as error:
            torch_bin.read_torch_bin(path)
        assert "\n" not in str(error.value)

    def storage_pickle(numel: int, offset: int, size: tuple, stride: tuple) -> bytes:
        """The pickle torch writes for one float32 tensor, with the storage's and the view's numbers given."""
        buffer = io.BytesIO()

        class Writer(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", numel) if obj is STORAGE else None

        Writer(buffer, protocol=2).dump({"w": Runs(torch._utils._rebuild_tensor_v2, STORAGE, offset, size, stride,
                                                   False, collections.OrderedDict())})
        return buffer.getvalue()

    record = np.arange(10, dtype=np.float32).tobytes()
    past_record = archive_with(tmp_path, storage_pickle(11, 0, (11,), (1,)), {"0": record})
    with pytest.raises(torch_bin.UnsafeCheckpointError, match="claims 11 elements"):
        torch_bin.read_torch_bin(past_record)
    past_storage = archive_with(tmp_path, storage_pickle(10, 4, (2, 4), (4, 1)), {"0": record})
    with pytest.raises(torch_bin.UnsafeCheckpointError, match="reaches element 11 of a storage of 10"):
        torch_bin.read_torch_bin(past_storage)
    missing = archive_with(tmp_path, storage_pickle(10, 0, (10,), (1,)))
    with pytest.raises(torch_bin.UnsafeCheckpointError, match="no record"):
        torch_bin.read_torch_bin(missing)
    inside = archive_with(tmp_path, storage_pickle(10, 2, (2, 4), (4, 1)), {"0": record})
    np.testing.assert_array_equal(torch_bin.read_torch_bin(inside)["w"], np.arange(2, 10).reshape(2, 4))


STORAGE = object()  # stands for a storage in the crafted pickles


def test_a_pickle_cannot_change_what_it_is_given(tmp_path):
    """pickle's BUILD sets attributes of whatever is on its stack: refused on the storages, storage types, tensors
    and callables this reader hands out (a storage swapped for a 2-D array, or a storage type given another
    dtype, would read past the record's buffer)."""
    def unicode(text: str) -> bytes:
        return pickle.BINUNICODE + len(text).to_bytes(4, "little") + text.encode()

    storage = (pickle.MARK + unicode("storage") + b"ctorch\nFloatStorage\n" + unicode("0") + unicode("cpu")
               + pickle.BININT1 + bytes([10]) + pickle.TUPLE + pickle.BINPERSID)
    rebuild = b"ctorch._utils\n_rebuild_tensor_v2\n"
    for target in (storage, b"ctorch\nFloatStorage\n", rebuild, b"ctorch._utils\n_rebuild_parameter\n"):
        payload = (pickle.PROTO + b"\x02" + target + pickle.EMPTY_DICT + unicode("elements") + pickle.BININT1
                   + b"\x01" + pickle.SETITEM + pickle.BUILD + pickle.STOP)
        path = archive_with(tmp_path, payload, {"0": np.zeros(10, np.float32).tobytes()})
        with pytest.raises(torch_bin.UnsafeCheckpointError, match="modifies an object"):
            torch_bin.read_torch_bin(path)


def test_a_small_file_cannot_make_huge_tensors(tmp_path):
    """Expanded views (stride 0), many copies of one storage, and compressed records are refused."""
    record = np.arange(10, dtype=np.float32).tobytes()

    def tensors(*views) -> bytes:
        buffer = io.BytesIO()

        class Writer(pickle.Pickler):
            def persistent_id(self, obj):
                return ("storage", torch.FloatStorage, "0", "cpu", 10) if obj is STORAGE else None

        Writer(buffer, protocol=2).dump([Runs(torch._utils._rebuild_tensor_v2, STORAGE, 0, size, stride, False,
                                              collections.OrderedDict()) for size, stride in views])
        return buffer.getvalue()

    with pytest.raises(torch_bin.UnsafeCheckpointError, match="100000 elements from a storage of 10"):
        torch_bin.read_torch_bin(archive_with(tmp_path, tensors(((10000, 10), (0, 1))), {"0": record}))
    many = archive_with(tmp_path, tensors(*[((10,), (1,))] * 30000), {"0": record})
    with pytest.raises(torch_bin.UnsafeCheckpointError, match="far more than its data"):
        torch_bin.read_torch_bin(many)
    assert len(torch_bin.read_torch_bin(archive_with(tmp_path, tensors(((10,), (1,)), ((5,), (2,))),
                                                     {"0": record}))) == 2  # tied weights: views of one storage
    compressed = tmp_path / "compressed.bin"
    with zipfile.ZipFile(compressed, "w") as archive:
        archive.writestr("crafted/data.pkl", tensors(((10,), (1,))))
        archive.writestr("crafted/data/0", bytes(10 << 20), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(torch_bin.UnsafeCheckpointError, match="not stored as torch stores it"):
        torch_bin.read_torch_bin(compressed)
