"""Chroma features against transformers' MusicgenMelodyFeatureExtractor (its Spectrogram given by a test-only
torch.stft stand-in, fixtures.SpectrogramStandIn, since torchaudio cannot be installed beside torch here; so the
reference is always fed 32 kHz audio) and its audio_utils.chroma_filter_bank."""

import fixtures
import numpy as np
import pytest
from transformers.audio_utils import chroma_filter_bank

from mlx_musicgen.audio import resample
from mlx_musicgen.chroma import ChromaSettings, batch_melodies, chroma_energy, extract, filter_bank, melody_at

RATE = 32000
SETTINGS = ChromaSettings()
NEAR_TIE = 1e-5  # frames whose two strongest classes are closer than this (relative) may differ by rounding


@pytest.fixture(scope="module")
def extractor():
    return fixtures.melody_extractor()


def tone(freq: float, seconds: float, rate: int = RATE, phase: float = 0.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return np.sin(2 * np.pi * freq * t + phase)


def chord_progression(rate: int = RATE) -> np.ndarray:
    """C major, A minor, F major, G major: 1.5 s each, three sines per chord."""
    chords = [(261.63, 329.63, 392.0), (220.0, 261.63, 329.63), (174.61, 220.0, 261.63), (196.0, 246.94, 293.66)]
    return (0.2 * np.concatenate([sum(tone(f, 1.5, rate) for f in chord) for chord in chords])).astype(np.float32)


def tune_over_noise(rate: int = RATE, seed: int = 0) -> np.ndarray:
    """A tune of eight notes, a quarter second each, over white noise at -20 dB."""
    notes = [261.63, 293.66, 329.63, 349.23, 392.0, 440.0, 493.88, 523.25]
    melody = np.concatenate([tone(f, 0.25, rate) for f in notes])
    rng = np.random.default_rng(seed)
    return (0.5 * melody + 0.05 * rng.standard_normal(melody.size)).astype(np.float32)


def ours(melodies, rate: int = RATE) -> tuple[np.ndarray, np.ndarray]:
    """(one-hot chroma, energies) of a batch of (channels, samples) or (samples,) melodies at `rate`."""
    mono = [resample(np.atleast_2d(m).mean(axis=0), rate, RATE) for m in melodies]
    wav = batch_melodies(mono, SETTINGS)
    return extract(wav, SETTINGS), chroma_energy(wav, SETTINGS)


def assert_same_frames(actual, energy, expected, near_tie=NEAR_TIE):
    """The same one-hot in every frame, except where our two strongest classes are within `near_tie`."""
    assert actual.shape == expected.shape
    top2 = np.sort(energy, axis=-1)[..., -2:]
    tie = (top2[..., 1] - top2[..., 0]) <= near_tie * np.maximum(top2[..., 1], 1e-12)
    differ = (actual != expected).any(axis=-1)
    assert not (differ & ~tie).any(), f"{int((differ & ~tie).sum())} frames differ away from ties"
    assert differ.sum() <= 0.02 * differ.size


def test_filter_bank_is_transformers():
    for n_fft, rate in ((16384, 32000), (2048, 22050)):
        np.testing.assert_allclose(filter_bank(12, n_fft, rate), chroma_filter_bank(n_fft, 12, rate, tuning=0),
                                   rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("signal", ["chords", "tune", "noise"])
def test_one_hot_frames_are_the_references(extractor, signal):
    audio = {"chords": chord_progression(), "tune": tune_over_noise(),
             "noise": np.random.default_rng(3).standard_normal(5 * RATE).astype(np.float32)}[signal]
    expected = extractor(audio, sampling_rate=RATE, return_tensors="np")["input_features"]
    assert_same_frames(*ours([audio]), expected)
    assert expected.shape == (1, 1 + audio.size // 4096, 12)


def test_pure_tones_land_in_their_pitch_class():
    for freq, pitch_class in ((261.63, 0), (440.0, 9), (493.88, 11), (369.99, 6)):
        chroma, _ = ours([tone(freq, 1.0).astype(np.float32)])
        assert (chroma.argmax(-1) == pitch_class).all(), freq


def test_stereo_is_mixed_to_mono_as_the_reference_mixes_it(extractor):
    stereo = np.stack([chord_progression(), tune_over_noise(seed=1).repeat(3)[: chord_progression().size]])
    expected = extractor([stereo], sampling_rate=RATE, return_tensors="np")["input_features"]
    assert_same_frames(*ours([stereo]), expected)


def test_short_and_uneven_batches_are_padded_as_the_reference_pads_them(extractor):
    short = tune_over_noise()[:10000]  # shorter than n_fft: zero-padded on both sides first
    expected = extractor(short, sampling_rate=RATE, return_tensors="np")["input_features"]
    assert_same_frames(*ours([short]), expected)
    assert expected.shape == (1, 5, 12)
    batch = [chord_progression(), tune_over_noise()]  # the second right-padded with silence
    expected = extractor(batch, sampling_rate=RATE, return_tensors="np")["input_features"]
    assert_same_frames(*ours(batch), expected)


def test_longer_than_the_chunk_is_cut_to_it(extractor):
    long = np.tile(chord_progression(), 6)[: 31 * RATE]  # 31 s: the extractor keeps the first 30
    expected = extractor(long, sampling_rate=RATE, return_tensors="np")["input_features"]
    assert expected.shape == (1, 235, 12)
    assert_same_frames(*ours([long]), expected)


def test_other_rates_go_through_our_resampler(extractor):
    """44.1 kHz input, resampled by us, against the reference fed the same music made at 32 kHz: the resampler's
    small error may only move frames whose strongest classes nearly tie."""
    expected = extractor(chord_progression(), sampling_rate=RATE, return_tensors="np")["input_features"]
    chroma, energy = ours([chord_progression(44100)], rate=44100)
    assert_same_frames(chroma[:, : expected.shape[1]], energy[:, : expected.shape[1]], expected, near_tie=1e-3)


def test_a_window_of_the_melody_is_audiocrafts_slice():
    """audiocraft's MusicGen._generate_tokens, for each window of a long generation: positions
    arange(int(time_offset * sr), ... + int(max_duration * sr)) % the melody's length."""
    melody = np.arange(1000, dtype=np.float32)
    np.testing.assert_array_equal(melody_at(melody, 0.0, 0.5, 1000), melody[:500])
    np.testing.assert_array_equal(melody_at(melody, 0.8, 0.5, 1000), np.r_[melody[800:], melody[:300]])
    np.testing.assert_array_equal(melody_at(melody[:300], 0.5, 0.7, 1000), np.tile(melody[:300], 4)[200:900])
    assert melody_at(melody, 0.018 * 3, 0.03, 32000).shape == (960,)
