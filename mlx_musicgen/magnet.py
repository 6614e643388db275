"""MAGNeT's decoding (Ziv et al., 2024, "Masked Audio Generation using a Single Non-Autoregressive Transformer"),
as audiocraft's models/lm_magnet.py runs it.

A clip of T frames is made codebook by codebook. Codebook k (stage k) takes `decoding_steps[k]` passes; pass i of
n has the mask ratio

    gamma_i = cos(pi / 2 * i / (n - 1))                                  (the cosine schedule: 1 -> 0)

and masks max(floor(gamma_i * N), 1) of the stage's N spans (of `span_len` frames; the prompt's are kept): all at
first, then those the last pass was least sure of. The model reads the whole clip (earlier codebooks fixed, this
one partly masked, later ones all masked), guidance is annealed with the ratio,

    logits = uncond + (cond - uncond) * (gamma_i * max_cfg + (1 - gamma_i) * min_cfg),

and the masked tokens are drawn at the temperature t_i = temperature * (n - 1 - i) / n (annealed to 0), or taken
by argmax when not sampling. A span's score is 1 - the largest probability of its tokens ('nonoverlap'), or the
tokens' -log p summed over overlapping spans ('stride1', masked by a binary search for the span count whose
union is nearest the target).

The schedule's numbers are float32, as torch computes them, so that the counts of masked spans are audiocraft's.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np

from .decoder import Context
from .sampling import apply_guidance, check_tokens, sample

DONT_REMASK = -1e4  # the score of a kept token or span (the prompt's; and what the last pass did not mask)
SPAN_ARRANGEMENTS = ("nonoverlap", "stride1")
Progress = Callable[[int, int], None]  # (passes done, passes in all)


@dataclass(frozen=True)
class MagnetConfig:
    """A MAGNeT checkpoint's own settings: the clip it makes (frames), the span of masking, and the frames either
    side that codebooks above the first attend to (-1: all)."""

    frames: int
    span_len: int = 3
    subcodes_context: int = 5

    def check(self) -> None:
        if self.subcodes_context < -1:
            raise ValueError(f"subcodes_context must be -1 (all frames) or more, got {self.subcodes_context}")


class MaskedLM(Protocol):
    """What the passes need of the model: the mask token, and logits of every position of a whole clip."""

    num_codebooks: int
    pad_token_id: int  # the mask token

    def __call__(self, codes: mx.array, context: Context, stage: int) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab), attending as `stage` does."""


def linspace(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps) in float32, as torch computes it: from the start in the first half, from the end
    in the second."""
    if steps == 1:
        return np.zeros(1, np.float32)
    step = np.float32(1.0) / np.float32(steps - 1)
    i = np.arange(steps)
    first = np.float32(0.0) + step * i.astype(np.float32)
    second = np.float32(1.0) - step * (steps - 1 - i).astype(np.float32)
    return np.where(i < steps // 2, first, second).astype(np.float32)


def mask_ratios(steps: int) -> np.ndarray:
    """gamma_i = cos(t_i * pi * 0.5) of each pass, float32 (the product rounded as torch rounds it, the cosine
    from float64 rounded once)."""
    angles = linspace(steps) * np.float32(math.pi) * np.float32(0.5)
    return np.cos(angles.astype(np.float64)).astype(np.float32)


def masked_count(ratio: np.float32, candidates: int) -> int:
    """How many of `candidates` spans (or tokens) a pass masks: max(floor(ratio * candidates), 1), the product
    a float32 as in audiocraft."""
    return max(int(np.float32(ratio) * np.float32(candidates)), 1)


def schedule(steps: int, candidates: int) -> list[int]:
    """The masked counts of a stage's passes (what the tests compare with audiocraft's)."""
    return [masked_count(ratio, candidates) for ratio in mask_ratios(steps)]


def guidance_coefficient(ratio: float, max_cfg: float, min_cfg: float) -> float:
    """Guidance annealed with the mask ratio: max_cfg when all is masked, min_cfg when nothing is."""
    return float(ratio) * max_cfg + (1 - float(ratio)) * min_cfg


def spans_mask(starts: np.ndarray, length: int, span_len: int) -> np.ndarray:
    """(length,) bool: True in the span_len frames from each start."""
    mask = np.zeros(length, bool)
    for offset in range(span_len):
        mask[np.minimum(starts + offset, length - 1)[starts + offset < length]] = True
    return mask


def least_probable_spans(scores: np.ndarray, target: int, span_len: int) -> np.ndarray:
    """'stride1' masking of one row: (T,) token scores (-log p; DONT_REMASK where kept) -> (T,) bool, the union
    of the u overlapping spans of highest summed score, u found by binary search so that about `target` tokens
    are masked (audiocraft's _least_probable_span_masking)."""
    length = scores.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(scores, span_len)
    span_scores = windows.sum(axis=-1, dtype=np.float32)
    order = np.argsort(-span_scores, kind="stable")
    target = max(target, span_len)
    low, high = target // span_len, target - span_len + 1
    mid = round(0.5 * (low + high))
    if mid in (low, high):
        return spans_mask(order[:mid], length, span_len)
    mask = None
    while low < mid < high:
        mask = spans_mask(order[:mid], length, span_len)
        if mask.sum() > target:
            high = mid
        else:
            low = mid
        mid = round(0.5 * (low + high))
    return mask


@dataclass(frozen=True)
class Decoding:
    """How the passes decode: sampling (or argmax), its temperature (annealed within each stage), top-k / top-p
    (top-p first: when it is on, top-k is not used, as in audiocraft), guidance from max_cfg to min_cfg, passes
    per codebook, and the span arrangement."""

    do_sample: bool = True
    temperature: float = 3.0
    top_k: int = 0
    top_p: float = 0.9
    max_cfg: float = 10.0
    min_cfg: float = 1.0
    decoding_steps: tuple[int, ...] = (20, 10, 10, 10)
    span_arrangement: str = "nonoverlap"
    seed: int | None = None


def draw(logits: mx.array, decoding: Decoding, temperature: float, key: mx.array) -> tuple[mx.array, mx.array]:
    """A stage's logits (B, T, vocab) -> the tokens (B, T) drawn at `temperature` (argmax when not sampling) and
    their probabilities at that temperature (B, T), as audiocraft scores them."""
    logits = logits.astype(mx.float32) / max(temperature, 1e-2)
    probs = mx.softmax(logits, axis=-1)
    tokens = sample(logits, do_sample=decoding.do_sample, top_k=0 if decoding.top_p > 0 else decoding.top_k,
                    top_p=decoding.top_p, key=key)
    check_tokens(tokens)
    return tokens, mx.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def generate_stage(lm: MaskedLM, codes: np.ndarray, context: Context, guided: bool, stage: int, prompt_frames: int,
                   span_len: int, decoding: Decoding, keys: list, on_pass: Callable[[], None]) -> np.ndarray:
    """Codebook `stage` of `codes` (B, K, T), host int32, made by decoding.decoding_steps[stage] passes; returns
    the codes (trimmed to whole spans where masking is by spans, as audiocraft trims them)."""
    B, K, T = codes.shape
    mask_id = lm.pad_token_id
    by_spans = span_len > 1 and decoding.span_arrangement == "nonoverlap"
    overlapping = span_len > 1 and decoding.span_arrangement == "stride1"
    if by_spans:
        T = span_len * (T // span_len)
        codes = codes[..., :T]
        scores = np.zeros((B, T // span_len), np.float32)
        scores[:, : prompt_frames // span_len] = DONT_REMASK
        candidates = T // span_len - prompt_frames // span_len
    else:
        scores = np.zeros((B, T), np.float32)
        scores[:, :prompt_frames] = DONT_REMASK
        candidates = T - prompt_frames
    stage_codes = np.full((B, T), mask_id, np.int32)
    prompt = codes[:, stage, :prompt_frames].copy()
    steps = decoding.decoding_steps[stage]
    for i, ratio in enumerate(mask_ratios(steps)):
        count = masked_count(ratio, candidates)
        if overlapping:
            mask = np.stack([least_probable_spans(scores[b], count, span_len) for b in range(B)])
        else:
            chosen = np.argsort(-scores, axis=-1, kind="stable")[:, :count]
            chosen_mask = np.zeros(scores.shape, bool)
            np.put_along_axis(chosen_mask, chosen, True, axis=-1)
            mask = np.repeat(chosen_mask, span_len, axis=-1) if by_spans else chosen_mask
        stage_codes[mask] = mask_id
        stage_codes[:, :prompt_frames] = prompt
        codes[:, stage] = stage_codes
        batch = mx.array(np.concatenate([codes, codes]) if guided else codes)
        logits = lm(batch, context, stage)
        if guided:
            logits = apply_guidance(logits, guidance_coefficient(ratio, decoding.max_cfg, decoding.min_cfg))
        temperature = decoding.temperature * ((steps - 1 - i) / steps)
        tokens, probs = draw(logits[:, stage], decoding, temperature, keys.pop(0))
        tokens, probs = np.array(tokens), np.array(probs)
        masked = stage_codes == mask_id
        stage_codes = np.where(masked, tokens, stage_codes).astype(np.int32)
        codes[:, stage] = stage_codes
        if by_spans:
            scores = 1 - probs.reshape(B, -1, span_len).max(axis=-1)
            scores[~chosen_mask] = DONT_REMASK
        else:
            scores = -np.log(probs)
            scores[~masked] = DONT_REMASK
        on_pass()
    return codes


def generate_clip(lm: MaskedLM, context: Context, guided: bool, batch: int, frames: int, decoding: Decoding,
                  prompt: np.ndarray | None = None, progress: Progress | None = None) -> mx.array:
    """A whole clip of `frames` frames (B, K, T) by MAGNeT's passes, codebook by codebook, continuing `prompt`
    (B, K, P) codes if given; T is trimmed to whole spans under 'nonoverlap' masking (audiocraft's 10 s: 498)."""
    K = lm.num_codebooks
    codes = np.full((batch, K, frames), lm.pad_token_id, np.int32)
    prompt_frames = 0 if prompt is None else prompt.shape[-1]
    if prompt is not None:
        codes[..., :prompt_frames] = prompt
    total = sum(decoding.decoding_steps)
    seed = decoding.seed if decoding.seed is not None else secrets.randbits(31)
    keys = list(mx.random.split(mx.random.key(seed), total))
    done = 0

    def on_pass() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    span_len = getattr(lm, "span_len", 1)
    for stage in range(K):
        codes = generate_stage(lm, codes, context, guided, stage, prompt_frames, span_len, decoding, keys, on_pass)
    return mx.array(codes)
