"""Classifier-free guidance and next-token sampling, in the reference's order:
guidance, temperature, top-k, top-p, then a draw from the softmax (or argmax when greedy)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

# What `sample` returns for a row whose logits hold NaN or inf: no code (codes are >= 0), so that the fault
# travels with the tokens that are evaluated anyway (no extra sync per step) and `check_tokens` finds it later.
NONFINITE = -2
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32, ~1.2e-38


class NonFiniteLogitsError(FloatingPointError):
    """The decoder produced NaN or infinite logits: what would be sampled from them is noise."""

    def __init__(self) -> None:
        super().__init__(
            "the model produced NaN/inf logits, so the music would be noise; the weights may be corrupt (download "
            "or convert the model again) or the decoder dtype too narrow: try float32."
        )


def check_tokens(codes: mx.array | np.ndarray) -> None:
    """Raise NonFiniteLogitsError if any code was sampled from non-finite logits (see NONFINITE)."""
    if codes.size and codes.min().item() < 0:
        raise NonFiniteLogitsError()


def apply_guidance(logits: mx.array, guidance_scale: float) -> mx.array:
    """Rows [0, B) are conditional and [B, 2B) unconditional: uncond + (cond - uncond) * scale."""
    cond, uncond = mx.split(logits, 2, axis=0)
    return uncond + (cond - uncond) * guidance_scale


def top_k_filter(logits: mx.array, k: int) -> mx.array:
    """Keep the k largest logits (and any tied with the k-th); -inf elsewhere."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth_largest = -mx.partition(-logits, k - 1, axis=-1)[..., k - 1 : k]
    return mx.where(logits < kth_largest, -mx.inf, logits)


def top_p_filter(logits: mx.array, p: float) -> mx.array:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    if p <= 0.0 or p >= 1.0:
        return logits
    order = mx.argsort(logits, axis=-1)  # ascending
    sorted_logits = mx.take_along_axis(logits, order, axis=-1)
    cumulative = mx.cumsum(mx.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1.0 - p
    remove_sorted[..., -1] = False
    # scatter the decision back to vocabulary order
    inverse = mx.argsort(order, axis=-1)
    remove = mx.take_along_axis(remove_sorted, inverse, axis=-1)
    return mx.where(remove, -mx.inf, logits)


def sample(
    logits: mx.array,
    *,
    do_sample: bool,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 0.0,
    key: mx.array | None = None,
) -> mx.array:
    """logits (..., vocab) float -> token ids (...) int32; NONFINITE where a row of logits holds NaN or inf.

    Temperature 0 is greedy; a temperature so small that float32 holds it as 0 (below ~1e-38) is greedy too."""
    logits = logits.astype(mx.float32)
    finite = mx.isfinite(logits).all(axis=-1)
    if not do_sample or temperature < FLOAT32_TINY:
        tokens = mx.argmax(logits, axis=-1)
    else:
        if temperature != 1.0:
            # shifted so the best logit is 0: a tiny temperature then sends the others to -inf, never to NaN
            logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
        logits = top_p_filter(top_k_filter(logits, top_k), top_p)
        tokens = mx.random.categorical(logits, axis=-1, key=key)
    return mx.where(finite, tokens.astype(mx.int32), NONFINITE)
