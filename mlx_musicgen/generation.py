"""Decoding codes: the step loop over the delay pattern, with classifier-free guidance and sampling.

One window of generation: the sequence starts with a column of pad ids (and any prompt codes, delayed);
each step feeds the newest column through the decoder (its KV cache holds the past), guides the logits,
samples a column of K codes and overwrites the positions the delay pattern fixes. Frames come out, undelayed,
as soon as all their codebooks are decoded. Codes stay MLX arrays throughout.
"""

from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterator

import mlx.core as mx
import numpy as np

from . import delay, longform
from .melody import window_features
from .prompt import Request, check_sampling
from .sampling import apply_guidance, sample

if TYPE_CHECKING:
    from .model import MusicGen

Progress = Callable[[int, int], None]  # called with (frames done, frames in all), the prompt's not counted
Sampler = Callable[[mx.array, mx.array], mx.array]  # (logits (B, K, vocab), key) -> tokens (B, K)


@dataclass
class GenerationConfig:
    """The sampling and length settings that generate and generate_stream share.

    duration: seconds of audio in all, the prompt included (round(duration * frame_rate) frames); one window
        up to the model's 30 s, beyond it audiocraft's windows, each continuing the last (30 - extend_stride) s.
    max_new_tokens: decoder steps, as the reference counts them (give this or duration; neither: one window).
    do_sample / temperature / top_k / top_p: sampling (greedy when do_sample is False or temperature is 0).
    guidance_scale: classifier-free guidance; 1 or less is none. seed: the same seed gives the same audio.
    """

    duration: float | None = None
    max_new_tokens: int | None = None
    do_sample: bool = True
    guidance_scale: float = 3.0
    top_k: int = 250
    top_p: float = 0.0
    temperature: float = 1.0
    seed: int | None = None
    extend_stride: float = 18.0

    @classmethod
    def with_settings(cls, config: GenerationConfig | None, settings: dict) -> GenerationConfig:
        """`config` (or the defaults) with keyword settings applied over it; a length given as a keyword
        (duration or max_new_tokens) replaces the config's length of either kind."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown generation setting(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        lengths = {"duration", "max_new_tokens"}
        if config is not None and any(settings.get(name) is not None for name in lengths):
            settings = {**{name: None for name in lengths}, **settings}
        return dataclasses.replace(config or cls(), **settings)

    def check(self, vocab_size: int | None = None) -> None:
        check_sampling(guidance_scale=self.guidance_scale, top_k=self.top_k, top_p=self.top_p,
                       temperature=self.temperature, vocab_size=vocab_size)


def make_sampler(config: GenerationConfig) -> Sampler:
    """The next-token rule of `config`: temperature, top-k, top-p and a draw, or argmax when greedy."""

    def sampler(logits: mx.array, key: mx.array) -> mx.array:
        return sample(logits, do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                      top_p=config.top_p, key=key)

    return sampler


def generate_window(
    model: MusicGen,
    context,
    guidance_scale: float | None,
    sampler: Sampler,
    prompt_codes: mx.array,
    max_new_tokens: int,
    key: mx.array,
) -> Iterator[mx.array]:
    """One generation window continuing `prompt_codes` (B, K, P) (the start column first): yields the new
    frames (B, K, n) as soon as all their codebooks are decoded. `context` is the decoder's conditioning
    (MusicGen.decoder_context; doubled rows when guided, with `guidance_scale`; None: no guidance)."""
    K, C, pad = model.num_codebooks, model.audio_channels, model.config.decoder.pad_token_id
    batch, length = prompt_codes.shape[0], prompt_codes.shape[-1] + max_new_tokens
    pattern = delay.delay_pattern(np.array(prompt_codes), length, pad, C)
    start = delay.first_free_position(pattern, prompt_codes.shape[-1])
    known = mx.array(pattern)
    last_delay = int(delay.codebook_delays(K, C)[-1]) if delay.applies(length, K, C) else 0
    total = delay.frames_out(length, K, C)
    guided = guidance_scale is not None
    cache = model.decoder.make_cache(batch * (2 if guided else 1), length + model.decoder.context_length(context))

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

    inputs = known[:, :, :start]
    for position in range(start, length):
        key, step_key = mx.random.split(key)
        logits = model.decoder(mx.concatenate([inputs, inputs]) if guided else inputs, context, cache)[:, :, -1]
        if guided:
            logits = apply_guidance(logits, guidance_scale)
        forced = known[:, :, position]
        column = mx.where(forced == delay.UNSET, sampler(logits, step_key), forced)
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


def generate_frames(model: MusicGen, request: Request, config: GenerationConfig,
                    progress: Progress | None = None) -> Iterator[mx.array]:
    """Codes (B, K, n) in order, the prompt's first, as they are decoded.

    The request's windows say what to make (see longform): by `max_new_tokens`, one window of that many decoder
    steps, as the reference counts them; by duration, windows of the model's window_frames, each continuing
    the last. The text is encoded and the sampler built once; each window has its own KV cache and seed, and
    with a melody its own chroma: the melody from the window's time offset on (see melody.window_features)."""
    K, C, pad = model.num_codebooks, model.audio_channels, model.config.decoder.pad_token_id
    # as the reference: no guidance without text or melody
    guided = (request.texts is not None or request.melody is not None) and config.guidance_scale > 1.0
    states, mask = model.conditioning(request.texts, request.num_samples, guided)
    fixed = model.decoder_context(states, mask, guided=guided) if request.melody is None else None

    def context_for(window: longform.Window):
        if fixed is not None:
            return fixed
        time_offset = window.offset / model.frame_rate if len(request.windows) > 1 else None
        chroma = window_features(request.melody, model.config.melody.features, time_offset,
                                 model.window_frames / model.frame_rate)
        return model.decoder_context(states, mask, chroma, guided)

    sampler = make_sampler(config)
    batch, prompt_frames, expected = request.num_samples, request.prompt_frames, request.total_frames
    done = prompt_frames

    def generate(index: int, context: mx.array | None, window: longform.Window) -> Iterator[mx.array]:
        nonlocal done
        wanted = window.span - window.known
        steps = request.max_new_tokens
        if steps is None:  # by frames: always delayed, as audiocraft (the reference leaves very short sequences
            # undelayed, which would make more frames than asked), then cut to the frames wanted
            steps = max(wanted + K // C - 1, 2 * (K // C) - 2 - window.known)
        seed = secrets.randbits(63) if config.seed is None else (config.seed + index * 1_000_003) % 2**63
        start = mx.full((batch, K, 1), pad, dtype=mx.int32)
        prompt = start if context is None else mx.concatenate([start, context.astype(mx.int32)], axis=2)
        scale = config.guidance_scale if guided else None
        for frames in generate_window(model, context_for(window), scale, sampler, prompt, steps,
                                      mx.random.key(seed)):
            frames = frames[:, :, :wanted]
            if frames.shape[-1] == 0:
                break
            wanted -= frames.shape[-1]
            done += frames.shape[-1]
            if progress is not None:
                progress(done - prompt_frames, expected - prompt_frames)
            yield frames

    yield from longform.extend(generate, request.windows, request.prompt_codes)
