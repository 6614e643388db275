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
        with self.products():
            x = self.add_positions(self.embed(codes), 0)
            mask = self.stage_mask(stage, codes.shape[-1], x.dtype)
            for i, layer in enumerate(self.layers):
                x = layer(x, context.text[i], None, mask)
            logits = self.logits(x)
            mx.eval(logits)
        return logits


class MaskedLM(Protocol):
    """What the passes need of the model: the mask token, and logits of every position of a whole clip."""

    num_codebooks: int
    pad_token_id: int  # the mask token
    span_len: int

    def __call__(self, codes: mx.array, context: Context, stage: int) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab), attending as `stage` does."""


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


def descending_order(keys: np.ndarray) -> np.ndarray:
    """Indices of `keys` (1-D) from the largest, ties in the order torch's CPU argsort(descending=True) gives them
    (which decides which of equally scored spans are masked): libstdc++'s std::sort (introsort) of (key, index)
    pairs by key. Without ties, any sort gives that order."""
    if len(np.unique(keys)) == len(keys):
        return np.argsort(-keys, kind="stable")
    pairs = [(float(key), i) for i, key in enumerate(keys)]
    introsort(pairs)
    return np.array([i for _, i in pairs], dtype=np.int64)


def introsort(a: list, threshold: int = 16) -> None:
    """libstdc++'s std::sort of `a` by `before` (descending keys), in place: median-of-three quicksort down to
    runs of `threshold` (pivot_cut), then one insertion sort."""
    def loop(first: int, last: int, depth: int) -> None:
        while last - first > threshold:
            cut = pivot_cut(a, first, last, depth)
            if cut is None:
                return
            depth -= 1
            loop(cut, last, depth)
            last = cut

    n = len(a)
    if n < 2:
        return
    loop(0, n, depth_limit(n))
    insertion_sort(a, 0, min(n, threshold))
    for i in range(threshold, n):
        linear_insert(a, i)


def depth_limit(n: int) -> int:
    """libstdc++'s bound on quicksort's depth: 2 floor(log2 n)."""
    return 2 * (n.bit_length() - 1)


def pivot_cut(a: list, first: int, last: int, depth: int) -> int | None:
    """One step of libstdc++'s introsort and introselect on a[first:last]: the median of three moved to the
    front and the rest partitioned around it; returns the cut. At the depth limit (which median-of-three pivots
    do not reach on such short score rows) the range is sorted outright instead (libstdc++ heapsorts it), and
    None is returned."""
    if depth == 0:
        a[first:last] = sorted(a[first:last], key=lambda pair: -pair[0])
        return None
    median_to_first(a, first, first + 1, first + (last - first) // 2, last - 1)
    return partition(a, first + 1, last, first)


def median_to_first(a: list, result: int, i: int, j: int, k: int) -> None:
    """libstdc++'s __move_median_to_first: the median of a[i], a[j], a[k] swapped into a[result]."""
    if before(a[i], a[j]):
        pick = j if before(a[j], a[k]) else k if before(a[i], a[k]) else i
    else:
        pick = i if before(a[i], a[k]) else k if before(a[j], a[k]) else j
    a[result], a[pick] = a[pick], a[result]


def partition(a: list, first: int, last: int, pivot: int) -> int:
    """libstdc++'s __unguarded_partition of a[first:last] around a[pivot]."""
    while True:
        while before(a[first], a[pivot]):
            first += 1
        last -= 1
        while before(a[pivot], a[last]):
            last -= 1
        if first >= last:
            return first
        a[first], a[last] = a[last], a[first]
        first += 1


def linear_insert(a: list, last: int) -> None:
    """libstdc++'s __unguarded_linear_insert: a[last] moved down past the items it goes before."""
    value = a[last]
    while before(value, a[last - 1]):
        a[last] = a[last - 1]
        last -= 1
    a[last] = value


def insertion_sort(a: list, first: int, last: int) -> None:
    """libstdc++'s __insertion_sort of a[first:last]."""
    for i in range(first + 1, last):
        if before(a[i], a[first]):
            a[first + 1 : i + 1], a[first] = a[first:i], a[i]
        else:
            linear_insert(a, i)


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
    sample_top_p), made in sorted order: one sort of the vocabulary a position, not two."""
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
        logits = lm(batch, context, stage)[:, stage]
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


def torch_topk(keys: np.ndarray, k: int) -> np.ndarray:
    """The indices of the k largest of `keys` (1-D) that torch's CPU topk picks, ties included (which decides
    which of equally scored spans are masked): libstdc++'s partial_sort (k * 64 <= n) or nth_element of
    (key, index) pairs by key. Without ties at the k-th key, any selection gives that set."""
    order = np.argsort(-keys, kind="stable")
    if k >= len(keys) or keys[order[k - 1]] != keys[order[k]]:
        return order[:k]
    pairs = [(float(key), i) for i, key in enumerate(keys)]
    (heap_select if k * 64 <= len(pairs) else nth_element)(pairs, k)
    return np.array([i for _, i in pairs[:k]], dtype=np.int64)


def before(x: tuple, y: tuple) -> bool:
    """torch's comparison for the largest: x's key above y's."""
    return x[0] > y[0]


def nth_element(a: list, k: int) -> None:
    """libstdc++'s std::nth_element(a, a + k - 1, end) by `before`: introselect (pivot_cut), then an insertion
    sort of the last few."""
    first, last, nth = 0, len(a), k - 1
    depth = depth_limit(len(a))
    while last - first > 3:
        cut = pivot_cut(a, first, last, depth)
        if cut is None:
            return
        depth -= 1
        if cut <= nth:
            first = cut
        else:
            last = cut
    insertion_sort(a, first, last)


def heap_select(a: list, k: int) -> None:
    """The first k of libstdc++'s std::partial_sort(a, a + k, end) by `before` (their set; its final sort of
    them is left out): make_heap of the first k, then each later item that beats the heap's top replaces it."""
    for parent in range((k - 2) // 2, -1, -1):
        adjust_heap(a, parent, k, a[parent])
    for i in range(k, len(a)):
        if before(a[i], a[0]):
            value, a[i] = a[i], a[0]
            adjust_heap(a, 0, k, value)


def adjust_heap(a: list, hole: int, length: int, value: tuple) -> None:
    """libstdc++'s __adjust_heap then __push_heap: sift the hole down to a leaf, then `value` up."""
    top, child = hole, hole
    while child < (length - 1) // 2:
        child = 2 * (child + 1)
        if before(a[child], a[child - 1]):
            child -= 1
        a[hole], hole = a[child], child
    if length % 2 == 0 and child == (length - 2) // 2:
        child = 2 * (child + 1)
        a[hole], hole = a[child - 1], child - 1
    parent = (hole - 1) // 2
    while hole > top and before(a[parent], value):
        a[hole], hole = a[parent], parent
        parent = (hole - 1) // 2
    a[hole] = value
