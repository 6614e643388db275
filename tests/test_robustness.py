"""Bad input, offline use and interruptions: every refusal is one line `error: ...` on stderr (a traceback only
with --debug), a non-zero exit code, and nothing half-written left behind.

The CLI cases run in subprocesses, several at a time; argument checks fail before the model loads (~1 s each).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import fixtures
from mlx_musicgen import MusicGen, atomic
from slow import runner, slow_steps
from mlx_musicgen.audio import write_audio
from mlx_musicgen.loading import CheckpointError
from mlx_musicgen.limits import MAX_DURATION
from mlx_musicgen.settings import check_sampling
from mlx_musicgen.sampling import NonFiniteLogitsError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 2048  # the tiny model's codebook size
OLD = b"old audio, keep me"


# ---- running the CLIs ----


def env(tmp: Path) -> dict:
    """Never the network, never the user's cache."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp / "hf-home"), "PYTHONUNBUFFERED": "1"}


def run(script: str, args: list, tmp: Path) -> subprocess.CompletedProcess:
    """Run a CLI; its output is decoded by hand, keeping the carriage returns that text mode turns into newlines."""
    result = subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True,
                            cwd=ROOT, env=env(tmp), timeout=120)
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def read_log(log: Path) -> str:
    return log.read_bytes().decode(errors="replace")


def visible_lines(stderr: str) -> list[str]:
    """What a terminal shows: each line's text after its last carriage return (a bar erased by '\\r' is gone)."""
    return [line.split("\r")[-1] for line in stderr.split("\n") if line.split("\r")[-1].strip()]


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = visible_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert re.search(pattern, lines[0]), (pattern, lines[0])


def listing(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# ---- building bad inputs ----


def copy_checkpoint(tiny: Path, dst: Path) -> Path:
    shutil.copytree(tiny, dst)
    return dst


def edit_config(folder: Path, change: Callable[[dict], None]) -> Path:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def edit_generation_config(folder: Path, **values) -> Path:
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, **values}))
    return folder


def truncated(tiny: Path, dst: Path) -> Path:
    folder = copy_checkpoint(tiny, dst)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    return folder


def garbage_weights(tiny: Path, dst: Path) -> Path:
    folder = copy_checkpoint(tiny, dst)
    (folder / "model.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    return folder


def poisoned(tiny: Path, dst: Path) -> Path:
    """One NaN in the first codebook's output head: every step's logits hold a NaN."""
    folder = copy_checkpoint(tiny, dst)
    weights = load_file(folder / "model.safetensors")
    head = weights["decoder.lm_heads.0.weight"].copy()
    head[7, 3] = np.nan
    weights["decoder.lm_heads.0.weight"] = head
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def without_tokenizer(tiny: Path, dst: Path) -> Path:
    folder = copy_checkpoint(tiny, dst)
    (folder / "spiece.model").unlink()
    (folder / "tokenizer.json").unlink()
    return folder


def foreign_tokenizer(tiny: Path, dst: Path) -> Path:
    """The tokenizer of a model with a larger vocabulary (191 pieces) than the tiny text encoder's 120."""
    folder = copy_checkpoint(tiny, dst)
    (folder / "tokenizer.json").unlink()
    fixtures.build_tokenizer(folder, extra_pieces=100)
    return folder


def rewrite_header(change: Callable[[dict, int], None]):
    """A checkpoint whose safetensors header `change(header, data_bytes)` edits: a header that lies."""

    def build(tiny: Path, dst: Path) -> Path:
        folder = copy_checkpoint(tiny, dst)
        raw = (folder / "model.safetensors").read_bytes()
        length = int.from_bytes(raw[:8], "little")
        header, data = json.loads(raw[8 : 8 + length]), raw[8 + length :]
        change(header, len(data))
        text = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
        return folder

    return build


def header_length(claimed: Callable[[int], int]):
    def build(tiny: Path, dst: Path) -> Path:
        folder = copy_checkpoint(tiny, dst)
        raw = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(claimed(len(raw)).to_bytes(8, "little") + raw[8:])
        return folder

    return build


def raw_header(text: bytes):
    """A checkpoint whose safetensors header is `text`, its data kept."""

    def build(tiny: Path, dst: Path) -> Path:
        folder = copy_checkpoint(tiny, dst)
        raw = (folder / "model.safetensors").read_bytes()
        data = raw[8 + int.from_bytes(raw[:8], "little") :]
        (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data)
        return folder

    return build


def first_tensor(header: dict) -> dict:
    return header[next(name for name in sorted(header) if name != "__metadata__")]


def overlap(header: dict, size: int) -> None:
    """The second tensor in the data starts 4 bytes inside the first."""
    tensors = sorted((info for name, info in header.items() if name != "__metadata__"),
                     key=lambda info: info["data_offsets"][0])
    tensors[1]["data_offsets"] = [offset - 4 for offset in tensors[1]["data_offsets"]]


def hostile(change: Callable[[dict], None]):
    """A tiny checkpoint whose config.json `change` edits."""
    return lambda t, w: edit_config(copy_checkpoint(t, w / "m"), change)


def wav(path: Path, samples: np.ndarray, rate: int = 32000) -> Path:
    sf.write(path, samples.astype(np.float32), rate, subtype="FLOAT")
    return path


def tone(seconds: float, rate: int = 32000, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return amplitude * np.sin(2 * np.pi * 440 * t)


def unwritable_folder(work: Path) -> Path:
    """A folder nobody may write in. Root ignores permission bits, so root gets /sys (kernel-owned)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = work / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder


# ---- the table ----


@dataclass
class Case:
    id: str
    # (tiny checkpoint folder, this case's own folder) -> the generate.py arguments that differ from the defaults
    args: Callable[[Path, Path], list]
    message: str  # what the one error line must say (a regex); for ok cases, a line that must be shown
    script: str = "generate.py"
    ok: bool = False  # a case that succeeds, with a notice or a warning


def gen(*extra, model=None, output="out.wav"):
    """generate.py arguments: a tiny model, a very short clip into the case's folder, plus `extra`."""

    def build(tiny: Path, work: Path) -> list:
        chosen = model(tiny, work) if callable(model) else (model or tiny)
        resolved = [e(tiny, work) if callable(e) else e for e in extra]
        out = output(tiny, work) if callable(output) else work / output
        return ["--model", chosen, "--duration", 0.03, "--seed", 0, "--output", out, *resolved]

    return build


def conv(src, out="mlx", *extra):
    def build(tiny: Path, work: Path) -> list:
        return ["--hf-path", src(tiny, work) if callable(src) else src, "--mlx-path", work / out, *extra]

    return build


DURATION = "duration must be a number of seconds above 0 and at most 3600"
CASES = [
    # model: missing, offline, not a checkpoint, other kinds, corrupt, other converter versions
    Case("model-hub-id-offline-not-cached", gen(model=lambda t, w: "facebook/musicgen-small"),
         r"not in the local Hugging Face cache .*hf download facebook/musicgen-small.* or pass a local folder"),
    Case("model-neither-folder-nor-id", gen(model=lambda t, w: w / "no" / "such" / "model"),
         r"neither an existing folder nor a Hub id"),
    Case("model-invalid-hub-id", gen(model=lambda t, w: "bad id/with spaces"), r"neither an existing folder nor a valid Hub id"),
    Case("model-folder-without-config", gen(model=lambda t, w: w), r"no config.json: it is not a MusicGen checkpoint"),
    Case("model-config-not-json", gen(model=lambda t, w: (w / "config.json").write_text("{oops") and w),
         r"config.json is not valid JSON"),
    Case("model-other-architecture",
         gen(model=lambda t, w: edit_config(copy_checkpoint(t, w / "m"), lambda c: c.update(model_type="bert"))),
         r"holds a 'bert' model; supported: MusicGen"),
    Case("model-melody-without-its-preprocessor",
         gen(model=lambda t, w: edit_config(copy_checkpoint(t, w / "m"),
                                            lambda c: c.update(model_type="musicgen_melody"))),
         r"m has no preprocessor_config.json, which holds a melody model's chroma settings"),
    Case("model-truncated-safetensors", gen(model=lambda t, w: truncated(t, w / "m")),
         r"model.safetensors is truncated or corrupt .*download or convert it again"),
    Case("model-garbage-safetensors", gen(model=lambda t, w: garbage_weights(t, w / "m")),
         r"model.safetensors is truncated or corrupt"),
    Case("model-other-converter-version",
         gen(model=lambda t, w: edit_config(copy_checkpoint(t, w / "m"),
                                            lambda c: c.update(mlx_musicgen={"format_version": 999}))),
         r"converted by another version of mlx-musicgen \(format 999, this one reads 2\): convert the original"),
    Case("model-nan-weights", gen(model=lambda t, w: poisoned(t, w / "m")),
         r"the model produced NaN/inf logits.*try float32"),
    # tokenizer: missing (transformers would make a default one that maps every word to <unk>), or another's
    Case("model-without-tokenizer", gen(model=lambda t, w: without_tokenizer(t, w / "m")),
         r"m has no tokenizer \(spiece.model or tokenizer.json\): download the model again"),
    Case("model-tokenizer-of-another-model", gen(model=lambda t, w: foreign_tokenizer(t, w / "m")),
         r"the tokenizer in .*m has 191 tokens but the text encoder only 120: the tokenizer files belong to another"),
    # hostile or broken configs: refused at once, before anything is built from them
    Case("config-absurd-decoder-layers",
         gen(model=hostile(lambda c: c["decoder"].update(num_hidden_layers=10**6))),
         r"decoder.num_hidden_layers is 1000000, more than the \d+ tensors of the weights could fill"),
    Case("config-absurd-text-layers", gen(model=hostile(lambda c: c["text_encoder"].update(num_layers=10**6))),
         r"text_encoder.num_layers is 1000000, more than the \d+ tensors"),
    Case("config-absurd-codebooks", gen(model=hostile(lambda c: c["decoder"].update(num_codebooks=10**6))),
         r"decoder.num_codebooks is 1000000, more than"),
    Case("config-absurd-width", gen(model=hostile(lambda c: c["decoder"].update(hidden_size=10**7))),
         r"does not match the MusicGen architecture of its config: .*is \(2049, 64\) in the weights, "
         r"\(2049, 10000000\) by the config"),
    Case("config-absurd-vocabulary", gen(model=hostile(lambda c: c["decoder"].update(vocab_size=10**9))),
         r"wrong shapes .*\(2049, 64\) in the weights, \(1000000001, 64\) by the config"),
    Case("config-absurd-text-width", gen(model=hostile(lambda c: c["text_encoder"].update(d_ff=2**31 - 1))),
         r"wrong shapes"),
    Case("config-size-beyond-mlx", gen(model=hostile(lambda c: c["decoder"].update(ffn_dim=2**40))),
         r"decoder.ffn_dim must be a whole number from 1 to 2\*\*31 - 1, got 1099511627776"),
    Case("config-absurd-codec-ratios",
         gen(model=hostile(lambda c: c["audio_encoder"].update(upsampling_ratios=[2] * 60))),
         r"audio_encoder's quantizers is \d+, more than the \d+ tensors"),
    Case("config-zero-size", gen(model=hostile(lambda c: c["decoder"].update(num_codebooks=0))),
         r"decoder.num_codebooks must be a whole number from 1 to 2\*\*31 - 1, got 0: the config is broken"),
    Case("config-negative-size", gen(model=hostile(lambda c: c["decoder"].update(num_attention_heads=-2))),
         r"decoder.num_attention_heads must be a whole number .*got -2"),
    Case("config-size-as-text", gen(model=hostile(lambda c: c["text_encoder"].update(d_model="48"))),
         r"text_encoder.d_model must be a whole number .*got '48'"),
    Case("config-fractional-size", gen(model=hostile(lambda c: c["decoder"].update(ffn_dim=128.5))),
         r"decoder.ffn_dim must be a whole number .*got 128.5"),
    Case("config-boolean-size", gen(model=hostile(lambda c: c["decoder"].update(num_hidden_layers=True))),
         r"decoder.num_hidden_layers must be a whole number .*got True"),
    Case("config-nan-epsilon", gen(model=hostile(lambda c: c["text_encoder"].update(layer_norm_epsilon=math.nan))),
         r"text_encoder.layer_norm_epsilon must be a finite number above 0, got nan"),
    Case("config-ratios-not-a-list", gen(model=hostile(lambda c: c["audio_encoder"].update(upsampling_ratios=4))),
         r"config.json is broken \('int' object is not iterable\)"),
    Case("config-zero-ratio", gen(model=hostile(lambda c: c["audio_encoder"].update(upsampling_ratios=[4, 0, 2]))),
         r"audio_encoder.upsampling_ratios must be a list of 1 to 64 items, each a whole number"),
    Case("config-heads-do-not-divide", gen(model=hostile(lambda c: c["decoder"].update(num_attention_heads=3))),
         r"the decoder's 3 heads do not divide its width 64"),
    Case("config-three-channels", gen(model=hostile(lambda c: c["decoder"].update(audio_channels=3))),
         r"4 codebooks for 3 audio channels"),
    Case("config-unknown-activation", gen(model=hostile(lambda c: c["decoder"].update(activation_function="swish"))),
         r"Unsupported decoder activation 'swish'"),
    Case("config-text-buckets", gen(model=hostile(lambda c: c["text_encoder"].update(relative_attention_max_distance=8))),
         r"T5 relative attention needs at least 4 buckets and a max distance beyond a quarter of them"),
    Case("config-codec-without-quantizers",
         gen(model=hostile(lambda c: c["audio_encoder"].update(target_bandwidths=[0.001]))),
         r"EnCodec with codebooks of 2048 entries and target bandwidth 0.001 kbps has no quantizer"),
    Case("config-absurd-window", gen(model=lambda t, w: edit_generation_config(copy_checkpoint(t, w / "m"),
                                                                                max_length=10**9)),
         r"generation_config.json: max_length must be from 4 to 3600000 \(an hour at 1000 Hz\), got 1000000000"),
    Case("config-infinite-window", gen(model=lambda t, w: (copy_checkpoint(t, w / "m") / "generation_config.json")
                                       .write_text('{"max_length": 1e999}') and w / "m"),
         r"generation_config.json: max_length must be from 4 to 3600000 .*got inf"),
    Case("config-generation-not-json", gen(model=lambda t, w: (copy_checkpoint(t, w / "m") / "generation_config.json")
                                           .write_text("{oops") and w / "m"),
         r"generation_config.json is not valid JSON"),
    Case("config-epsilon-beyond-a-double",
         gen(model=hostile(lambda c: c["text_encoder"].update(layer_norm_epsilon=10**400))),
         r"text_encoder.layer_norm_epsilon must be a finite number above 0"),
    Case("config-missing-section", gen(model=hostile(lambda c: c.pop("decoder"))),
         r"lacks the decoder section\(s\) of a MusicGen config"),
    Case("config-section-not-a-table", gen(model=hostile(lambda c: c.update(audio_encoder=[1, 2]))),
         r"lacks the audio_encoder section"),
    # safetensors headers that lie
    Case("weights-header-length-past-the-end", gen(model=lambda t, w: header_length(lambda n: n + 100)(t, w / "m")),
         r"model.safetensors is truncated or corrupt \(its header claims \d+ bytes, the file holds \d+\)"),
    Case("weights-header-length-absurd", gen(model=lambda t, w: header_length(lambda n: 2**62)(t, w / "m")),
         r"its header claims 4611686018427387904 bytes"),
    Case("weights-offsets-past-the-data",
         gen(model=lambda t, w: rewrite_header(
             lambda h, n: first_tensor(h).update(data_offsets=[n - 4, n + 4 * 2**20]))(t, w / "m")),
         r"truncated or corrupt \(tensor '.*' claims bytes \d+\.\.\d+ for"),
    Case("weights-shape-larger-than-its-bytes",
         gen(model=lambda t, w: rewrite_header(lambda h, n: first_tensor(h).update(shape=[2**20, 2**20]))(t, w / "m")),
         r"claims bytes .* for F32\[1048576, 1048576\]"),
    Case("weights-tensors-overlap", gen(model=lambda t, w: rewrite_header(overlap)(t, w / "m")),
         r"truncated or corrupt \(tensors overlap\)"),
    Case("weights-dtype-not-a-name",
         gen(model=lambda t, w: rewrite_header(lambda h, n: first_tensor(h).update(dtype=["F32"]))(t, w / "m")),
         r"truncated or corrupt \(tensor '.*' has a broken entry\)"),
    Case("weights-header-nested-beyond-parsing",
         gen(model=lambda t, w: raw_header(b"[" * 100000 + b"]" * 100000)(t, w / "m")),
         r"truncated or corrupt \(its header is not JSON"),
    Case("weights-without-tensors", gen(model=lambda t, w: rewrite_header(lambda h, n: h.clear())(t, w / "m")),
         r"model.safetensors holds no tensors: download or convert the model again"),
    # command-line checks fail before the model loads (here: a model that does not exist)
    Case("extend-stride-zero", gen("--extend-stride", 0, model=lambda t, w: w / "no-model"),
         r"extend_stride must be a number of seconds above 0 \(18 is typical for MusicGen, 2 for AudioGen\), got 0.0"),
    Case("extend-stride-past-the-window",
         gen("--extend-stride", 30, "--duration", 45, model=lambda t, w: w / "no-model"),
         r"extend_stride must be below the window \(30 s\) for music longer than it, got 30.0"),
    Case("prompts-file-not-utf8",
         gen("--prompts-file", lambda t, w: (w / "p.txt").write_bytes(b"rock\n\xff\xfe lofi\n") and w / "p.txt",
             model=lambda t, w: w / "no-model"),
         r"prompts file .*p.txt is not UTF-8 text \(byte 0xff at offset 5\): save it as UTF-8"),
    # duration
    Case("duration-zero", gen("--duration", 0), DURATION),
    Case("duration-negative", gen("--duration", -5), DURATION),
    Case("duration-nan", gen("--duration", "nan"), DURATION + r".*got nan"),
    Case("duration-inf", gen("--duration", "inf"), DURATION),
    Case("duration-absurd", gen("--duration", MAX_DURATION + 1), DURATION),
    # sampling
    Case("top-k-negative", gen("--top-k", -1), r"top_k must be between 0 \(off\) and the vocabulary size, got -1"),
    Case("top-k-above-vocabulary", gen("--top-k", VOCAB + 1),
         rf"top_k must be between 0 \(off\) and the vocabulary size {VOCAB}, got {VOCAB + 1}"),
    Case("top-p-negative", gen("--top-p", -0.1), r"top_p must be between 0 \(off\) and 1, got -0.1"),
    Case("top-p-above-one", gen("--top-p", 1.5), r"top_p must be between 0 \(off\) and 1"),
    Case("top-p-nan", gen("--top-p", "nan"), r"top_p must be between 0 \(off\) and 1, got nan"),
    Case("temperature-negative", gen("--temperature", -1), r"temperature must be a finite number >= 0"),
    Case("temperature-inf", gen("--temperature", "inf"), r"temperature must be a finite number >= 0"),
    Case("guidance-negative", gen("--guidance-scale", -1), r"guidance_scale must be between 0 and 100"),
    Case("guidance-absurd", gen("--guidance-scale", 1e6), r"guidance_scale must be between 0 and 100"),
    # text
    Case("text-whitespace", gen("--text", "  \t "), r"^note: the text is empty: generating unconditional music\.$",
         ok=True),  # "" takes the same path
    Case("text-too-long", gen("--text", " ".join(["rock guitar"] * 400)),
         r"^warning: text 1 is longer than the text encoder's limit of 512 tokens: only its first 512", ok=True),
    # audio prompt
    Case("prompt-missing", gen("--audio-prompt", lambda t, w: w / "nothing.wav"), r"nothing.wav does not exist"),
    Case("prompt-is-a-folder", gen("--audio-prompt", lambda t, w: w), r"is not a file"),
    Case("prompt-unreadable", gen("--audio-prompt", lambda t, w: (w / "p.wav").write_text("not audio") and w / "p.wav"),
         r"cannot read .*p.wav as audio"),
    Case("prompt-empty", gen("--audio-prompt", lambda t, w: wav(w / "p.wav", np.zeros(0))), r"p.wav is empty"),
    Case("prompt-silent", gen("--audio-prompt", lambda t, w: wav(w / "p.wav", np.zeros(3200))),
         r"p.wav is silent \(its peak is below -100 dBFS\)"),
    Case("prompt-nearly-silent", gen("--audio-prompt", lambda t, w: wav(w / "p.wav", tone(0.1, amplitude=1e-6))),
         r"p.wav is silent"),
    Case("prompt-rate-too-low", gen("--audio-prompt", lambda t, w: wav(w / "p.wav", tone(0.1, 4000), 4000)),
         r"sample rate of 4000 Hz; supported are whole numbers from 8000 to 384000"),
    Case("prompt-rate-too-high", gen("--audio-prompt", lambda t, w: wav(w / "p.wav", tone(0.01, 400000), 400000)),
         r"sample rate of 400000 Hz"),
    Case("prompt-longer-than-window",  # the tiny model's window: 1500 positions at 1000 frames/s
         gen("--audio-prompt", lambda t, w: wav(w / "p.wav", tone(2.0)), "--duration", 3),
         r"p.wav is 2.00 s long, but the model's window is 1.50 s .*trim the prompt"),
    # melody (checked before the model loads; the tiny model has no melody conditioning)
    Case("melody-missing", gen("--melody", lambda t, w: w / "tune.wav"), r"melody .*tune.wav does not exist"),
    Case("melody-unreadable", gen("--melody", lambda t, w: (w / "m.wav").write_text("not audio") and w / "m.wav"),
         r"cannot read .*m.wav as audio"),
    Case("melody-silent", gen("--melody", lambda t, w: wav(w / "m.wav", np.zeros(3200))),
         r"melody .*m.wav is silent \(its peak is below -100 dBFS\)"),
    Case("melody-for-a-model-without-melody", gen("--melody", lambda t, w: wav(w / "m.wav", tone(0.1))),
         r"this model has no melody conditioning: use a melody checkpoint such as facebook/musicgen-melody"),
    # output
    Case("output-folder-missing", gen(output="missing/out.wav"), r"the folder .*missing does not exist: create it"),
    Case("output-parent-is-a-file", gen(output=lambda t, w: (w / "f").write_text("x") and w / "f" / "out.wav"),
         r"/f is not a folder"),
    Case("output-folder-unwritable", gen(output=lambda t, w: unwritable_folder(w) / "out.wav"),
         r"cannot write in the folder"),
    Case("output-exists", gen(output=lambda t, w: (w / "out.wav").write_bytes(OLD) and w / "out.wav"),
         r"out.wav exists: pass --overwrite"),
    Case("output-sidecar-exists", gen(output=lambda t, w: (w / "out.json").write_text("{}") and w / "out.flac"),
         r"out.json exists \(the record of another take\): pass --overwrite"),  # out.wav's, beside a new out.flac
    Case("output-wrong-extension", gen(output="out.mp3"), r"out.mp3: the output must end in .wav or .flac"),
    # convert.py
    Case("convert-into-non-empty-folder",
         conv(lambda t, w: t, "mlx", ), r"mlx exists and is not empty: choose another folder or pass --overwrite",
         script="convert.py"),
    Case("convert-truncated-safetensors", conv(lambda t, w: truncated(t, w / "m")),
         r"model.safetensors is truncated or corrupt", script="convert.py"),
    Case("convert-into-a-file's-child", conv(lambda t, w: t, "f/mlx"), r"/f is not a folder", script="convert.py"),
    Case("convert-without-tokenizer", conv(lambda t, w: without_tokenizer(t, w / "m")),
         r"m has no tokenizer \(spiece.model or tokenizer.json\)", script="convert.py"),
    Case("convert-absurd-config", conv(hostile(lambda c: c["decoder"].update(num_hidden_layers=10**6))),
         r"decoder.num_hidden_layers is 1000000, more than", script="convert.py"),
    Case("convert-lying-header", conv(lambda t, w: header_length(lambda n: n + 100)(t, w / "m")),
         r"its header claims", script="convert.py"),
    Case("convert-group-size", conv(lambda t, w: w / "no-model", "mlx", "-q", "--q-group-size", 48),
         r"q_group_size must be 32, 64 or 128, got 48", script="convert.py"),
]
SETUP = {  # what must exist before a case runs, beyond what its arguments create
    "convert-into-non-empty-folder": lambda w: (w / "mlx").mkdir() or (w / "mlx" / "keep.txt").write_text("mine"),
    "convert-into-a-file's-child": lambda w: (w / "f").write_text("x"),
}


@dataclass
class Outcome:
    result: subprocess.CompletedProcess
    work: Path
    before: set[str] = field(default_factory=set)


@pytest.fixture(scope="module")
def outcomes(tiny, tmp_path_factory) -> dict[str, Outcome]:
    base = tmp_path_factory.mktemp("robustness")

    def one(case: Case) -> tuple[str, Outcome]:
        work = base / re.sub(r"\W", "_", case.id)
        work.mkdir()
        if case.id in SETUP:
            SETUP[case.id](work)
        args = case.args(tiny.folder, work)
        before = listing(work)
        return case.id, Outcome(run(case.script, args, base), work, before)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(pool.map(one, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_cli_case(case: Case, outcomes):
    outcome = outcomes[case.id]
    if case.ok:
        assert outcome.result.returncode == 0, outcome.result.stderr
        assert any(re.search(case.message, line) for line in visible_lines(outcome.result.stderr)), \
            outcome.result.stderr
        assert (outcome.work / "out.wav").is_file()
        return
    assert_one_line_error(outcome.result, case.message)
    assert listing(outcome.work) == outcome.before  # nothing written, nothing half-written
    if case.id == "output-exists":
        assert (outcome.work / "out.wav").read_bytes() == OLD


def test_debug_shows_the_traceback(tiny, tmp_path):
    result = run("generate.py", ["--model", tiny.folder, "--duration", "nan", "--output", tmp_path / "o.wav",
                                 "--debug"], tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "ValueError: duration" in result.stderr
    assert listing(tmp_path) == set()


def test_unwritable_folder_by_permissions(tiny, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits (the /sys case of the table covers an unwritable folder)")
    folder = unwritable_folder(tmp_path)
    try:
        result = run("generate.py", ["--model", tiny.folder, "--output", folder / "o.wav"], tmp_path)
        assert_one_line_error(result, r"cannot write in the folder .*read-only \(Permission denied\)")
        assert listing(folder) == set()
    finally:
        folder.chmod(0o755)


# ---- interrupts: the old file or the complete new one, never a temporary left by a live writer ----


def start(script: str, args: list, tmp: Path, log: Path, code: str | None = None) -> subprocess.Popen:
    """Start a CLI with stderr in `log`; `code` (Python) runs first, e.g. to slow a write down."""
    if code is None:
        command = [sys.executable, str(ROOT / script), *map(str, args)]
    else:
        command = [sys.executable, "-c", runner(code, script=str(ROOT / script)), *map(str, args)]
    # Ctrl-C as in a terminal: a shell without job control starts background commands with SIGINT ignored, and
    # a child that inherits that ignores it too (as it should)
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log.open("w"), cwd=ROOT, env=env(tmp),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def wait_for(log: Path, text: str, process: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text not in read_log(log):
        assert process.poll() is None, read_log(log)
        assert time.monotonic() < deadline, read_log(log)
        time.sleep(0.05)


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


SIGNALS = [(signal.SIGINT, 130, "error: interrupted"), (signal.SIGTERM, 143, "error: terminated"),
           (signal.SIGKILL, -signal.SIGKILL, None)]


def test_killed_while_generating_keeps_the_old_file(tiny, tmp_path):
    """Ctrl-C, kill and kill -9 during generation (slowed to seconds of work): the old file is untouched."""
    runs = []
    for sig, code, message in SIGNALS:
        folder = tmp_path / sig.name
        folder.mkdir()
        (folder / "clip.wav").write_bytes(OLD)
        log = tmp_path / f"{sig.name}.log"
        process = start("generate.py", ["--model", tiny.folder, "--duration", 1.4, "--text", "rock",
                                        "--output", folder / "clip.wav", "--overwrite"], tmp_path, log,
                        code=slow_steps(0.1))
        runs.append((sig, code, message, folder, log, process))
    for *_, log, process in runs:  # all mid-generation (a run takes seconds), then all interrupted at once
        wait_for(log, "generating:", process)
    time.sleep(0.3)
    for sig, *_, process in runs:
        process.send_signal(sig)
    for sig, code, message, folder, log, process in runs:
        assert process.wait(timeout=30) == code, read_log(log)
        assert "100%" not in read_log(log)  # it was interrupted, not finished
        assert (folder / "clip.wav").read_bytes() == OLD
        assert temporaries(folder) == []
        if message:
            assert visible_lines(read_log(log)) == [message], read_log(log)


SLOW_AUDIO_WRITE = """
import sys, time, soundfile
real_write = soundfile.SoundFile.write
def slow_write(self, data):
    real_write(self, data[: len(data) // 2])  # half the samples reach the file, then the writer stalls
    self.flush()
    print("MID-WRITE", file=sys.stderr, flush=True)
    time.sleep(120)
soundfile.SoundFile.write = slow_write
"""


def test_killed_while_writing_the_audio(tiny, tmp_path):
    """Killed in the middle of writing the file: Ctrl-C removes the temporary; kill -9 cannot, and the next
    write to the same path removes what the dead process left."""
    runs = []
    for sig, code, _ in SIGNALS[::2]:  # Ctrl-C and kill -9 (kill takes Ctrl-C's path, tested above)
        folder = tmp_path / sig.name
        folder.mkdir()
        (folder / "clip.wav").write_bytes(OLD)
        log = tmp_path / f"{sig.name}.log"
        process = start("generate.py", ["--model", tiny.folder, "--duration", 0.02, "--quiet",
                                        "--output", folder / "clip.wav", "--overwrite"], tmp_path, log,
                        code=SLOW_AUDIO_WRITE)
        runs.append((sig, code, folder, log, process))
    for sig, code, folder, log, process in runs:
        wait_for(log, "MID-WRITE", process)
        process.send_signal(sig)
        assert process.wait(timeout=30) == code, read_log(log)
        assert (folder / "clip.wav").read_bytes() == OLD
        if sig == signal.SIGKILL:
            stale = temporaries(folder)
            assert len(stale) == 1 and re.fullmatch(rf"\.clip\.wav\.{process.pid}\.\w+\.part", stale[0]), stale
            write_audio(folder / "clip.wav", np.zeros((1, 320), np.float32), 32000)  # the next write cleans up
            assert sf.info(folder / "clip.wav").frames == 320
        assert temporaries(folder) == []


SLOW_SAVE = """
import sys, time, mlx_musicgen, mlx.core as mx
def slow_save(path, arrays, *args, **kwargs):
    open(path, "wb").write(b"half a safetensors file")
    print("MID-WRITE", file=sys.stderr, flush=True)
    time.sleep(120)
mx.save_safetensors = slow_save
"""


def test_convert_killed_mid_write_keeps_the_old_folder(tiny, tmp_path):
    runs = []
    for sig, code, _ in SIGNALS[::2]:  # Ctrl-C and kill -9
        folder = tmp_path / sig.name
        (folder / "mlx").mkdir(parents=True)
        (folder / "mlx" / "old.txt").write_text("the previous conversion")
        log = tmp_path / f"{sig.name}.log"
        process = start("convert.py", ["--hf-path", tiny.folder, "--mlx-path", folder / "mlx", "--overwrite"],
                        tmp_path, log, code=SLOW_SAVE)
        runs.append((sig, code, folder, log, process))
    for sig, code, folder, log, process in runs:
        wait_for(log, "MID-WRITE", process)
        process.send_signal(sig)
        assert process.wait(timeout=30) == code, read_log(log)
        assert listing(folder / "mlx") == {"old.txt"}
        if sig == signal.SIGKILL:
            assert len(temporaries(folder)) == 1  # the staging folder of the dead process
            result = run("convert.py", ["--hf-path", tiny.folder, "--mlx-path", folder / "mlx", "--overwrite"],
                         tmp_path)
            assert result.returncode == 0, result.stderr
            assert (folder / "mlx" / "model.safetensors").is_file() and not (folder / "mlx" / "old.txt").exists()
        assert temporaries(folder) == []


def test_a_swap_killed_between_its_renames_is_undone(tmp_path):
    """kill -9 after the old folder was moved aside and before the new one took its place: put it back."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    aside = tmp_path / f".mlx.{dead.pid}.abc123.old"
    (aside / "mlx").mkdir(parents=True)
    (aside / "mlx" / "old.txt").write_text("the previous conversion")
    staging = tmp_path / f".mlx.{dead.pid}.def456.part"
    staging.mkdir()
    live = tmp_path / f".mlx.{os.getpid()}.ghi789.part"  # a writer still running: left alone
    live.mkdir()
    atomic.clean_stale(tmp_path / "mlx")
    assert (tmp_path / "mlx" / "old.txt").read_text() == "the previous conversion"
    assert temporaries(tmp_path) == [live.name]


# ---- a full disk, and the modes of what is written ----


@pytest.fixture
def small_disk(tmp_path):
    """mount(kib) -> a folder on a tmpfs of that size (needs root and mount; skipped otherwise)."""
    mounted = []

    def mount(kib: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(folder)],
                              capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.decode().strip()})")
        mounted.append(folder)
        return folder

    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], capture_output=True)


NO_SPACE = r"^error: no space left on the device holding .*disk\d"


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, small_disk):
    disk = small_disk(64)  # 0.6 s of float samples is 77 KB
    result = run("generate.py", ["--model", tiny.folder, "--duration", 0.6, "--bits", "float", "--quiet",
                                 "--output", disk / "clip.wav"], tmp_path)
    assert_one_line_error(result, NO_SPACE + r" \(0.0 MiB free\): free some space or write elsewhere")
    assert listing(disk) == set()


def test_convert_to_a_full_disk_is_one_line_and_leaves_nothing(tiny, tmp_path, small_disk):
    from mlx.utils import tree_flatten

    from mlx_musicgen.loading import build_model

    needed = sum(v.nbytes for _, v in tree_flatten(build_model(tiny.folder)[0].parameters()))
    too_small = small_disk(needed // 2048)  # refused before writing
    result = run("convert.py", ["--hf-path", tiny.folder, "--mlx-path", too_small / "mlx"], tmp_path)
    assert_one_line_error(result, NO_SPACE + r": the model needs 0.01 GiB, 0.00 GiB are free; free some space")
    assert listing(too_small) == set()
    nearly = small_disk(needed // 1024 + 64)  # room for the weights, not for the tokenizer after them
    result = run("convert.py", ["--hf-path", tiny.folder, "--mlx-path", nearly / "mlx"], tmp_path)
    assert_one_line_error(result, NO_SPACE + r" \(0.0 MiB free\)")
    assert listing(nearly) == set()


def test_only_a_full_disk_is_called_one(tmp_path):
    """An OSError is judged by its errno alone (a permission error on a nearly full disk stays itself); errors
    of libraries that do not say (soundfile's AssertionError) count when the disk was left with under 1 MiB."""
    import errno

    assert atomic.out_of_space(PermissionError(errno.EACCES, "denied", "f"), tmp_path) is None
    assert atomic.out_of_space(AssertionError(), tmp_path) is None  # this disk has room
    full = atomic.out_of_space(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert full.errno == errno.ENOSPC and "no space left on the device holding" in full.strerror
    assert atomic.out_of_space(KeyboardInterrupt(), tmp_path) is None


def run_with_umask(mask: int, script: str, args: list, tmp: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, env=env(tmp), timeout=120, preexec_fn=lambda: os.umask(mask))


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_outputs_get_the_mode_of_a_normally_created_file(tiny, tmp_path, mask):
    """Audio, its sidecar and a converted folder are readable as the umask allows (0644 / 0755 under 022),
    not only by their owner as the temporaries they were written as (0600 / 0700)."""
    result = run_with_umask(mask, "generate.py", ["--model", tiny.folder, "--duration", 0.02, "--quiet",
                                                  "--output", tmp_path / "clip.flac"], tmp_path)
    assert result.returncode == 0, result.stderr
    for name in ("clip.flac", "clip.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
    result = run_with_umask(mask, "convert.py", ["--hf-path", tiny.folder, "--mlx-path", tmp_path / "mlx"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "mlx").stat().st_mode & 0o777 == 0o777 & ~mask
    for file in (tmp_path / "mlx").iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~mask, file.name


# ---- the API: the same checks, as exceptions and warnings ----


@pytest.fixture(scope="module")
def model(tiny):
    return MusicGen.from_pretrained(tiny.folder)


def valid(guidance_scale, top_k, top_p, temperature) -> bool:
    return (0 <= guidance_scale <= 100 and 0 <= top_k <= VOCAB and 0 <= top_p <= 1
            and math.isfinite(temperature) and temperature >= 0)


def interesting_floats(low: float, high: float):
    """Mostly the valid range, with its edges, the values just outside, NaN, infinities and the huge."""
    return st.one_of(
        st.floats(low, high),
        st.sampled_from([low, high, math.nextafter(low, -math.inf), math.nextafter(high, math.inf), -1.0,
                         1e-300, 1e-40, 1e300, -1e300, math.nan, math.inf, -math.inf]),
    )


@settings(max_examples=50, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(
    guidance_scale=interesting_floats(0.0, 100.0),
    top_k=st.one_of(st.integers(-5, VOCAB + 5), st.sampled_from([0, 1, VOCAB, -1, VOCAB + 1, 10**12, -(10**12)])),
    top_p=interesting_floats(0.0, 1.0),
    temperature=interesting_floats(0.0, 1e6),
)
def test_sampling_parameters_property(model, guidance_scale, top_k, top_p, temperature):
    """Valid settings always generate finite audio; invalid ones always raise ValueError, before any work."""
    kwargs = dict(guidance_scale=guidance_scale, top_k=top_k, top_p=top_p, temperature=temperature)
    if valid(**kwargs):
        check_sampling(**kwargs, vocab_size=VOCAB)
        audio, codes = model.generate(["lofi"], max_new_tokens=6, seed=1, return_tokens=True, **kwargs)
        assert np.isfinite(audio).all() and codes.min() >= 0 and codes.max() < VOCAB
    else:
        with pytest.raises(ValueError):
            check_sampling(**kwargs, vocab_size=VOCAB)
        with pytest.raises(ValueError):
            model.generate(["lofi"], max_new_tokens=6, seed=1, **kwargs)


def test_tiny_temperatures_are_greedy_not_nan(model):
    greedy = model.generate(["jazz"], max_new_tokens=8, do_sample=False, return_tokens=True)[1]
    for temperature in (1e-30, 1e-40, 1e-300):
        codes = model.generate(["jazz"], max_new_tokens=8, temperature=temperature, seed=2, return_tokens=True)[1]
        np.testing.assert_array_equal(codes, greedy)


def test_empty_texts_are_unconditional(model):
    kwargs = dict(max_new_tokens=8, do_sample=False, return_tokens=True)
    unconditional = model.generate(None, num_samples=2, **kwargs)[1]
    with pytest.warns(UserWarning, match="all texts are empty: generating unconditional music"):
        blank = model.generate(["", "  \n"], **kwargs)[1]
    np.testing.assert_array_equal(blank, unconditional)
    with pytest.warns(UserWarning, match=r"text\(s\) 1 are empty: generated unconditionally"):
        mixed = model.generate(["", "techno kick"], **kwargs)[1]
    np.testing.assert_array_equal(mixed[0], unconditional[0])
    np.testing.assert_array_equal(mixed[1], model.generate(["techno kick"], **kwargs)[1][0])
    with pytest.raises(ValueError, match="texts is an empty list"):
        model.generate([], **kwargs)


def test_long_text_is_truncated_with_a_warning(model):
    long = " ".join(["warm bass"] * 400)
    with pytest.warns(UserWarning, match="longer than the text encoder's limit of 512 tokens"):
        states, mask = model.encode_text([long, "rock"])
    assert mask.shape == (2, 512) and int(mask[0].sum()) == 512
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.encode_text(["rock", "a short text"])  # no warning when nothing is cut


@pytest.mark.parametrize("prompt,rate,message", [
    (np.zeros(0, np.float32), 32000, "is empty"),
    (np.zeros(3200, np.float32), 32000, "is silent"),
    (np.full(3200, np.nan, np.float32), 32000, "NaN or infinite"),
    (tone(0.1, 7999), 7999, "sample rate of 7999 Hz"),
    (tone(0.1, 44100), 44100.5, "sample rate of 44100.5 Hz"),
    (tone(1.6), 32000, "window is 1.50 s"),
])
def test_bad_prompt_arrays_are_refused(model, prompt, rate, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        model.generate(None, audio_prompt=prompt, audio_prompt_sr=rate, max_new_tokens=4)


@pytest.mark.parametrize("duration", [0, -1.0, math.nan, math.inf, MAX_DURATION * 1.001])
def test_bad_durations_are_refused_by_the_api(model, duration):
    with pytest.raises(ValueError, match="at most 3600"):
        model.generate(["rock"], duration=duration)


def test_nan_weights_are_reported_not_written_as_noise(tiny, tmp_path):
    model = MusicGen.from_pretrained(poisoned(tiny.folder, tmp_path / "m"))
    with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits"):
        model.generate(["rock"], max_new_tokens=6)
    with pytest.raises(FloatingPointError, match="NaN or infinite samples"):
        write_audio(tmp_path / "x.wav", np.full((1, 8), np.nan, np.float32), 32000)
    assert not (tmp_path / "x.wav").exists() and temporaries(tmp_path) == []


def test_nan_weights_are_reported_by_generate_tokens(tiny, tmp_path):
    """Codes in, codes out refuses them too; in long form before the next window continues them."""
    model = MusicGen.from_pretrained(poisoned(tiny.folder, tmp_path / "m"))
    with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits"):
        model.generate_tokens(["rock"], max_new_tokens=6)
    done = []
    with pytest.raises(NonFiniteLogitsError, match="NaN/inf logits"):
        model.generate_tokens(["rock"], total_frames=model.window_frames + 10, extend_stride=0.5,
                              progress=lambda made, total: done.append(made))
    assert max(done) == model.window_frames  # the first window ran; the second did not start from its codes


def test_missing_hub_repo_says_so(monkeypatch, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    def not_found(*args, **kwargs):
        error = RepositoryNotFoundError.__new__(RepositoryNotFoundError)
        Exception.__init__(error, "404 Client Error")
        raise error

    monkeypatch.setattr(huggingface_hub, "snapshot_download", not_found)
    with pytest.raises(CheckpointError, match="No model 'facebook/musicgen-nope' on the Hugging Face Hub"):
        MusicGen.from_pretrained("facebook/musicgen-nope")
