"""Sampling filters against transformers' logits warpers, and guidance arithmetic."""

import mlx.core as mx
import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    ClassifierFreeGuidanceLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from mlx_musicgen.sampling import apply_guidance, sample, top_k_filter, top_p_filter


def logits(seed=0, shape=(3, 2048)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * 3


def kept(x):
    return np.isfinite(np.asarray(x))


@pytest.mark.parametrize("k", [1, 5, 250, 2047])
def test_top_k_keeps_what_the_reference_keeps(k):
    x = logits(k)
    expected = TopKLogitsWarper(k)(None, torch.from_numpy(x)).numpy()
    actual = np.array(top_k_filter(mx.array(x), k))
    np.testing.assert_array_equal(kept(actual), kept(expected))
    assert kept(actual).sum(-1).tolist() == [k] * 3  # keeps k, not k - 1


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9, 0.99])
def test_top_p_keeps_what_the_reference_keeps(p):
    x = logits(int(p * 100))
    expected = TopPLogitsWarper(p)(None, torch.from_numpy(x)).numpy()
    actual = np.array(top_p_filter(mx.array(x), p))
    np.testing.assert_array_equal(kept(actual), kept(expected))


def test_guidance_matches_reference_processor():
    x = logits(1, (4, 2048))  # 2 conditional rows, then 2 unconditional
    expected = ClassifierFreeGuidanceLogitsProcessor(3.0)(torch.zeros(2, 1), torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(apply_guidance(mx.array(x), 3.0)), expected, rtol=1e-6, atol=1e-5)


def test_samples_only_from_the_kept_set_and_greedy_is_argmax():
    x = mx.array(logits(2))
    keep = kept(TopKLogitsWarper(10)(None, TemperatureLogitsWarper(0.7)(None, torch.from_numpy(np.array(x)))))
    for seed in range(20):
        ids = np.array(sample(x, do_sample=True, temperature=0.7, top_k=10, key=mx.random.key(seed)))
        assert all(keep[row, i] for row, i in enumerate(ids))
    greedy = np.array(sample(x, do_sample=True, temperature=0.0))
    np.testing.assert_array_equal(greedy, np.argmax(np.array(x), -1))
