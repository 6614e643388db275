"""Audio-prompt continuation against the reference given the same prompt through MusicgenProcessor."""

import numpy as np
import pytest
import soundfile as sf

import reference
from mlx_musicgen import MusicGen
from mlx_musicgen.audio import resample

AUDIO_RTOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny):
    return MusicGen.from_pretrained(tiny.folder)


def music(seconds: float, seed: int, rate: int = 32000) -> np.ndarray:
    """A few decaying tones with a little noise: audio-like, and free of exact ties for the quantizer."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    tones = sum(np.sin(2 * np.pi * f * t + rng.uniform(0, 6)) for f in rng.uniform(100, 3000, size=3))
    return (0.2 * tones * np.exp(-t) + 0.01 * rng.standard_normal(t.size)).astype(np.float32)


def reference_continuation(tiny, texts, prompts, **kwargs):
    inputs = tiny.processor(audio=prompts, sampling_rate=32000, text=texts, padding=True, return_tensors="pt")
    audio, codes = reference.generate(tiny.reference, inputs=inputs, **kwargs)
    return tiny.processor.batch_decode(audio, padding_mask=inputs["padding_mask"].numpy()), codes


def test_greedy_continuation_matches_reference(model, tiny):
    prompt = music(0.05, seed=1)  # 1600 samples = 50 frames of the tiny codec
    expected_audio, expected_codes = reference_continuation(
        tiny, ["90s rock song with loud guitars"], [prompt], do_sample=False, guidance_scale=3.0, max_new_tokens=12
    )
    audio, codes = model.generate(["90s rock song with loud guitars"], audio_prompt=prompt, audio_prompt_sr=32000,
                                  max_new_tokens=12, do_sample=False, return_tokens=True)
    np.testing.assert_array_equal(codes, expected_codes)
    assert codes.shape[-1] == 50 + 12 + 1 - 4
    assert reference.relative_error(audio[0], expected_audio[0]) < AUDIO_RTOL


def test_padded_batch_of_prompts_matches_reference(model, tiny):
    prompts = [music(0.04, seed=2), music(0.025, seed=3)]
    texts = ["lofi slow bpm", "epic orchestral strings"]
    expected_audio, expected_codes = reference_continuation(
        tiny, texts, prompts, do_sample=False, guidance_scale=3.0, max_new_tokens=10
    )
    audio, codes = model.generate(texts, audio_prompt=prompts, max_new_tokens=10, do_sample=False,
                                  return_tokens=True)
    np.testing.assert_array_equal(codes, expected_codes)
    assert isinstance(audio, list) and len(audio) == 2
    for ours, theirs in zip(audio, expected_audio):
        assert ours.shape == theirs.shape
        assert reference.relative_error(ours, theirs) < AUDIO_RTOL
    assert audio[0].shape[-1] - audio[1].shape[-1] == 0.015 * 32000  # each trimmed of its own padding


def test_prompt_from_a_44k_file_is_resampled(model, tmp_path):
    rate = 44100
    t = np.arange(int(0.05 * rate)) / rate
    tone = (0.5 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    sf.write(tmp_path / "prompt.wav", np.stack([tone, tone], axis=1), rate)  # stereo file, mono model: mixed down
    from_file = model.generate(None, audio_prompt=tmp_path / "prompt.wav", max_new_tokens=6, do_sample=False,
                               return_tokens=True)[1]
    from_array = model.generate(None, audio_prompt=resample(tone, rate, 32000), max_new_tokens=6,
                                do_sample=False, return_tokens=True)[1]
    np.testing.assert_array_equal(from_file, from_array)


@pytest.mark.parametrize("frequency", [440.0, 1000.0, 5000.0])
def test_resampling_keeps_the_frequency(frequency):
    rate = 44100
    t = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * frequency * t).astype(np.float32), rate, 32000)
    assert out.shape == (32000,)
    spectrum = np.abs(np.fft.rfft(out * np.hanning(out.size)))
    assert np.argmax(spectrum) == pytest.approx(frequency, abs=1)  # 1 Hz bins
    expected = np.sin(2 * np.pi * frequency * np.arange(32000) / 32000)
    assert np.abs(out - expected)[200:-200].max() < 1e-5  # band-limited, not interpolated (soxr VHQ: 2e-7)


@pytest.mark.parametrize("frequency", [16000.0, 16100.0, 18000.0, 22000.0])
def test_resampling_removes_what_the_new_rate_cannot_hold(frequency):
    rate = 44100
    t = np.arange(rate) / rate
    out = resample(np.sin(2 * np.pi * frequency * t).astype(np.float32), rate, 32000)  # at or above 16 kHz
    assert np.sqrt(np.mean(out[200:-200] ** 2)) < 1e-6  # no alias folded down: below -120 dB (soxr VHQ: -155)


@pytest.mark.parametrize("orig, target", [(44100, 32000), (48000, 32000), (16000, 32000), (22050, 32000),
                                          (32000, 44100)])
def test_resampling_is_flat_to_0_9_nyquist_and_rounds_the_length_up(orig, target):
    """A stereo pair in quadrature at 0.9 of the lower Nyquist: sin^2 + cos^2 = 1 in every sample, so the
    channels' summed power is the filter's gain there, whatever the window (soxr VHQ: -0.006 dB at most)."""
    samples = orig // 2 + 7
    t = np.arange(samples) / orig
    frequency = 0.9 * min(orig, target) / 2
    stereo = np.stack([np.sin(2 * np.pi * frequency * t), np.cos(2 * np.pi * frequency * t)]).astype(np.float32)
    out = resample(stereo, orig, target)
    assert out.dtype == np.float32 and out.shape == (2, -(-samples * target // orig))
    middle = out[:, out.shape[1] // 4 : 3 * out.shape[1] // 4].astype(np.float64)
    assert 10 * np.log10(np.mean(middle[0] ** 2 + middle[1] ** 2)) == pytest.approx(0.0, abs=0.01)
    assert resample(np.zeros((3, 2, 1001), np.float32), 44100, 32000).shape == (3, 2, 727)  # ceil, not round
