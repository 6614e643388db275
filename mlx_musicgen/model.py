"""MusicGen: text -> T5 -> decoder with guidance over delayed codebooks -> EnCodec -> audio."""

from __future__ import annotations

import math
import secrets
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from . import audio, delay, loading
from .cpu import blas_threads_itself, split_for_cpu
from .decoder import DecoderConfig, MusicgenDecoder
from .encodec import EncodecConfig, EncodecModel
from .sampling import apply_guidance, check_tokens, sample
from .streaming import StreamingDecoder
from .t5 import T5Config, T5Encoder

DECODE_FRAMES = 500  # longer code sequences are decoded in stretches of this many frames (10 s), in flat memory
MAX_DURATION = 3600.0  # seconds: longer requests are refused as mistakes (an hour of music is a day on a laptop)
MAX_GUIDANCE = 100.0  # guidance scales above this only amplify logits towards overflow (3 is typical)
Progress = Callable[[int, int], None]  # called with (steps done, steps in all)
PromptInput = str | Path | np.ndarray  # an audio file, or samples
Audio = np.ndarray | list[np.ndarray]  # (batch, channels, samples), or one (channels, samples) per item


@dataclass
class MusicGenConfig:
    text_encoder: T5Config
    decoder: DecoderConfig
    audio_encoder: EncodecConfig
    project_text: bool  # the reference projects T5 states only when the widths differ
    max_length: int = 1500  # the generation window of the checkpoint, in decoder positions (30 s at 50 Hz)
    quantization: dict | None = None

    @classmethod
    def from_dict(cls, config: dict, generation: dict | None = None) -> MusicGenConfig:
        text = T5Config.from_dict(config["text_encoder"])
        decoder = DecoderConfig.from_dict(config["decoder"])
        audio = EncodecConfig.from_dict(config["audio_encoder"])
        project = text.d_model != decoder.hidden_size and config["decoder"].get("cross_attention_hidden_size") is None
        converted = config.get(loading.CONVERTED_KEY, {})
        max_length = (generation or {}).get("max_length") or converted.get("max_length") or 1500
        return cls(text, decoder, audio, project, int(max_length), converted.get("quantization"))


class MusicGen(nn.Module):
    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.config = config
        self.text_encoder = T5Encoder(config.text_encoder)
        if config.project_text:
            self.enc_to_dec_proj = nn.Linear(config.text_encoder.d_model, config.decoder.hidden_size)
        self.decoder = MusicgenDecoder(config.decoder)
        self.audio_encoder = EncodecModel(config.audio_encoder)
        if config.quantization:
            self.quantize_decoder(**config.quantization)
        self.tokenizer = None

    @property
    def sampling_rate(self) -> int:
        return self.config.audio_encoder.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.config.audio_encoder.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.config.decoder.audio_channels

    @property
    def num_codebooks(self) -> int:
        return self.config.decoder.num_codebooks

    # ---- loading ----

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype: mx.Dtype | None = None) -> MusicGen:
        """A converted folder, a Hub-layout folder (converted in memory) or a Hub id such as facebook/musicgen-small."""
        folder = loading.resolve(path_or_id)
        raw = loading.read_config(folder)
        config = MusicGenConfig.from_dict(raw, loading.read_generation_config(folder))
        model = cls(config)
        if loading.is_converted(raw):
            weights = loading.load_safetensors(folder / "model.safetensors")
        else:
            weights = cls.sanitize(loading.load_hf_weights(folder))
        model.load_checked(weights, folder)
        if dtype is not None:
            model.set_decoder_dtype(dtype)
        if mx.default_device() == mx.cpu:
            model.warn_if_slow_on_cpu()
            if not blas_threads_itself():
                split_for_cpu(model.decoder)
        model.tokenizer = loading.load_tokenizer(folder)
        mx.eval(model.parameters())
        return model

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Checkpoint tensor names -> ours, part by part. Unknown names pass through for the strict check."""
        parts = {
            "text_encoder.": T5Encoder.sanitize,
            "decoder.": MusicgenDecoder.sanitize,
            "audio_encoder.": EncodecModel.sanitize,
        }
        out = {k: v for k, v in weights.items() if not k.startswith(tuple(parts))}
        for prefix, part_sanitize in parts.items():
            part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
            out.update({prefix + k: v for k, v in part_sanitize(part).items()})
        return out

    def load_checked(self, weights: dict[str, mx.array], source: Path | str) -> None:
        """Strict loading: every tensor must fill a parameter of the same shape, and every parameter be filled."""
        expected = dict(tree_flatten(self.parameters()))
        unexpected = sorted(set(weights) - set(expected))
        missing = sorted(set(expected) - set(weights))
        wrong = sorted(k for k in set(weights) & set(expected) if weights[k].shape != expected[k].shape)
        problems = []
        for what, names in (("unexpected tensors", unexpected), ("missing tensors", missing), ("wrong shapes", wrong)):
            if names:
                problems.append(f"{len(names)} {what} ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})")
        if problems:
            raise loading.CheckpointError(
                f"{source} does not match the MusicGen architecture of its config: {'; '.join(problems)}."
            )
        self.load_weights(list(weights.items()), strict=True)

    def set_decoder_dtype(self, dtype: mx.Dtype) -> None:
        """Half precision for the decoder (the heavy part); T5 and EnCodec stay float32 for accuracy."""
        for module in (self.decoder, getattr(self, "enc_to_dec_proj", None)):
            if module is not None:
                module.set_dtype(dtype)

    def warn_if_slow_on_cpu(self) -> None:
        """MLX's CPU has a BLAS path for float32 products only: half precision and quantized decoders run ~10x
        slower there (they are the fast paths on Metal and CUDA)."""
        if self.config.quantization:
            kind, fix = f"{self.config.quantization['bits']}-bit quantized", "convert it again without -q"
        elif (dtype := self.decoder.layer_norm.weight.dtype) != mx.float32:
            kind, fix = str(dtype).removeprefix("mlx.core."), "load it with --dtype float32 (dtype=mx.float32)"
        else:
            return
        warnings.warn(f"this decoder is {kind}, which on a CPU runs ~10x slower than float32: {fix}", stacklevel=3)

    def quantize_decoder(self, group_size: int, bits: int) -> None:
        """Quantize the decoder's projections, heads and embeddings (those whose width divides into groups)."""

        def quantizable(path: str, module: nn.Module) -> bool:
            return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0

        nn.quantize(self.decoder, group_size=group_size, bits=bits, class_predicate=quantizable)
        self.config.quantization = {"group_size": group_size, "bits": bits}

    # ---- generation ----

    def encode_text(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        """Texts -> decoder-width states (zero at padding) and the (B, S) padding mask.

        An empty or whitespace-only text gets an empty mask (and zero states): its row is unconditional. A text
        longer than the tokenizer's limit is cut to it, with a warning, as the reference's tokenizer cuts it."""
        if self.tokenizer is None:
            raise RuntimeError("This model has no tokenizer: load it with MusicGen.from_pretrained.")
        texts = list(texts)
        limit = getattr(self.tokenizer, "model_max_length", None)
        limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 512  # T5's, when unset (1e30)
        tokens = self.tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="np")
        if tokens["input_ids"].shape[-1] >= limit:
            for i, text in enumerate(texts):
                if len(self.tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"]) > limit:
                    warnings.warn(f"text {i + 1} is longer than the text encoder's limit of {limit} tokens: only "
                                  f"its first {limit} tokens are used.", stacklevel=2)
        ids = mx.array(tokens["input_ids"])
        blank = mx.array([not text.strip() for text in texts])
        mask = mx.where(blank[:, None], 0, mx.array(tokens["attention_mask"]))
        states = self.text_encoder(ids, mask)
        if self.config.project_text:
            states = self.enc_to_dec_proj(states.astype(self.enc_to_dec_proj.weight.dtype))
        return states * mask[..., None].astype(states.dtype), mask

    def conditioning(
        self, texts: list[str] | None, num_samples: int, guided: bool
    ) -> tuple[mx.array, mx.array]:
        """Cross-attention states and mask; with guidance, unconditional rows (zero states, empty mask) follow."""
        if texts is None:
            states = mx.zeros((num_samples, 1, self.config.decoder.hidden_size))
            mask = mx.zeros((num_samples, 1), dtype=mx.int32)
        else:
            states, mask = self.encode_text(texts)
        if guided:
            states = mx.concatenate([states, mx.zeros_like(states)])
            mask = mx.concatenate([mask, mx.zeros_like(mask)])
        return states, mask

    def length_plan(self, duration: float | None, max_new_tokens: int | None, prompt_frames: int = 0) -> dict:
        """How long to generate: {"total_frames": n} for a duration (of the whole output, prompt included, as in
        audiocraft: round(duration * frame_rate) frames), or {"max_new_tokens": n} decoder steps as the reference
        counts them (frames out = prompt frames + steps + 1 - codebooks per channel). Neither: one full window."""
        if max_new_tokens is not None and duration is not None:
            raise ValueError("Give duration or max_new_tokens, not both.")
        if duration is not None:
            check_duration(duration)
            frames = round(duration * self.frame_rate)
            if frames <= prompt_frames:
                raise ValueError(
                    f"duration {duration} s is not longer than the audio prompt "
                    f"({prompt_frames / self.frame_rate:.2f} s): ask for more."
                )
            return {"total_frames": frames}
        if max_new_tokens is None:
            max_new_tokens = self.config.max_length - 1 - prompt_frames
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        return {"max_new_tokens": int(max_new_tokens)}

    @property
    def window_frames(self) -> int:
        """Frames one generation window holds: the checkpoint's max_length positions (1500 on the Hub, 29.92 s)
        less the start column and the codebook delays."""
        return delay.frames_out(self.config.max_length, self.num_codebooks, self.audio_channels)

    def window(
        self,
        texts: list[str] | None,
        *,
        num_samples: int = 1,
        prompt_codes: np.ndarray | None = None,
        max_new_tokens: int,
        seed: int | None = None,
        do_sample: bool = True,
        guidance_scale: float = 3.0,
        top_k: int = 250,
        top_p: float = 0.0,
        temperature: float = 1.0,
    ) -> Iterator[np.ndarray]:
        """One generation window with the delay pattern, continuing `prompt_codes` (batch, codebooks, frames):
        yields the new frames (batch, codebooks, n) as soon as all their codebooks are decoded."""
        guided = texts is not None and guidance_scale > 1.0  # as the reference: no guidance without text
        batch = len(texts) if texts is not None else num_samples
        states, mask = self.conditioning(texts, num_samples, guided)
        decoder = self.decoder
        text = decoder.text_context(states, mask)

        K, C, pad = self.num_codebooks, self.audio_channels, self.config.decoder.pad_token_id
        prompt = np.full((batch, K, 1), pad, dtype=np.int32)  # the start column
        if prompt_codes is not None:
            prompt = np.concatenate([prompt, np.asarray(prompt_codes, dtype=np.int32)], axis=2)
        length = prompt.shape[-1] + max_new_tokens
        pattern = delay.delay_pattern(prompt, length, pad, C)
        start = delay.first_free_position(pattern, prompt.shape[-1])
        known = mx.array(pattern)
        cache = decoder.make_cache(batch * (2 if guided else 1), length)
        key = mx.random.key(seed if seed is not None else secrets.randbits(63))

        def step(codes: mx.array, position: int, key: mx.array) -> mx.array:
            if guided:
                codes = mx.concatenate([codes, codes])
            logits = decoder(codes, text, cache)[:, :, -1]
            if guided:
                logits = apply_guidance(logits, guidance_scale)
            tokens = sample(logits, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, key=key)
            forced = known[:, :, position]
            return mx.where(forced == delay.UNSET, tokens, forced)[:, :, None]

        sequence = pattern.copy()  # decoded columns are written in as they arrive
        filled = start
        emitted = prompt.shape[-1] - 1  # the prompt's frames are the caller's already

        def new_frames() -> np.ndarray | None:
            """Only the frames completed since the last call (no per-step work over the whole sequence)."""
            nonlocal emitted
            fresh = delay.undelay(sequence[:, :, :filled], C, length, emitted)
            emitted += fresh.shape[-1]
            return fresh if fresh.shape[-1] else None

        codes, in_flight = known[:, :, :start], None
        for position in range(start, length):
            key, step_key = mx.random.split(key)
            codes = step(codes, position, step_key)
            mx.async_eval(codes)  # the next step's graph is built while this one computes
            if in_flight is not None:  # keep one step in flight, not the whole loop
                sequence[:, :, filled] = np.array(in_flight)[:, :, 0]
                filled += 1
                if (fresh := new_frames()) is not None:
                    yield fresh
            in_flight = codes
        if in_flight is not None:
            sequence[:, :, filled] = np.array(in_flight)[:, :, 0]
            filled += 1
        if (fresh := new_frames()) is not None:
            yield fresh

    def generate_frames(
        self,
        texts: list[str] | None = None,
        *,
        num_samples: int = 1,
        prompt_codes: np.ndarray | None = None,
        total_frames: int | None = None,
        max_new_tokens: int | None = None,
        extend_stride: float = 18.0,
        seed: int | None = None,
        progress: Progress | None = None,
        **sampling,
    ) -> Iterator[np.ndarray]:
        """Codes (batch, codebooks, n) in order, the prompt's first, as they are decoded.

        With `max_new_tokens`: one window of that many decoder steps, as the reference counts them. With
        `total_frames` beyond one window: audiocraft's extension, where each next window continues the last
        (window - extend_stride) seconds of codes and only its new codes are kept.
        """
        P = 0 if prompt_codes is None else prompt_codes.shape[-1]
        K, C = self.num_codebooks, self.audio_channels
        window = self.window_frames
        if max_new_tokens is not None:
            expected = delay.frames_out(1 + P + max_new_tokens, K, C)
        else:
            expected = total_frames
        stride = round(extend_stride * self.frame_rate)
        if expected > window and not 0 < stride < window - P:
            raise ValueError(
                f"extend_stride must be between 0 and the window less the audio prompt "
                f"({(window - P) / self.frame_rate:.2f} s), got {extend_stride}."
            )
        done = P
        if prompt_codes is not None:
            yield prompt_codes

        def report(frames: np.ndarray) -> np.ndarray:
            nonlocal done
            done += frames.shape[-1]
            if progress is not None:
                progress(done - P, expected - P)
            return frames

        if max_new_tokens is not None:
            for frames in self.window(texts, num_samples=num_samples, prompt_codes=prompt_codes,
                                      max_new_tokens=max_new_tokens, seed=seed, **sampling):
                yield report(frames)
            return

        offset, index, context = 0, 0, prompt_codes
        while offset + (0 if context is None else context.shape[-1]) < total_frames:
            span = min(total_frames - offset, window)
            known = 0 if context is None else context.shape[-1]
            new = []
            window_seed = None if seed is None else (seed + index * 1_000_003) % 2**63
            steps = span - known + K // C - 1
            for frames in self.window(texts, num_samples=num_samples, prompt_codes=context,
                                      max_new_tokens=steps, seed=window_seed, **sampling):
                new.append(frames)
                yield report(frames)
            codes = np.concatenate(([] if context is None else [context]) + new, axis=2)
            context = codes[:, :, stride:]
            offset += stride
            index += 1

    def generate_tokens(
        self,
        texts: list[str] | None = None,
        *,
        num_samples: int = 1,
        prompt_codes: np.ndarray | None = None,
        max_new_tokens: int | None = None,
        total_frames: int | None = None,
        progress: Progress | None = None,
        **kwargs,
    ) -> np.ndarray:
        """All codes at once (batch, codebooks, frames), the prompt's first; see generate_frames."""
        return np.concatenate(
            list(self.generate_frames(texts, num_samples=num_samples, prompt_codes=prompt_codes,
                                      max_new_tokens=max_new_tokens, total_frames=total_frames,
                                      progress=progress, **kwargs)),
            axis=2,
        )

    def decode(self, codes: np.ndarray | mx.array) -> np.ndarray:
        """(batch, codebooks, frames) -> (batch, channels, samples) float32; stereo codebooks are L0, R0, L1, ...

        Long inputs are decoded a stretch at a time (exactly the same samples), so memory does not grow with
        the duration."""
        codes = np.asarray(codes)
        check_tokens(codes)  # NaN/inf logits are reported, not decoded into noise
        if codes.shape[-1] <= 2 * DECODE_FRAMES:
            C = self.audio_channels
            channels = [self.audio_encoder.decode(mx.array(codes[:, c::C])) for c in range(C)]
            return np.array(mx.concatenate(channels, axis=1).astype(mx.float32))
        stretches = (codes[:, :, i : i + DECODE_FRAMES] for i in range(0, codes.shape[-1], DECODE_FRAMES))
        return np.concatenate(list(self.decode_stream(stretches)), axis=-1)

    def decode_stream(self, codes: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Codes arriving a stretch at a time -> the audio that each makes final, (batch, channels, samples)."""
        C = self.audio_channels
        decoders = [StreamingDecoder(self.audio_encoder) for _ in range(C)]

        def joined(pieces: list[mx.array]) -> np.ndarray:
            return np.array(mx.concatenate(pieces, axis=1).astype(mx.float32))

        for stretch in codes:
            check_tokens(stretch)  # NaN/inf logits are reported, not decoded into noise
            audio = joined([d.push(mx.array(stretch[:, c::C])) for c, d in enumerate(decoders)])
            if audio.shape[-1]:
                yield audio
        audio = joined([d.flush() for d in decoders])
        if audio.shape[-1]:
            yield audio

    def encode_audio(self, samples: np.ndarray) -> np.ndarray:
        """(batch, channels, samples) at the model's rate -> codes (batch, codebooks, frames); stereo channels are
        encoded apart and their codebooks interleaved L0, R0, L1, ..."""
        C = self.audio_channels
        per_channel = self.num_codebooks // C
        codes = [self.audio_encoder.encode(mx.array(samples[:, c : c + 1]), per_channel) for c in range(C)]
        return np.array(mx.stack(codes, axis=2).reshape(samples.shape[0], self.num_codebooks, -1))

    def prepare_prompt(
        self, audio_prompt: PromptInput | list[PromptInput], sampling_rate: int | None
    ) -> tuple[np.ndarray, list[int]]:
        """Audio prompt(s) -> (batch, channels, samples) at the model's rate, left-padded with silence to the
        longest as the reference's processor pads them, and each item's padding in samples.

        Refused: an empty list, unreadable files, odd sample rates, empty, silent or non-finite audio, and a
        prompt that does not fit in the model's window with room to continue it."""
        items = audio_prompt if isinstance(audio_prompt, list) else [audio_prompt]
        if isinstance(audio_prompt, np.ndarray) and audio_prompt.ndim == 3:
            items = list(audio_prompt)
        if not items:
            raise ValueError("the list of audio prompts is empty.")
        window = self.window_frames / self.frame_rate
        prompts = []
        for i, item in enumerate(items):
            if isinstance(item, (str, Path)):
                name = f"audio prompt {item}"
                item, rate = audio.read_audio(item)
            else:
                name = f"audio prompt {i + 1}" if len(items) > 1 else "the audio prompt"
                rate = self.sampling_rate if sampling_rate is None else sampling_rate
            item = np.asarray(item, dtype=np.float32)
            audio.check_prompt(item, rate, name)
            seconds = item.shape[-1] / rate
            if seconds >= window:
                raise ValueError(
                    f"{name} is {seconds:.2f} s long, but the model's window is {window:.2f} s and the prompt must "
                    f"leave room in it to continue: trim the prompt to its last few seconds (e.g. 10 s)."
                )
            item = audio.to_channels(item, self.audio_channels)
            prompts.append(audio.resample(item, rate, self.sampling_rate))
        longest = max(p.shape[-1] for p in prompts)
        padding = [longest - p.shape[-1] for p in prompts]
        batch = np.stack([np.pad(p, ((0, 0), (n, 0))) for p, n in zip(prompts, padding)])
        return batch, padding

    def prepare(
        self,
        texts: list[str] | str | None,
        audio_prompt: PromptInput | list[PromptInput] | None,
        audio_prompt_sr: int | None,
        num_samples: int,
        duration: float | None,
        max_new_tokens: int | None,
        sampling: dict,
    ) -> tuple[list[str] | None, dict, list[int]]:
        """Checks and normalises generate's arguments: -> (texts, generate_frames' keyword arguments, each item's
        prompt padding in samples)."""
        if isinstance(texts, str):
            texts = [texts]
        texts, num_samples = check_texts(texts, num_samples)
        if duration is not None:
            check_duration(duration)
        check_sampling(guidance_scale=sampling["guidance_scale"], top_k=sampling["top_k"], top_p=sampling["top_p"],
                       temperature=sampling["temperature"], vocab_size=self.config.decoder.vocab_size)
        prompt_codes, padding = None, []
        if audio_prompt is not None:
            prompt_audio, padding = self.prepare_prompt(audio_prompt, audio_prompt_sr)
            if texts is not None and len(texts) != len(prompt_audio):
                raise ValueError(f"{len(texts)} texts for {len(prompt_audio)} audio prompts: give one text per prompt.")
            prompt_codes = self.encode_audio(prompt_audio)
            num_samples = len(prompt_audio)
        prompt_frames = 0 if prompt_codes is None else prompt_codes.shape[-1]
        plan = self.length_plan(duration, max_new_tokens, prompt_frames)
        return texts, dict(num_samples=num_samples, prompt_codes=prompt_codes, **plan), padding

    def generate(
        self,
        texts: list[str] | str | None = None,
        *,
        audio_prompt: PromptInput | list[PromptInput] | None = None,
        audio_prompt_sr: int | None = None,
        num_samples: int = 1,
        duration: float | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
        guidance_scale: float = 3.0,
        top_k: int = 250,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int | None = None,
        extend_stride: float = 18.0,
        return_tokens: bool = False,
        progress: Progress | None = None,
    ) -> Audio | tuple[Audio, np.ndarray]:
        """Texts (or None for unconditional) -> audio (batch, channels, samples) [, codes (batch, codebooks, frames)].

        `duration` in seconds gives round(duration * frame_rate) frames in all; beyond the model's window
        (`window_frames`, 30 s) each next window continues the last (window - extend_stride) seconds.
        `max_new_tokens` counts decoder steps as the reference does. Greedy when do_sample is False or
        temperature is 0.

        `audio_prompt`: a file path or an array ((samples,) or (channels, samples) at `audio_prompt_sr`, default
        the model's rate), or a list of them; generation continues it and the audio returned starts with it.
        Prompts of different lengths are padded on the left with silence, and each item's audio is returned
        without its padding, as a list of (channels, samples) arrays.
        """
        sampling = dict(do_sample=do_sample, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                        temperature=temperature)
        texts, plan, padding = self.prepare(texts, audio_prompt, audio_prompt_sr, num_samples, duration,
                                            max_new_tokens, sampling)
        codes = self.generate_tokens(texts, **plan, extend_stride=extend_stride, seed=seed, progress=progress,
                                     **sampling)
        out = trim_padding(self.decode(codes), padding)
        return (out, codes) if return_tokens else out

    def generate_stream(
        self,
        texts: list[str] | str | None = None,
        *,
        chunk_duration: float = 1.0,
        audio_prompt: PromptInput | list[PromptInput] | None = None,
        audio_prompt_sr: int | None = None,
        num_samples: int = 1,
        duration: float | None = None,
        max_new_tokens: int | None = None,
        do_sample: bool = True,
        guidance_scale: float = 3.0,
        top_k: int = 250,
        top_p: float = 0.0,
        temperature: float = 1.0,
        seed: int | None = None,
        extend_stride: float = 18.0,
        progress: Progress | None = None,
    ) -> Iterator[Audio]:
        """generate, heard while it is made: yields audio chunks (batch, channels, samples), each about
        `chunk_duration` seconds, as soon as they are final; joined, they are exactly generate's output.
        With prompts of different lengths, each chunk is a list with one (channels, samples) array per item."""
        if not (math.isfinite(chunk_duration) and chunk_duration > 0):
            raise ValueError(f"chunk_duration must be a positive number of seconds, got {chunk_duration}.")
        sampling = dict(do_sample=do_sample, guidance_scale=guidance_scale, top_k=top_k, top_p=top_p,
                        temperature=temperature)
        texts, plan, padding = self.prepare(texts, audio_prompt, audio_prompt_sr, num_samples, duration,
                                            max_new_tokens, sampling)
        frames = self.generate_frames(texts, **plan, extend_stride=extend_stride, seed=seed, progress=progress,
                                      **sampling)
        chunk_frames = max(1, round(chunk_duration * self.frame_rate))
        trimmed = [0] * len(padding)  # samples of padding already dropped, per item
        for audio in self.decode_stream(regroup(frames, chunk_frames)):
            if not any(padding):
                yield audio
                continue
            items = []
            for i, item in enumerate(audio):
                drop = min(padding[i] - trimmed[i], item.shape[-1])
                trimmed[i] += drop
                items.append(item[:, drop:])
            yield items


def regroup(frames: Iterable[np.ndarray], size: int) -> Iterator[np.ndarray]:
    """Code stretches of any lengths -> stretches of `size` frames (the last may be shorter)."""
    pending: list[np.ndarray] = []
    held = 0
    for stretch in frames:
        pending.append(stretch)
        held += stretch.shape[-1]
        while held >= size:
            joined = np.concatenate(pending, axis=-1)
            yield joined[..., :size]
            pending, held = [joined[..., size:]], held - size
    if held:
        yield np.concatenate(pending, axis=-1)


def trim_padding(audio: np.ndarray, padding: list[int]) -> Audio:
    """Unequal prompts: strip each item's leading silence, as the reference's processor does."""
    if not any(padding):
        return audio
    return [item[:, pad:] for item, pad in zip(audio, padding)]


def check_sampling(
    *, guidance_scale: float, top_k: int, top_p: float, temperature: float, vocab_size: int | None = None
) -> None:
    """Reject sampling settings that cannot mean anything, with the valid range in the message (a ValueError).
    Without `vocab_size` (before a model is loaded) top_k is checked against 0 only."""

    def real(x) -> bool:
        return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool)

    if not (real(guidance_scale) and 0 <= guidance_scale <= MAX_GUIDANCE):
        raise ValueError(f"guidance_scale must be between 0 and {MAX_GUIDANCE:g} (3 is typical; 1 or less: no "
                         f"guidance), got {guidance_scale}.")
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)):
        raise ValueError(f"top_k must be a whole number (0: off), got {top_k!r}.")
    if top_k < 0 or (vocab_size is not None and top_k > vocab_size):
        upper = f"the vocabulary size {vocab_size}" if vocab_size is not None else "the vocabulary size"
        raise ValueError(f"top_k must be between 0 (off) and {upper}, got {top_k}.")
    if not (real(top_p) and 0.0 <= top_p <= 1.0):
        raise ValueError(f"top_p must be between 0 (off) and 1, got {top_p}.")
    if not (real(temperature) and math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}.")


def check_duration(duration: float) -> None:
    """A duration in seconds must be a number > 0 and at most MAX_DURATION (a ValueError naming the bound)."""
    ok = isinstance(duration, (int, float, np.integer, np.floating)) and not isinstance(duration, bool)
    if not (ok and 0 < duration <= MAX_DURATION):
        raise ValueError(f"duration must be a number of seconds above 0 and at most {MAX_DURATION:g} (one hour), "
                         f"got {duration}.")


def check_texts(texts: list[str] | None, num_samples: int) -> tuple[list[str] | None, int]:
    """Validate generate's texts and num_samples -> (texts, num_samples). All texts empty or whitespace:
    unconditional music (None), with a warning; some of them: those rows are unconditional, with a warning."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) or num_samples < 1:
        raise ValueError(f"num_samples must be a whole number >= 1, got {num_samples!r}.")
    if texts is None:
        return None, int(num_samples)
    texts = list(texts)
    if not texts:
        raise ValueError("texts is an empty list: give at least one text, or None for unconditional music.")
    if not all(isinstance(t, str) for t in texts):
        raise ValueError("texts must be strings (or None for unconditional music).")
    blank = [i + 1 for i, t in enumerate(texts) if not t.strip()]
    if len(blank) == len(texts):
        warnings.warn("the text is empty: generating unconditional music." if len(texts) == 1 else
                      "all texts are empty: generating unconditional music.", stacklevel=4)
        return None, len(texts)
    if blank:
        warnings.warn(f"text(s) {', '.join(map(str, blank))} are empty: generated unconditionally.", stacklevel=4)
    return texts, len(texts)
