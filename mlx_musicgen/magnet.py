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

import contextlib
import math
import secrets
from dataclasses import dataclass
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np

from .decoder import Context, DecoderConfig, MusicgenDecoder
from .sampling import NONFINITE, apply_guidance, check_tokens, sample
from .torch_order import descending_order, torch_topk

DONT_REMASK = -1e4  # the score of a kept token or span (the prompt's; and what the last pass did not mask)
PassProgress = Callable[[int, int], None]  # (passes done, passes in all)


@dataclass(frozen=True)
class MagnetConfig:
    """A MAGNeT checkpoint's own settings: the clip it makes (frames), the span of masking, and the frames either
    side that codebooks above the first attend to (-1: all)."""

    frames: int
    span_len: int = 3
    subcodes_context: int = 5

    def check(self) -> None:
        """Raise ValueError for settings that make no clip (each a whole number in its range)."""
        for name, low in (("frames", 1), ("span_len", 1), ("subcodes_context", -1)):
            value = getattr(self, name)
            if not (isinstance(value, int) and not isinstance(value, bool) and low <= value <= 2**31 - 1):
                raise ValueError(f"MAGNeT's {name} must be a whole number from {low}, got {value!r}")


class MagnetDecoder(MusicgenDecoder):
    """MusicGen's transformer read without a causal mask over a whole clip: the first codebook's stage attends to
    every frame, later stages only to the frames within subcodes_context of their own (audiocraft's
    restricted_context_attn_mask); no KV cache (every pass reads the clip).

    `products`: the context a pass is evaluated in; a CPU's form puts every core on its products
    (cpu.optimize_for_cpu), which, unlike a decoding step's, are large enough to keep them all busy."""

    products = staticmethod(contextlib.nullcontext)

    def __init__(self, config: DecoderConfig, magnet: MagnetConfig):
        super().__init__(config)
        self.magnet = magnet

    @property
    def span_len(self) -> int:
        return self.magnet.span_len

    def stage_mask(self, stage: int, length: int, dtype: mx.Dtype) -> mx.array | None:
        """The self-attention's additive (length, length) mask at `stage`: 0 where |query - key| <=
        subcodes_context, -inf elsewhere; None (every frame) for the first codebook or an unrestricted model."""
        if stage == 0 or self.magnet.subcodes_context < 0:
            return None
        positions = mx.arange(length)
        near = mx.abs(positions[:, None] - positions[None, :]) <= self.magnet.subcodes_context
        return mx.where(near, mx.array(0.0, dtype), mx.array(-mx.inf, dtype))

    def __call__(self, codes: mx.array, context: Context, stage: int = 0) -> mx.array:
        """codes (B, K, T) of a whole clip (masked positions hold the mask token) -> logits (B, K, T, vocab)."""
        return self.read(codes, context, stage, self.logits)

    def stage_logits(self, codes: mx.array, context: Context, stage: int) -> mx.array:
        """The logits of codebook `stage` only (B, T, vocab): what a pass uses, without the other heads."""
        return self.read(codes, context, stage, lambda x: self.lm_heads[stage](self.layer_norm(x)))

    def read(self, codes: mx.array, context: Context, stage: int, heads) -> mx.array:
        """heads(the last layer's output) of the clip read as `stage` attends, evaluated within `products`."""
        with self.products():
            x = self.add_positions(self.embed(codes), 0)
            mask = self.stage_mask(stage, codes.shape[-1], x.dtype)
            for i, layer in enumerate(self.layers):
                x = layer(x, context.text[i], None, mask)
            logits = heads(x)
            mx.eval(logits)
        return logits


class MaskedLM(Protocol):
    """What the passes need of the model: the mask token, and logits of every position of a whole clip."""

    num_codebooks: int
    pad_token_id: int  # the mask token
    span_len: int

    def stage_logits(self, codes: mx.array, context: Context, stage: int) -> mx.array:
        """codes (B, K, T) -> codebook `stage`'s logits (B, T, vocab), attending as `stage` does."""


def linspace(steps: int) -> np.ndarray:
    """torch.linspace(0, 1, steps) in float32, as torch's vectorised CPU kernel computes it: a float32 step, then
    from the start in the first half and from the end in the second, each by a fused multiply-add (one rounding:
    a float32 product is exact in float64)."""
    if steps == 1:
        return np.zeros(1, np.float32)
    step = np.float64(np.float32(1.0) / np.float32(steps - 1))
    i = np.arange(steps)
    return np.where(i < steps // 2, step * i, 1.0 - step * (steps - 1 - i)).astype(np.float32)


def mask_ratios(steps: int) -> np.ndarray:
    """gamma_i = cos(t_i * pi * 0.5) of each pass, float32: the products in float32, as torch's, the cosine from
    float64 rounded once (torch's own float32 cosine is at times a step off it, which moves the guidance by 1e-7
    and a count of masked spans only where ratio * count falls within a step of a whole number)."""
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
        frames = starts + offset
        mask[frames[frames < length]] = True
    return mask


def least_probable_spans(scores: np.ndarray, target: int, span_len: int) -> np.ndarray:
    """'stride1' masking of one row: (T,) token scores (-log p; DONT_REMASK where kept) -> (T,) bool, the union
    of the u overlapping spans of highest summed score, u found by binary search so that about `target` tokens
    are masked (audiocraft's _least_probable_span_masking)."""
    length = scores.shape[0]
    windows = np.lib.stride_tricks.sliding_window_view(scores, span_len)
    span_scores = windows.sum(axis=-1, dtype=np.float32)
    order = descending_order(span_scores)
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
    """How the passes decode (a resolved GenerationConfig's settings: settings.MODEL_DEFAULTS holds audiocraft's):
    sampling (or argmax), its temperature (annealed within each stage), top-k / top-p (top-p first: when it is
    on, top-k is not used, as in audiocraft), guidance from max_cfg to min_cfg, passes per codebook, and the span
    arrangement."""

    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    max_cfg: float
    min_cfg: float
    decoding_steps: tuple[int, ...]
    span_arrangement: str
    seed: int | None = None


def draw(logits: mx.array, decoding: Decoding, temperature: float, key: mx.array) -> tuple[mx.array, mx.array]:
    """A stage's logits (B, T, vocab) -> the tokens (B, T) drawn at `temperature` (argmax when not sampling) and
    their probabilities at that temperature (B, T), as audiocraft scores them."""
    raw = logits.astype(mx.float32)
    logits = raw / max(temperature, 1e-2)
    probs = mx.softmax(logits, axis=-1)
    if decoding.do_sample and decoding.top_p > 0:
        tokens = top_p_draw(logits, probs, decoding.top_p, key)
    else:  # argmax of the logits as they come, as audiocraft's (dividing first could round two into a tie)
        tokens = sample(logits if decoding.do_sample else raw, do_sample=decoding.do_sample, top_k=decoding.top_k,
                        key=key)
    check_tokens(tokens)
    return tokens, mx.take_along_axis(probs, tokens[..., None], axis=-1)[..., 0]


def top_p_draw(logits: mx.array, probs: mx.array, p: float, key: mx.array) -> mx.array:
    """A draw from the most likely tokens whose probabilities before each sum to at most p (audiocraft's
    sample_top_p, whose rule differs from sampling.top_p_filter's, transformers', where the mass reaches p
    exactly), made in sorted order: one sort of the vocabulary a position, not two."""
    order = mx.argsort(-logits, axis=-1)
    sorted_probs = mx.take_along_axis(probs, order, axis=-1)
    kept = mx.cumsum(sorted_probs, axis=-1) - sorted_probs <= p
    sorted_logits = mx.where(kept, mx.take_along_axis(logits, order, axis=-1), -mx.inf)
    picked = mx.random.categorical(sorted_logits, axis=-1, key=key)
    tokens = mx.take_along_axis(order, picked[..., None], axis=-1)[..., 0].astype(mx.int32)
    return mx.where(mx.isfinite(logits).all(axis=-1), tokens, NONFINITE)  # reported by check_tokens


def generate_stage(lm: MaskedLM, codes: np.ndarray, context: Context, guided: bool, stage: int, prompt_frames: int,
                   decoding: Decoding, keys: list, on_pass: Callable[[], None]) -> np.ndarray:
    """Codebook `stage` of `codes` (B, K, T), host int32, made by decoding.decoding_steps[stage] passes; returns
    the codes (trimmed to whole spans where masking is by spans, as audiocraft trims them)."""
    B, K, T = codes.shape
    mask_id, span_len = lm.pad_token_id, lm.span_len
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
            chosen_mask = np.zeros(scores.shape, bool)
            for b in range(B):
                chosen_mask[b, torch_topk(scores[b], count)] = True
            mask = np.repeat(chosen_mask, span_len, axis=-1) if by_spans else chosen_mask
        stage_codes[mask] = mask_id
        stage_codes[:, :prompt_frames] = prompt
        codes[:, stage] = stage_codes
        batch = mx.array(np.concatenate([codes, codes]) if guided else codes)
        logits = lm.stage_logits(batch, context, stage)
        if guided:
            logits = apply_guidance(logits, guidance_coefficient(ratio, decoding.max_cfg, decoding.min_cfg))
        temperature = decoding.temperature * ((steps - 1 - i) / steps)
        tokens, probs = draw(logits, decoding, temperature, keys.pop(0))
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
                  prompt: np.ndarray | None = None, progress: PassProgress | None = None) -> mx.array:
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

    for stage in range(K):
        codes = generate_stage(lm, codes, context, guided, stage, prompt_frames, decoding, keys, on_pass)
    return mx.array(codes)
