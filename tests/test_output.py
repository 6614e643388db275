"""What generate.py writes: several clips at once, metadata that remakes a clip, normalisation levels measured,
and --stream's growing file valid at every moment."""

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from mlx_musicgen.loudness import integrated_loudness
from slow import runner, slow_steps

ROOT = Path(__file__).resolve().parents[1]


def command(tiny, *args):
    return [sys.executable, str(ROOT / "generate.py"), "--model", str(tiny.folder), "--quiet", *map(str, args)]


def run(tiny, *args):
    result = subprocess.run(command(tiny, *args), capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    return result


def test_several_texts_write_one_file_and_sidecar_each(tiny, tmp_path):
    run(tiny, "--text", "80s pop", "--text", "lofi", "--duration", 0.03, "--seed", 1, "--output", tmp_path / "take.wav")
    for i, text in ((1, "80s pop"), (2, "lofi")):
        audio, rate = sf.read(tmp_path / f"take-{i}.wav")
        assert rate == 32000 and audio.shape == (30 * 32,)
        record = json.loads((tmp_path / f"take-{i}.json").read_text())
        assert record["text"] == text and record["seed"] == 1 and record["batch"] == ["80s pop", "lofi"]


def test_prompts_file_in_batches(tiny, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("jazz trumpet\n\nambient pads\nrock\n")  # blank lines are skipped
    run(tiny, "--prompts-file", prompts, "--batch-size", 2, "--duration", 0.02, "--output", tmp_path / "p.flac")
    assert sorted(p.name for p in tmp_path.glob("p-*.flac")) == ["p-1.flac", "p-2.flac", "p-3.flac"]
    assert json.loads((tmp_path / "p-3.json").read_text())["text"] == "rock"


def test_metadata_round_trip_remakes_the_clip(tiny, tmp_path):
    first = tmp_path / "first.wav"
    run(tiny, "--text", "epic strings", "--duration", 0.04, "--top-k", 50, "--temperature", 0.9,
        "--output", first)  # no --seed: one is drawn and recorded
    sidecar = json.loads(first.with_suffix(".json").read_text())
    embedded = json.loads(sf.SoundFile(first).comment)
    assert embedded == sidecar
    assert sidecar["text"] == "epic strings" and sidecar["model"] == str(tiny.folder)
    assert (sidecar["top_k"], sidecar["temperature"], sidecar["duration"]) == (50, 0.9, 0.04)
    again = tmp_path / "again.wav"
    run(tiny, "--text", sidecar["text"], "--duration", sidecar["duration"], "--top-k", sidecar["top_k"],
        "--temperature", sidecar["temperature"], "--seed", sidecar["seed"], "--output", again)
    np.testing.assert_array_equal(sf.read(first)[0], sf.read(again)[0])


@pytest.mark.parametrize("strategy", ["peak", "loudness", "none"])
def test_normalisation_levels(tiny, tmp_path, strategy):
    out = tmp_path / f"{strategy}.wav"
    run(tiny, "--text", "techno kick", "--duration", 0.6, "--seed", 4, "--bits", "float", "--normalize", strategy,
        "--output", out)
    audio, rate = sf.read(out, dtype="float32")
    if strategy == "peak":
        assert np.abs(audio).max() == pytest.approx(10 ** (-1 / 20), rel=1e-5)
    elif strategy == "loudness":
        assert integrated_loudness(audio.T, rate) == pytest.approx(-14.0, abs=0.1)
    else:
        raw = sf.read(tmp_path / "none.wav", dtype="float32")[0]
        peak = sf.read(tmp_path / "peak.wav", dtype="float32")[0] if (tmp_path / "peak.wav").exists() else None
        assert peak is None or not np.allclose(raw, peak)
        assert 0 < np.abs(raw).max() <= 1


def test_stream_keeps_a_valid_growing_wav(tiny, tmp_path):
    """Looked at while it grows (each step slowed, so that the growth is seen on any machine)."""
    out = tmp_path / "live.wav"
    args = command(tiny, "--text", "house", "--duration", 1.2, "--chunk", 0.05, "--stream", "--normalize", "none",
                   "--seed", 2, "--output", out)[2:]
    process = subprocess.Popen([sys.executable, "-c", runner(slow_steps(0.02), script=str(ROOT / "generate.py")),
                                *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    sizes = []
    while process.poll() is None:
        if out.exists() and out.stat().st_size > 44:
            sizes.append(sf.info(out).frames)  # readable whenever it is looked at, with a consistent header
        time.sleep(0.02)
    assert process.wait() == 0, process.stderr.read()
    assert len(set(sizes)) >= 3, sizes  # it was seen growing
    assert sizes == sorted(sizes) and max(sizes) <= 1200 * 32
    assert sf.info(out).frames == 1200 * 32


def test_play_without_a_player_warns_and_still_writes(tiny, tmp_path):
    pytest.importorskip("sounddevice", reason="sounddevice installed: nothing to check") if False else None
    try:
        import sounddevice  # noqa: F401
        pytest.skip("sounddevice is installed here; the fallback path is what this test checks")
    except (ImportError, OSError):
        pass
    result = run(tiny, "--text", "rock", "--duration", 0.02, "--play", "--output", tmp_path / "p.wav")
    assert "warning: --play needs the sounddevice package" in result.stderr
    assert (tmp_path / "p.wav").exists()
