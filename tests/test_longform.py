"""Generation beyond one window, by audiocraft's extension: each window continues the last
(window - extend_stride) of the codes so far, and only new codes are kept."""

import json
import shutil

import fixtures
import numpy as np
import pytest
import reference
import torch

from mlx_musicgen import GenerationConfig, MusicGen
from mlx_musicgen.longform import Window, plan_windows, stride_frames
from mlx_musicgen.request import prepare

STRIDE = 0.02  # seconds: 20 frames of the tiny codec (1000 frames/s)


def with_window(checkpoint, tmp_path, max_length=40):
    """A copy of a checkpoint whose generation window is max_length frames instead of 1500."""
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
    assert model.window_frames == 40


def test_long_generation_has_the_length_and_carries_codes_across_seams(model):
    duration = 0.1  # 100 frames: three windows of 40 (offsets 0, 20, 40, 60, 80)
    audio, codes = model.generate(["80s pop track"], duration=duration, extend_stride=STRIDE, do_sample=False,
                                  return_tokens=True)
    assert codes.shape == (1, 4, 100)
    assert audio.shape[-1] == 100 * 32
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["80s pop track"], 100, 20))


def test_long_generation_continues_an_audio_prompt(model):
    rng = np.random.default_rng(0)
    prompt = (0.1 * rng.standard_normal(25 * 32)).astype(np.float32)  # 25 frames: more than window - stride
    audio, codes = model.generate(["lofi"], audio_prompt=prompt, duration=0.08, extend_stride=STRIDE,
                                  do_sample=False, return_tokens=True)
    prompt_codes = model.encode_audio(prompt[None, None])
    assert codes.shape[-1] == 80
    np.testing.assert_array_equal(codes[:, :, :25], prompt_codes)
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["lofi"], 80, 20, prompt_codes))


def test_long_stereo_generation(tiny_stereo, tmp_path):
    model = with_window(tiny_stereo, tmp_path)
    audio, codes = model.generate(["rock"], duration=0.07, extend_stride=STRIDE, do_sample=False,
                                  return_tokens=True)
    assert codes.shape == (1, 8, 70) and audio.shape == (1, 2, 70 * 32)
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["rock"], 70, 20))


def test_very_short_windows_make_exactly_their_frames(model):
    """A window of 1 or 2 frames (a tiny duration, or the last window of long form) is still delayed, as
    audiocraft's are (the reference leaves such short sequences undelayed, which would make more frames), and
    its frames are those a longer greedy window starts with."""
    longer = model.generate_tokens(["rock"], duration=0.01, do_sample=False)
    for frames in (1, 2):
        codes = model.generate_tokens(["rock"], duration=frames / 1000, do_sample=False)
        np.testing.assert_array_equal(codes, longer[:, :, :frames])
    codes = model.generate_tokens(["rock"], duration=0.041, extend_stride=0.039, do_sample=False)  # (39, 1, 2)
    assert codes.shape[-1] == 41
    np.testing.assert_array_equal(codes, extend_by_hand(model, ["rock"], 41, 39))


def test_stride_must_leave_context(model):
    with pytest.raises(ValueError, match="extend_stride"):
        model.generate(["rock"], duration=0.1, extend_stride=0.05, do_sample=False)  # 50 frames > window 40


def test_window_plan():
    """(offset, frames continued, frames in all) of each window: the first continues the prompt, each next one
    the last (window - stride) frames of the one before; the last is as long as what is left."""
    assert plan_windows(30, 36, 20) == [Window(0, 0, 30)]
    assert plan_windows(100, 36, 20) == [Window(0, 0, 36), Window(20, 16, 36), Window(40, 16, 36),
                                         Window(60, 16, 36), Window(80, 16, 20)]
    assert plan_windows(80, 36, 20, prompt_frames=10) == [Window(0, 10, 36), Window(20, 16, 36),
                                                          Window(40, 16, 36), Window(60, 16, 20)]
    # A prompt longer than (window - stride) is fine: only the first window continues it.
    assert plan_windows(80, 40, 20, prompt_frames=25) == [Window(0, 25, 40), Window(20, 20, 40),
                                                          Window(40, 20, 40)]
    with pytest.raises(ValueError, match="stride"):
        plan_windows(100, 36, 36)
    with pytest.raises(ValueError, match="prompt"):
        plan_windows(100, 36, 20, prompt_frames=36)


# audiocraft's MusicGen._generate_tokens for the Hub checkpoints (50 Hz, max_duration 30 s), written out: the
# total int(duration * 50) and, per lm.generate call, (offset, prompt frames, max_gen_len).
AUDIOCRAFT_PLANS = {
    (10, 10): (500, [(0, 0, 500)]),
    (10, 18): (500, [(0, 0, 500)]),
    (29.99, 10): (1499, [(0, 0, 1499)]),
    (29.99, 18): (1499, [(0, 0, 1499)]),
    (30, 10): (1500, [(0, 0, 1500)]),
    (30, 18): (1500, [(0, 0, 1500)]),
    (30.02, 10): (1501, [(0, 0, 1500), (500, 1000, 1001)]),
    (30.02, 18): (1501, [(0, 0, 1500), (900, 600, 601)]),
    (45, 10): (2250, [(0, 0, 1500), (500, 1000, 1500), (1000, 1000, 1250)]),
    (45, 18): (2250, [(0, 0, 1500), (900, 600, 1350)]),
    # At 45.3 s audiocraft's float seconds give int(25.299999999999997 * 50) = 1264 frames for the window at
    # 1000 (stride 10) or 1364 at 900 (stride 18), then windows of negative length and its own assertion: the
    # plans below are the ones its arithmetic means, done in frames.
    (45.3, 10): (2265, [(0, 0, 1500), (500, 1000, 1500), (1000, 1000, 1265)]),
    (45.3, 18): (2265, [(0, 0, 1500), (900, 600, 1365)]),
    (61, 10): (3050, [(0, 0, 1500), (500, 1000, 1500), (1000, 1000, 1500), (1500, 1000, 1500),
                      (2000, 1000, 1050)]),
    (61, 18): (3050, [(0, 0, 1500), (900, 600, 1500), (1800, 600, 1250)]),
    (120, 10): (6000, [(offset, 0 if offset == 0 else 1000, 1500) for offset in range(0, 5000, 500)]),
    (120, 18): (6000, [(0, 0, 1500), (900, 600, 1500), (1800, 600, 1500), (2700, 600, 1500), (3600, 600, 1500),
                       (4500, 600, 1500)]),
}


@pytest.mark.parametrize("duration,stride", list(AUDIOCRAFT_PLANS))
def test_window_plan_is_audiocrafts(duration, stride):
    total, plan = AUDIOCRAFT_PLANS[duration, stride]
    windows = plan_windows(total, window_frames=1500, stride=stride_frames(stride, 50.0))
    assert [(w.offset, w.known, w.span) for w in windows] == plan
    kept = sum(w.span - w.known for w in windows)
    assert kept == total  # every frame made once: each window keeps only its new frames


@pytest.mark.parametrize("seconds,frames", [(0.0399, 40), (0.0404, 40), (0.0996, 100), (0.1004, 100)])
def test_duration_rounds_to_frames_and_fills_whole_windows(model, seconds, frames):
    """round(duration * frame_rate) frames in all (audiocraft truncates); one window whenever they fit in it."""
    request = prepare(model.shape, model.encode_audio, GenerationConfig(duration=seconds, extend_stride=STRIDE),
                      ["rock"])
    assert request.total_frames == frames
    assert len(request.windows) == (1 if frames <= model.window_frames else 4)
    assert request.windows[0] == Window(0, 0, min(frames, model.window_frames))


@pytest.fixture(scope="module")
def tiny_50hz(tmp_path_factory):
    """A tiny random MusicGen whose codec makes 50 frames a second, as the Hub's: a window is 1500 frames."""
    folder = tmp_path_factory.mktemp("tiny_50hz")
    reference, processor = fixtures.build_checkpoint(folder, fixtures.Shape(upsampling_ratios=(8, 5, 4, 4),
                                                                            max_position_embeddings=2048))
    return reference, processor, MusicGen.from_pretrained(folder)


def test_a_full_30s_window_and_its_extension_match_the_reference(tiny_50hz):
    """Greedy with guidance, 45 s: the first window is the 1500 frames transformers makes in 1503 steps (it
    counts the start column and the delays in max_length; we count frames, as audiocraft does), and the second
    window is transformers continuing the first window's last 600 frames to 1350."""
    reference_model, processor, model = tiny_50hz
    texts = ["90s rock song with loud guitars"]
    codes = model.generate_tokens(texts, duration=45.0, extend_stride=18.0, do_sample=False, guidance_scale=3.0)
    assert codes.shape == (1, 4, 2250)

    inputs = processor(text=texts, padding=True, return_tensors="pt")
    first = reference.generate(reference_model, inputs=inputs, do_sample=False, guidance_scale=3.0,
                               max_new_tokens=1503)[1]
    assert first.shape == (1, 4, 1500)
    np.testing.assert_array_equal(codes[:, :, :1500], first)

    start = np.full((4, 1), 2048)
    context = np.concatenate([start, first[0, :, 900:]], axis=1)  # (codebooks, 1 + 600): start column, codes
    second = reference.generate(reference_model, inputs={**inputs, "decoder_input_ids": torch.from_numpy(context)},
                                do_sample=False, guidance_scale=3.0, max_new_tokens=1350 - 600 + 3)[1]
    assert second.shape == (1, 4, 1350)
    np.testing.assert_array_equal(codes[:, :, 900:], second)
