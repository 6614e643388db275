"""BS.1770 loudness against values the standards fix (ITU-R BS.1770-4's calibration and K-weighting, EBU Tech
3341's test cases), and normalisation landing on its target."""

import math

import numpy as np
import pytest

from mlx_musicgen.loudness import integrated_loudness, loudness_normalize

# ITU-R BS.1770-4, Tables 1 and 2: the K-weighting at 48 kHz
SHELF_48K = ([1.53512485958697, -2.69169618940638, 1.19839281085285], [1.0, -1.69065929318241, 0.73248077421585])
HIGH_PASS_48K = ([1.0, -2.0, 1.0], [1.0, -1.99004745483398, 0.99007225036621])
RATES = [32000, 44100, 48000]  # MusicGen's, and the two common ones


def sines(parts, rate, frequency=1000.0):
    """Consecutive stretches of one continuous sine, [(level in dBFS, seconds), ...]."""
    lengths = [round(seconds * rate) for _, seconds in parts]
    t = np.arange(sum(lengths)) / rate
    gain = np.concatenate([np.full(n, 10 ** (db / 20)) for (db, _), n in zip(parts, lengths)])
    return gain * np.sin(2 * np.pi * frequency * t)


def response_db(b, a, frequency, rate):
    z = np.exp(-2j * np.pi * frequency / rate * np.arange(3))
    return 20 * math.log10(abs(np.dot(b, z) / np.dot(a, z)))


@pytest.mark.parametrize("frequency", [20, 50, 100, 500, 1000, 2000, 5000, 10000, 20000])
def test_k_weighting_at_48k_is_the_standards(frequency):
    """A 0 dBFS sine reads -0.691 + 10 log10(1/2) + the gain of the standard's two biquads at its frequency."""
    rate = 48000
    gain = response_db(*SHELF_48K, frequency, rate) + response_db(*HIGH_PASS_48K, frequency, rate)
    expected = -0.691 + 10 * math.log10(0.5) + gain
    assert integrated_loudness(sines([(0.0, 4.0)], rate, frequency), rate) == pytest.approx(expected, abs=0.01)


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("level_db", [0.0, -20.0])
def test_997_hz_sine_reads_its_level_minus_3_01(rate, level_db):
    """The standard's calibration: a 0 dBFS 997 Hz sine in one channel reads -3.01 LUFS."""
    sine = sines([(level_db, 5.0)], rate, 997.0)
    assert integrated_loudness(sine, rate) == pytest.approx(level_db - 3.01, abs=0.05)
    stereo = np.stack([sine, sine])  # two channels, weight 1 each: +3.01 dB
    assert integrated_loudness(stereo, rate) == pytest.approx(level_db, abs=0.05)


# EBU Tech 3341 (v4), Table 1, cases 1-5: a stereo 1 kHz sine (the level of each channel), integrated loudness
# within +-0.1 LU of the value given. Cases 3-5 exercise the absolute (-70 LUFS) and relative (-10 LU) gates.
TECH_3341 = {
    1: ([(-23.0, 20.0)], -23.0),
    2: ([(-33.0, 20.0)], -33.0),
    3: ([(-36.0, 10.0), (-23.0, 60.0), (-36.0, 10.0)], -23.0),
    4: ([(-72.0, 10.0), (-36.0, 10.0), (-23.0, 60.0), (-36.0, 10.0), (-72.0, 10.0)], -23.0),
    5: ([(-26.0, 20.0), (-20.0, 20.1), (-26.0, 20.0)], -23.0),
}


@pytest.mark.parametrize("rate", RATES)
@pytest.mark.parametrize("case", sorted(TECH_3341))
def test_ebu_tech_3341_cases(rate, case):
    parts, expected = TECH_3341[case]
    sine = sines(parts, rate)
    assert integrated_loudness(np.stack([sine, sine]), rate) == pytest.approx(expected, abs=0.1)


def test_silence_reads_minus_infinity():
    assert integrated_loudness(np.zeros(32000), 32000) == -math.inf
    assert integrated_loudness(np.zeros((2, 100)), 32000) == -math.inf


@pytest.mark.parametrize("seconds", [0.2, 0.46, 0.66, 1.07])
def test_short_clips_read_their_level(seconds):
    """Off the blocks' 100 ms grid, only whole 400 ms blocks count (no partial last block, which would read
    up to 0.2 LU low); a clip shorter than one block is measured as that one block."""
    rate = 32000
    assert integrated_loudness(sines([(-20.0, seconds)], rate, 997.0), rate) == pytest.approx(-23.01, abs=0.05)


def test_normalize_lands_on_minus_14():
    """A stereo 997 Hz sine reads its level per channel: at -14 LUFS its peak is -14 dBFS."""
    rate = 32000
    sine = sines([(-30.0, 4.0)], rate, 997.0).astype(np.float32)
    out = loudness_normalize(np.stack([sine, sine]), rate, -14.0)
    assert out.dtype == np.float32
    assert 20 * math.log10(np.abs(out).max()) == pytest.approx(-14.0, abs=0.05)
    silence = np.zeros((2, rate), dtype=np.float32)
    np.testing.assert_array_equal(loudness_normalize(silence, rate, -14.0), silence)
