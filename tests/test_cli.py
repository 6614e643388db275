"""generate.py end to end on a tiny checkpoint: a readable WAV of the requested length."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]


def run_generate(*args):
    return subprocess.run([sys.executable, str(ROOT / "generate.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT)


def test_cli_writes_a_wav_of_the_requested_length(tiny, tmp_path):
    out = tmp_path / "clip.wav"
    frames = 40
    hop = 32  # the tiny codec: 32000 Hz at 1000 frames/s
    result = run_generate("--model", tiny.folder, "--text", "80s pop track", "--duration", frames / 1000,
                          "--seed", 1, "--output", out)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 32000 and audio.shape == (frames * hop,)
    assert np.abs(audio).max() > 0.5  # peak-normalised to -1 dBFS, not silence
    assert "s audio" in result.stderr  # the progress bar counts seconds of audio


def test_cli_refuses_to_overwrite(tiny, tmp_path):
    out = tmp_path / "clip.wav"
    out.write_bytes(b"keep")
    result = run_generate("--model", tiny.folder, "--duration", 0.01, "--output", out)
    assert result.returncode == 2 and "--overwrite" in result.stderr
    assert out.read_bytes() == b"keep"
