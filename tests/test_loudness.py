"""BS.1770 loudness against values the standard fixes, and normalisation landing on its target."""

import math

import numpy as np
import pytest

from mlx_musicgen.loudness import integrated_loudness, k_weighting, loudness_normalize

# ITU-R BS.1770-4, Table 1 and 2: the K-weighting at 48 kHz
SHELF_48K = ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585])
HIGH_PASS_48K = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])


def test_k_weighting_at_48k_is_the_standards():
    (shelf_b, shelf_a), (hp_b, hp_a) = k_weighting(48000)
    np.testing.assert_allclose(shelf_b, SHELF_48K[0], atol=1e-8)
    np.testing.assert_allclose(shelf_a, SHELF_48K[1], atol=1e-8)
    np.testing.assert_allclose(hp_b, HIGH_PASS_48K[0], atol=1e-8)
    np.testing.assert_allclose(hp_a, HIGH_PASS_48K[1], atol=1e-8)


@pytest.mark.parametrize("rate", [32000, 48000])
@pytest.mark.parametrize("level_db", [0.0, -20.0])
def test_997_hz_sine_reads_its_level_minus_3_01(rate, level_db):
    """The standard's calibration: a 0 dBFS 997 Hz sine in one channel reads -3.01 LUFS."""
    t = np.arange(5 * rate) / rate
    sine = 10 ** (level_db / 20) * np.sin(2 * np.pi * 997 * t)
    assert integrated_loudness(sine, rate) == pytest.approx(level_db - 3.01, abs=0.05)
    stereo = np.stack([sine, sine])  # two channels, weight 1 each: +3.01 dB
    assert integrated_loudness(stereo, rate) == pytest.approx(level_db, abs=0.05)


def test_gating_ignores_silence():
    rate = 32000
    t = np.arange(3 * rate) / rate
    sine = 0.1 * np.sin(2 * np.pi * 997 * t)
    short_gap = np.concatenate([sine, np.zeros(rate)])
    long_gap = np.concatenate([sine, np.zeros(20 * rate)])  # without the gates: 8.5 dB quieter
    assert integrated_loudness(long_gap, rate) == pytest.approx(integrated_loudness(short_gap, rate), abs=0.01)
    assert integrated_loudness(np.zeros(rate), rate) == -math.inf


def test_normalize_lands_on_minus_14():
    rate = 32000
    rng = np.random.default_rng(0)
    noise = (0.05 * rng.standard_normal((2, 4 * rate))).astype(np.float32)
    out = loudness_normalize(noise, rate, -14.0)
    assert integrated_loudness(out, rate) == pytest.approx(-14.0, abs=0.05)
