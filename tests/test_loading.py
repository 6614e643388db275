"""Loading refuses what it cannot use, with one clear message: other model kinds, non-checkpoints, corrupt
files, converted folders of another format, and Hub ids that are unreachable offline."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from mlx_musicgen import MusicGen
from mlx_musicgen.loading import CheckpointError


def copy_checkpoint(tiny, tmp_path, name="copy"):
    folder = tmp_path / name
    shutil.copytree(tiny.folder, folder)
    return folder


def test_other_kinds_are_refused(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "musicgen_style"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'musicgen_style'.*supported: MusicGen.*-melody"):
        MusicGen.from_pretrained(folder)


def test_folder_without_config_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        MusicGen.from_pretrained(tmp_path)


def test_truncated_safetensors_is_reported(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        MusicGen.from_pretrained(folder)


def test_converted_folder_of_another_format_version(tiny, tmp_path):
    folder = copy_checkpoint(tiny, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["mlx_musicgen"] = {"format_version": 999}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="convert the original checkpoint again"):
        MusicGen.from_pretrained(folder)


def test_hub_id_offline_without_cache_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache.*hf download"):
        MusicGen.from_pretrained("facebook/musicgen-small")


def test_path_that_is_neither_folder_nor_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="neither an existing folder nor a Hub id"):
        MusicGen.from_pretrained(str(tmp_path / "missing" / "deeper" / "model"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="only Linux's mlx wheels need a BLAS loaded first")
@pytest.mark.parametrize("mlx_first", [True, False])
def test_importing_mlx_first_warns_of_the_slow_blas(mlx_first):
    imports = "import mlx.core; import mlx_musicgen" if mlx_first else "import mlx_musicgen; import mlx.core"
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "MLX_MUSICGEN_NO_BLAS_FIX")}
    result = subprocess.run([sys.executable, "-W", "always", "-c", imports], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert ("import mlx_musicgen first" in result.stderr) == mlx_first
