"""Generation beyond one window, by audiocraft's extension: each window continues the last
(window - extend_stride) of the codes so far, and only new codes are kept."""

import json
import shutil

import numpy as np
import pytest

from mlx_musicgen import MusicGen
from mlx_musicgen.longform import Window, plan_windows

STRIDE = 0.02  # seconds: 20 frames of the tiny codec (1000 frames/s)


def with_window(checkpoint, tmp_path, max_length=40):
    """A copy of a checkpoint whose generation window is max_length positions (36 frames) instead of 1500."""
    folder = tmp_path / "short-window"
    shutil.copytree(checkpoint.folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    config["max_length"] = max_length
    (folder / "generation_config.json").write_text(json.dumps(config))
    return MusicGen.from_pretrained(folder)


@pytest.fixture(scope="module")
def model(tiny, tmp_path_factory):
    return with_window(tiny, tmp_path_factory.mktemp("long"))


def extend_by_hand(model, texts, total, stride_frames, prompt=None):
    """The extension spelled out with single windows: what generate must do at every seam."""
    window = model.window_frames
    codes = prompt
    kept = [] if prompt is None else [prompt]
    offset = 0
    while offset + (0 if codes is None else codes.shape[-1]) < total:
        known = 0 if codes is None else codes.shape[-1]
        span = min(total - offset, window)
        out = model.generate_tokens(texts, prompt_codes=codes, total_frames=span, do_sample=False)
        kept.append(out[:, :, known:])
        codes = out[:, :, stride_frames:]
        offset += stride_frames
    return np.concatenate(kept, axis=2)


def test_window_comes_from_the_checkpoint(model):
    assert model.window_frames == 40 - 4


def test_long_generation_has_the_length_and_carries_codes_across_seams(model):
    duration = 0.1  # 100 frames: nearly three windows of 36
    audio, codes = model.generate(["80s pop track"], duration=duration, extend_stride=STRIDE, do_sample=False,
                                  return_tokens=True)
    assert codes.shape == (1, 4, 100)
    assert audio.shape[-1] == 100 * 32
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["80s pop track"], 100, 20))


def test_long_generation_continues_an_audio_prompt(model):
    rng = np.random.default_rng(0)
    prompt = (0.1 * rng.standard_normal(10 * 32)).astype(np.float32)  # 10 frames
    audio, codes = model.generate(["lofi"], audio_prompt=prompt, duration=0.08, extend_stride=STRIDE,
                                  do_sample=False, return_tokens=True)
    prompt_codes = model.encode_audio(prompt[None, None])
    assert codes.shape[-1] == 80
    np.testing.assert_array_equal(codes[:, :, :10], prompt_codes)
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["lofi"], 80, 20, prompt_codes))


def test_long_stereo_generation(tiny_stereo, tmp_path):
    model = with_window(tiny_stereo, tmp_path)
    audio, codes = model.generate(["rock"], duration=0.07, extend_stride=STRIDE, do_sample=False,
                                  return_tokens=True)
    assert codes.shape == (1, 8, 70) and audio.shape == (1, 2, 70 * 32)
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["rock"], 70, 20))


def test_stride_must_leave_context(model):
    with pytest.raises(ValueError, match="extend_stride"):
        model.generate(["rock"], duration=0.1, extend_stride=0.05, do_sample=False)  # 50 frames > window 36


def test_window_plan():
    """(offset, frames continued, frames in all) of each window: the first continues the prompt, each next one
    the last (window - stride) frames of the one before; the last is as long as what is left."""
    assert plan_windows(30, 36, 20) == [Window(0, 0, 30)]
    assert plan_windows(100, 36, 20) == [Window(0, 0, 36), Window(20, 16, 36), Window(40, 16, 36),
                                         Window(60, 16, 36), Window(80, 16, 20)]
    assert plan_windows(80, 36, 20, prompt_frames=10) == [Window(0, 10, 36), Window(20, 16, 36),
                                                          Window(40, 16, 36), Window(60, 16, 20)]
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 36, 36)
