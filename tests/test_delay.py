"""The delay pattern against transformers' build_delay_pattern_mask, and undoing it against its pad filter."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import MusicgenForCausalLM

from mlx_musicgen import delay

PAD = 2048


def reference_pattern(prompt: np.ndarray, length: int, channels: int):
    B, K, P = prompt.shape
    this = SimpleNamespace(num_codebooks=K, config=SimpleNamespace(audio_channels=channels))
    ids, mask = MusicgenForCausalLM.build_delay_pattern_mask(
        this, torch.from_numpy(prompt).reshape(B * K, P), PAD, max_length=length
    )
    return ids.reshape(B, K, -1).numpy(), mask.reshape(B, K, -1).numpy()


# lengths the reference accepts: the delayed prompt must fit (it raises otherwise)
CASES = [
    (K, C, P, L)
    for K, C in ((4, 1), (8, 2), (2, 1))
    for P in (1, 3, 6)
    for L in (2, 5, 7, 12, 30)
    if L > P and (L < 2 * (K // C) - 1 or L >= P + K // C - 1)
]


@pytest.mark.parametrize("K,channels,prompt_len,length", CASES)
def test_pattern_and_start_match_reference(K, channels, prompt_len, length):
    rng = np.random.default_rng(K * 100 + prompt_len * 10 + length)
    prompt = rng.integers(0, PAD, size=(2, K, prompt_len))
    prompt[:, :, 0] = PAD  # the start column
    ref_ids, ref_mask = reference_pattern(prompt, length, channels)
    pattern = delay.delay_pattern(prompt, length, PAD, channels)
    start = delay.first_free_position(pattern, prompt_len)
    np.testing.assert_array_equal(pattern[:, :, :start], ref_ids)  # what the decoder is prefilled with
    if delay.applies(length, K, channels):
        np.testing.assert_array_equal(pattern, ref_mask)
    else:  # the reference keeps the prompt in its inputs and leaves the mask all unset
        assert (ref_mask == delay.UNSET).all() and (pattern[:, :, prompt_len:] == delay.UNSET).all()


@pytest.mark.parametrize("K,channels,length", [(4, 1, 12), (8, 2, 12), (4, 1, 6), (8, 2, 9), (4, 1, 4)])
def test_undelay_matches_reference_pad_filter(K, channels, length):
    rng = np.random.default_rng(length)
    prompt = np.full((2, K, 1), PAD)
    pattern = delay.delay_pattern(prompt, length, PAD, channels)
    sequence = np.where(pattern == delay.UNSET, rng.integers(0, PAD, size=pattern.shape), pattern)
    expected = sequence[sequence != PAD].reshape(2, K, -1)  # what the reference does after generating
    np.testing.assert_array_equal(delay.undelay(sequence, channels), expected)


def test_frames_out_counts_like_the_reference():
    # 10 new tokens, no prompt, 4 codebooks -> 7 frames (REFERENCE.md)
    pattern = delay.delay_pattern(np.full((1, 4, 1), PAD), 11, PAD, 1)
    assert delay.undelay(pattern, 1).shape == (1, 4, 7)
    assert list(delay.codebook_delays(8, 2)) == [0, 0, 1, 1, 2, 2, 3, 3]
