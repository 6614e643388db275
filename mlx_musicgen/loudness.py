"""Integrated loudness per ITU-R BS.1770-4 (K-weighting, 400 ms blocks, absolute and relative gates), and
normalisation to a target in LUFS (audiocraft's 'loudness' strategy uses -14).

The K-weighting biquads are designed for any sample rate with Brecht De Man's formulas, which give the
standard's published coefficients at 48 kHz. They are applied as an FFT convolution with their impulse
response, which decays below float precision long before its 2**15 samples end: exact, and fast in numpy.
"""

from __future__ import annotations

import math

import numpy as np

ABSOLUTE_GATE = -70.0  # LUFS
RELATIVE_GATE = -10.0  # LU below the absolutely gated loudness
IMPULSE_LENGTH = 2**15


def k_weighting(rate: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """The two biquads (b, a) of the K-weighting: a high shelf (head effects), then a high pass (RLB)."""
    K = math.tan(math.pi * 1681.974450955533 / rate)
    Q = 0.7071752369554196
    Vh = 10 ** (3.999843853973347 / 20)
    Vb = Vh**0.4996667741545416
    a0 = 1 + K / Q + K * K
    shelf = (
        np.array([Vh + Vb * K / Q + K * K, 2 * (K * K - Vh), Vh - Vb * K / Q + K * K]) / a0,
        np.array([1.0, 2 * (K * K - 1) / a0, (1 - K / Q + K * K) / a0]),
    )
    K = math.tan(math.pi * 38.13547087602444 / rate)
    Q = 0.5003270373238773
    a0 = 1 + K / Q + K * K
    high_pass = (np.array([1.0, -2.0, 1.0]), np.array([1.0, 2 * (K * K - 1) / a0, (1 - K / Q + K * K) / a0]))
    return [shelf, high_pass]


def impulse_response(rate: int, length: int = IMPULSE_LENGTH) -> np.ndarray:
    h = np.zeros(length)
    h[0] = 1.0
    for b, a in k_weighting(rate):
        x, y = h, np.zeros(length)
        x1 = x2 = y1 = y2 = 0.0
        for n in range(length):  # the biquad's recurrence, once, on an impulse
            y[n] = b[0] * x[n] + b[1] * x1 + b[2] * x2 - a[1] * y1 - a[2] * y2
            x2, x1, y2, y1 = x1, x[n], y1, y[n]
        h = y
    return h


def integrated_loudness(audio: np.ndarray, rate: int) -> float:
    """(channels, samples) or (samples,) -> loudness in LUFS (-inf for silence). Channel weights are 1 (L, R)."""
    audio = np.atleast_2d(np.asarray(audio, dtype=np.float64))
    samples = audio.shape[-1]
    h = impulse_response(rate, min(IMPULSE_LENGTH, max(samples, 1)))
    size = 1 << (samples + h.size - 1).bit_length()
    weighted = np.fft.irfft(np.fft.rfft(audio, size) * np.fft.rfft(h, size), size)[:, :samples]

    block, hop = round(0.4 * rate), round(0.1 * rate)
    starts = range(0, max(samples - block, 0) + 1, hop) if samples >= block else [0]
    power = np.cumsum(np.pad(weighted**2, ((0, 0), (1, 0))), axis=1)
    ends = [min(s + block, samples) for s in starts]
    mean_square = np.stack([(power[:, e] - power[:, s]) / max(e - s, 1) for s, e in zip(starts, ends)], axis=1)
    block_power = mean_square.sum(axis=0)  # summed over channels, (blocks,)

    def lufs(p: np.ndarray) -> float:
        total = float(np.mean(p)) if p.size else 0.0
        return -0.691 + 10 * math.log10(total) if total > 0 else -math.inf

    with np.errstate(divide="ignore"):
        block_loudness = -0.691 + 10 * np.log10(block_power)
    gated = block_power[block_loudness > ABSOLUTE_GATE]
    if gated.size == 0:
        return -math.inf
    threshold = lufs(gated) + RELATIVE_GATE
    return lufs(block_power[(block_loudness > ABSOLUTE_GATE) & (block_loudness > threshold)])


def loudness_normalize(audio: np.ndarray, rate: int, target: float = -14.0) -> np.ndarray:
    """Scale to `target` LUFS; silence stays silence."""
    current = integrated_loudness(audio, rate)
    if not math.isfinite(current):
        return audio
    return (audio * 10 ** ((target - current) / 20)).astype(np.float32)
