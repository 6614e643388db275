"""Decoding codes: the step loop over the delay pattern, with classifier-free guidance and sampling.

One window of generation: the sequence starts with a column of pad ids (and any prompt codes, delayed);
each step feeds the newest column through the decoder (its KV cache holds the past), guides the logits,
samples a column of K codes and overwrites the positions the delay pattern fixes. Frames come out, undelayed,
as soon as all their codebooks are decoded. Codes stay MLX arrays throughout.
"""

from __future__ import annotations

import os
import secrets
from functools import partial
from typing import Callable, Iterator, Protocol

import mlx.core as mx
import numpy as np

from . import delay, longform
from .decoder import SPAN, Context, KVCache
from .request import Request
from .settings import GenerationConfig
from .sampling import apply_guidance, check_tokens, sample

Progress = Callable[[int, int], None]  # called with (frames done, frames in all), the prompt's not counted
Sampler = Callable[[mx.array, mx.array], mx.array]  # (logits (B, K, vocab), key) -> tokens (B, K)
Contexts = Callable[[longform.Window], Context]  # the decoder's conditioning for each window


class DelayedLM(Protocol):
    """What the step loop needs of a decoder over K delayed codebooks (decoder.MusicgenDecoder and its forms)."""

    num_codebooks: int
    audio_channels: int
    pad_token_id: int

    def make_cache(self, batch: int, max_length: int) -> list: ...

    def __call__(self, codes: mx.array, context: Context, cache: list | None = None) -> mx.array:
        """codes (B, K, T) -> logits (B, K, T, vocab), positions continuing from the cache's."""


def make_sampler(config: GenerationConfig) -> Sampler:
    """The next-token rule of `config` (resolved: GenerationConfig.for_model): temperature, top-k, top-p and a
    draw, or argmax when greedy."""
    if None in (config.top_k, config.top_p, config.temperature):
        raise ValueError("the sampling settings are the model's to fill in: resolve them with "
                         "GenerationConfig.for_model first.")

    def sampler(logits: mx.array, key: mx.array) -> mx.array:
        return sample(logits, do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                      top_p=config.top_p, key=key)

    return sampler


Step = Callable[[mx.array, mx.array, mx.array], tuple[mx.array, mx.array]]


STEP_CHOICES = ("numpy", "compiled", "op-by-op")  # MLX_MUSICGEN_STEP


def requested_step() -> str | None:
    """MLX_MUSICGEN_STEP: "numpy" (a CPU's numpy step, cpu.numpy_decoder; elsewhere the compiled step),
    "compiled" (decoding_step's compiled step) or "op-by-op" (the same step, uncompiled: where the compiled step's
    mask over its span costs kernels, as on CUDA, docs/performance.md); unset or empty: chosen by timing on a CPU,
    compiled elsewhere."""
    choice = os.environ.get("MLX_MUSICGEN_STEP", "")
    if choice not in ("", *STEP_CHOICES):
        raise ValueError(f"MLX_MUSICGEN_STEP={choice!r} is not one of {', '.join(STEP_CHOICES)}: set one, or unset it "
                         f"for the default (chosen by timing on a CPU)")
    return choice or None


def decoding_step(lm: DelayedLM, context: Context, guidance_scale: float | None, sampler: Sampler,
                  cache: list, compiled: bool = True) -> Step:
    """One decoding step: (codes (B, K, L), forced (B, K), key) -> (the next column (B, K), the next key): the
    decoder over the newest codes (doubled rows when guided), guidance, sampling with the step's key, and the
    codes the delay pattern forces.

    Where every cache can be (decoder.KVCache), a step of one new position is a single compiled function of
    static shapes: the caches are its captured state, the offset an input, and it attends over the cache in
    spans of decoder.SPAN positions, so it is traced once per span and replayed without Python; the first step
    (with a prompt or a melody's prefix, of many positions) runs as it is. `compiled=False`: every step as it is
    (the same numbers, op by op)."""
    guided = guidance_scale is not None

    def step(codes: mx.array, forced: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        key, step_key = mx.random.split(key)
        logits = lm(mx.concatenate([codes, codes]) if guided else codes, context, cache)[:, :, -1]
        if guided:
            logits = apply_guidance(logits, guidance_scale)
        return mx.where(forced == delay.UNSET, sampler(logits, step_key), forced), key

    if not compiled or not all(isinstance(c, KVCache) for c in cache):
        return step
    state = [c.state for c in cache]

    @partial(mx.compile, inputs=state, outputs=state)
    def static_step(codes: mx.array, forced: mx.array, key: mx.array, position: mx.array, span: int):
        filled = mx.arange(span) <= position  # the positions attended once this one is written
        for c in cache:
            c.at = (position, filled)
        try:
            return step(codes, forced, key)
        finally:
            for c in cache:
                c.at = None

    def run(codes: mx.array, forced: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        offset = cache[0].offset
        if codes.shape[-1] > 1 or offset == 0:  # the first step: a prompt, a prefix, a trace of its own
            return step(codes, forced, key)
        if offset >= cache[0].max_length:  # a compiled write past the end would be dropped, not refused
            raise ValueError(f"KV cache holds {cache[0].max_length} positions; asked for {offset + 1}.")
        span = min(-(-(offset + 1) // SPAN) * SPAN, cache[0].max_length)
        out = static_step(codes, forced, key, mx.array(offset, dtype=mx.int32), span)
        for c in cache:
            c.offset += 1
        return out

    return run


def generate_window(
    lm: DelayedLM,
    context: Context,
    guidance_scale: float | None,
    sampler: Sampler,
    prompt_codes: mx.array,
    max_new_tokens: int,
    key: mx.array,
) -> Iterator[mx.array]:
    """One generation window continuing `prompt_codes` (B, K, P) (the start column first): yields the new
    frames (B, K, n) as soon as all their codebooks are decoded. `context` is the decoder's conditioning
    (doubled rows when guided, with `guidance_scale`; None: no guidance). A code sampled from non-finite
    logits is sampling.NONFINITE: the caller checks the codes (sampling.check_tokens) where it waits for them."""
    K, C, pad = lm.num_codebooks, lm.audio_channels, lm.pad_token_id
    batch, length = prompt_codes.shape[0], prompt_codes.shape[-1] + max_new_tokens
    pattern = delay.delay_pattern(np.array(prompt_codes), length, pad, C)
    start = delay.first_free_position(pattern, prompt_codes.shape[-1])
    known = mx.array(pattern)
    last_delay = int(delay.codebook_delays(K, C)[-1]) if delay.applies(length, K, C) else 0
    total = delay.frames_out(length, K, C)
    guided = guidance_scale is not None
    cache = lm.make_cache(batch * (2 if guided else 1), length + context.length)

    columns = [known[:, :, i] for i in range(start)]  # the sequence so far, one (B, K) column per position
    emitted = prompt_codes.shape[-1] - 1  # frames already out: the prompt's are the caller's

    def frames_until(position: int) -> mx.array | None:
        """The frames completed by the columns up to `position`, undelayed from the columns since the last."""
        nonlocal emitted
        ready = min(position - last_delay, total)
        if ready <= emitted:
            return None
        frames = delay.undelay(mx.stack(columns[emitted : ready + last_delay + 1], axis=-1), C, length)
        emitted = ready
        return frames

    step = decoding_step(lm, context, guidance_scale, sampler, cache, compiled=requested_step() != "op-by-op")
    inputs = known[:, :, :start]
    try:
        for position in range(start, length):
            column, key = step(inputs, known[:, :, position], key)
            mx.async_eval(column)  # the next step's graph is built while this one computes
            columns.append(column)
            inputs = column[:, :, None]
            if position > start:  # keep one step in flight: wait for the previous one only
                mx.eval(columns[-2])
                if (frames := frames_until(position - 1)) is not None:
                    yield frames
        mx.eval(columns[-1])
        if (frames := frames_until(length - 1)) is not None:
            yield frames
    finally:
        # Left early (a cancel, an interrupt): the step in flight is finished here, not abandoned to MLX's
        # worker, which a process that exits right after would otherwise tear down mid-task.
        mx.synchronize()


def generate_frames(lm: DelayedLM, contexts: Contexts, guided: bool, request: Request, config: GenerationConfig,
                    progress: Progress | None = None) -> Iterator[mx.array]:
    """Codes (B, K, n) in order, the prompt's first, as they are decoded.

    The request's windows say what to make (see longform): by `max_new_tokens`, one window of that many decoder
    steps, as the reference counts them; by duration, windows of the model's window, each continuing the last.
    `contexts` gives each window's conditioning (doubled rows when `guided`); the sampler is built once; each
    window has its own KV cache and seed."""
    K, C, pad = lm.num_codebooks, lm.audio_channels, lm.pad_token_id
    sampler = make_sampler(config)
    batch, prompt_frames, expected = request.num_samples, request.prompt_frames, request.total_frames
    done = prompt_frames
    scale = config.guidance_scale if guided else None

    def generate(index: int, prompt: mx.array | None, window: longform.Window) -> Iterator[mx.array]:
        nonlocal done
        wanted = window.span - window.known
        steps = request.max_new_tokens
        if steps is None:  # by frames: always delayed, as audiocraft (the reference leaves very short sequences
            # undelayed, which would make more frames than asked), then cut to the frames wanted
            steps = max(wanted + K // C - 1, 2 * (K // C) - 2 - window.known)
        if index > 0:  # the last window's codes, made here: NaN/inf logits are reported, not continued
            check_tokens(prompt)
        seed = secrets.randbits(63) if config.seed is None else (config.seed + index * 1_000_003) % 2**63
        start = mx.full((batch, K, 1), pad, dtype=mx.int32)
        codes = start if prompt is None else mx.concatenate([start, prompt.astype(mx.int32)], axis=2)
        for frames in generate_window(lm, contexts(window), scale, sampler, codes, steps, mx.random.key(seed)):
            frames = frames[:, :, :wanted]
            if frames.shape[-1] == 0:
                break
            wanted -= frames.shape[-1]
            done += frames.shape[-1]
            if progress is not None:
                progress(done - prompt_frames, expected - prompt_frames)
            yield frames

    prompt = None if request.prompt_codes is None else mx.array(request.prompt_codes)
    yield from longform.extend(generate, request.windows, prompt)
