"""The front door: MusicGen.from_pretrained(...) then generate, generate_stream, generate_tokens and decode.

A MusicGen holds the model (model.MusicGenModel: T5, the decoder, EnCodec), its tokenizer and its config; it is
not itself a module. Every generation takes one path: the request is checked (request.prepare), the text and
melody become the decoder's context, the step loop (generation.generate_frames) makes codes, and EnCodec turns
them into audio, all at once, chunk by chunk, or not at all (codes out).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import numpy as np

from . import cpu, loading, lora
from .decoder import Context, MusicgenDecoder
from .encodec import EncodecModel
from .generation import DelayedLM, Progress, generate_frames
from .longform import Window
from .magnet import Decoding, generate_clip
from .melody import window_features
from .model import MusicGenConfig, MusicGenModel
from .request import ModelShape, PromptInput, Request, prepare, trim_padding
from .sampling import check_tokens
from .settings import GenerationConfig
from .streaming import decode_stream, regroup
from .t5 import T5Encoder, TextEncoder

DECODE_FRAMES = 500  # codes are decoded a stretch of this many frames (10 s) at a time, in flat memory
Audio = np.ndarray | list[np.ndarray]  # (batch, channels, samples), or one (channels, samples) per item


def tokenize(tokenizer, texts: list[str]) -> tuple[mx.array, mx.array]:
    """Texts -> T5 token ids (B, S) and their mask (B, S), padded to the longest.

    An empty or whitespace-only text gets an empty mask: its row is unconditional. A text longer than the
    tokenizer's limit is cut to it, with a warning, as the reference's tokenizer cuts it."""
    limit = getattr(tokenizer, "model_max_length", None)
    limit = limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 512  # T5's, when unset (1e30)
    tokens = tokenizer(texts, padding=True, truncation=True, max_length=limit, return_tensors="np")
    if tokens["input_ids"].shape[-1] >= limit:
        for i, text in enumerate(texts):
            if len(tokenizer(text, truncation=True, max_length=limit + 1)["input_ids"]) > limit:
                warnings.warn(f"text {i + 1} is longer than the text encoder's limit of {limit} tokens: only "
                              f"its first {limit} tokens are used.", stacklevel=3)
    blank = mx.array([not text.strip() for text in texts])
    return mx.array(tokens["input_ids"]), mx.where(blank[:, None], 0, mx.array(tokens["attention_mask"]))


class MusicGen:
    """A MusicGen checkpoint ready to make music: its model, tokenizer and config."""

    def __init__(self, model: MusicGenModel, tokenizer=None, lm: DelayedLM | None = None,
                 t5: TextEncoder | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.lm = model.decoder if lm is None else lm  # what the step loop decodes with (cpu.optimize_for_cpu)
        self.t5 = model.text_encoder if t5 is None else t5  # what encodes the texts (cpu.text_encoder_for_cpu)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype: mx.Dtype | None = None,
                        adapter: str | Path | None = None, portable: bool | None = None,
                        checkpoint_format: str = "auto", text_encoder: str | Path | None = None) -> MusicGen:
        """A converted folder, a folder in transformers' layout or with audiocraft's files (converted in memory),
        or a Hub id such as facebook/musicgen-small or facebook/audiogen-medium; `adapter`: a fine-tune's output
        folder (finetune.py --adapter-path), a PEFT LoRA folder or its Hub id, merged into the weights.

        `checkpoint_format`: "auto" reads transformers' files where a repository has both formats, "audiocraft"
        its state_dict.bin and compression_state_dict.bin. `text_encoder`: for audiocraft's files, a T5 folder
        (or Hub id) instead of the one their config names (from the Hub, or its cache when offline).

        On a CPU, the modules are swapped for their fast CPU forms (see cpu), unless `portable` (by default
        MLX_MUSICGEN_PORTABLE=1) asks for the portable model that Metal and CUDA run."""
        model, tokenizer = loading.load_model(path_or_id, dtype=dtype, checkpoint_format=checkpoint_format,
                                              text_encoder=text_encoder)
        if adapter is not None:
            lora.load_adapters(model, adapter, model_name=path_or_id)
            lora.fuse_lora(model)
        portable = cpu.portable_requested() if portable is None else portable
        lm = t5 = None
        if mx.default_device() == mx.cpu:
            cpu.warn_if_slow(model.decoder, model.config.quantization)
            if not portable:
                lm = cpu.optimize_for_cpu(model.decoder, model.audio_encoder)
                t5 = cpu.text_encoder_for_cpu(model.text_encoder)
        mx.eval(model.parameters())
        return cls(model, tokenizer, lm, t5)

    def use_cpu_forms_for_encoding(self) -> None:
        """On a CPU (unless MLX_MUSICGEN_PORTABLE=1), EnCodec and T5, the parts that encode clips and captions,
        take their CPU forms (the same functions; EnCodec encodes ~4x faster) while the decoder stays as it is:
        fine-tuning trains the portable decoder, and prepares its data so."""
        if mx.default_device() == mx.cpu and not cpu.portable_requested():
            cpu.optimize_encodec(self.audio_encoder)
            self.t5 = cpu.text_encoder_for_cpu(self.text_encoder)

    # ---- the parts and what they make

    @property
    def config(self) -> MusicGenConfig:
        return self.model.config

    @property
    def text_encoder(self) -> T5Encoder:
        return self.model.text_encoder

    @property
    def decoder(self) -> MusicgenDecoder:
        return self.model.decoder

    @property
    def audio_encoder(self) -> EncodecModel:
        return self.model.audio_encoder

    @property
    def family(self) -> str:
        """"musicgen" (text to music) or "audiogen" (text to sound): which defaults its generations take."""
        return self.config.family

    @property
    def sampling_rate(self) -> int:
        return self.config.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.config.frame_rate

    @property
    def audio_channels(self) -> int:
        return self.config.decoder.audio_channels

    @property
    def num_codebooks(self) -> int:
        return self.config.decoder.num_codebooks

    @property
    def window_frames(self) -> int:
        """Frames one generation window makes by duration (see MusicGenConfig.window_frames)."""
        return self.config.window_frames

    @property
    def shape(self) -> ModelShape:
        """What checking a request needs to know of this model."""
        config = self.config
        melody_rate = None if config.melody is None else config.melody.features.sampling_rate
        magnet_frames = None if config.magnet is None else config.magnet.frames
        return ModelShape(self.sampling_rate, self.frame_rate, self.audio_channels, self.num_codebooks,
                          self.window_frames, config.max_length, config.decoder.vocab_size, melody_rate, self.family,
                          magnet_frames)

    # ---- conditioning

    def encode_text(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        """Texts -> decoder-width states (B, S, D), zero at padding, and the (B, S) padding mask (see tokenize)."""
        if self.tokenizer is None:
            raise RuntimeError("This model has no tokenizer: load it with MusicGen.from_pretrained.")
        ids, mask = tokenize(self.tokenizer, list(texts))
        return self.model.project_text(self.t5(ids, mask), mask), mask

    def conditioning(self, texts: list[str] | None, num_samples: int, guided: bool) -> tuple[mx.array, mx.array]:
        """Text states and mask for the decoder; with guidance, unconditional rows (zero states, empty mask)
        follow."""
        if texts is None:
            states = mx.zeros((num_samples, 1, self.config.decoder.hidden_size))
            mask = mx.zeros((num_samples, 1), dtype=mx.int32)
        else:
            states, mask = self.encode_text(texts)
        if guided:
            states = mx.concatenate([states, mx.zeros_like(states)])
            mask = mx.concatenate([mask, mx.zeros_like(mask)])
        return states, mask

    # ---- audio <-> codes

    def encode_audio(self, samples: np.ndarray | mx.array) -> np.ndarray:
        """(batch, channels, samples) at the model's rate -> codes (batch, codebooks, frames); stereo channels are
        encoded apart and their codebooks interleaved L0, R0, L1, ..."""
        samples = mx.array(samples)
        C = self.audio_channels
        per_channel = self.num_codebooks // C
        codes = [self.audio_encoder.encode(samples[:, c : c + 1], per_channel) for c in range(C)]
        return np.array(mx.stack(codes, axis=2).reshape(samples.shape[0], self.num_codebooks, -1))

    def decode_stream(self, codes: Iterable[mx.array | np.ndarray]) -> Iterator[np.ndarray]:
        """Codes arriving a stretch (batch, codebooks, n) at a time -> the audio (batch, channels, samples) that
        each makes final (see streaming.decode_stream)."""
        return decode_stream(self.audio_encoder, self.audio_channels, codes)

    def decode(self, codes: mx.array | np.ndarray) -> np.ndarray:
        """(batch, codebooks, frames) -> (batch, channels, samples) float32; stereo codebooks are L0, R0, L1, ...

        Decoded a stretch of DECODE_FRAMES at a time, so memory does not grow with the duration."""
        codes = mx.array(codes)
        stretches = [codes[:, :, i : i + DECODE_FRAMES] for i in range(0, codes.shape[-1], DECODE_FRAMES)]
        return np.concatenate(list(self.decode_stream(stretches)), axis=-1)

    # ---- generation

    def frames(self, request: Request, config: GenerationConfig, progress: Progress | None = None
               ) -> Iterator[mx.array]:
        """The codes (B, K, n) of a checked request, the prompt's first, as they are decoded: what generate,
        generate_stream and generate_tokens all share."""
        if self.config.magnet is not None:
            return iter([self.magnet_clip(request, config, progress)])
        # as the reference: no guidance without text or melody
        guided = (request.texts is not None or request.melody is not None) and config.guidance_scale > 1.0
        states, mask = self.conditioning(request.texts, request.num_samples, guided)
        fixed = (self.model.decoder_context(states, mask, guided=guided, skip_needless_mask=True)
                 if request.melody is None else None)

        def context(window: Window) -> Context:
            if fixed is not None:
                return fixed
            # each window follows the melody from its own time on (see melody.window_features)
            time_offset = window.offset / self.frame_rate if len(request.windows) > 1 else None
            chroma = window_features(request.melody, self.config.melody.features, time_offset,
                                     self.shape.window_seconds)
            return self.model.decoder_context(states, mask, chroma, guided)

        return generate_frames(self.lm, context, guided, request, config, progress)

    def magnet_clip(self, request: Request, config: GenerationConfig, progress: Progress | None = None
                    ) -> mx.array:
        """A MAGNeT model's clip (B, K, n), the prompt's codes first, made whole by its passes (progress counts
        them) and cut to the length asked for; guided (annealed from max_cfg to min_cfg) wherever there is text,
        as audiocraft guides it."""
        guided = request.texts is not None
        states, mask = self.conditioning(request.texts, request.num_samples, guided)
        decoding = Decoding(do_sample=config.do_sample, temperature=config.temperature, top_k=config.top_k,
                            top_p=config.top_p, max_cfg=config.max_cfg, min_cfg=config.min_cfg,
                            decoding_steps=tuple(config.decoding_steps), span_arrangement=config.span_arrangement,
                            seed=config.seed)
        context = self.model.decoder_context(states, mask, skip_needless_mask=True)
        codes = generate_clip(self.decoder, context, guided, request.num_samples,
                              self.config.magnet.frames, decoding, request.prompt_codes, progress)
        return codes[..., : request.total_frames]

    def checked_request(self, config: GenerationConfig | None, settings: dict, texts, **inputs) -> tuple[
            Request, GenerationConfig]:
        """A checked request and its settings (`config` with keyword `settings` over it), before any work."""
        config = GenerationConfig.with_settings(config, settings)
        request = prepare(self.shape, self.encode_audio, config, texts, **inputs)
        return request, config.for_model(self.shape.kind, length=False)  # the model's sampling where not given

    def generate_tokens(
        self,
        texts: list[str] | None = None,
        *,
        num_samples: int = 1,
        prompt_codes: mx.array | np.ndarray | None = None,
        total_frames: int | None = None,
        melody: PromptInput | list[PromptInput] | None = None,
        melody_sr: int | None = None,
        config: GenerationConfig | None = None,
        progress: Progress | None = None,
        **settings,
    ) -> np.ndarray:
        """Codes in, codes out: continue `prompt_codes` (batch, codebooks, frames) to `total_frames` frames in all
        (or by the config's duration or max_new_tokens) -> (batch, codebooks, frames), the prompt's first."""
        prompt_codes = None if prompt_codes is None else np.asarray(prompt_codes)
        request, config = self.checked_request(config, settings, texts, num_samples=num_samples,
                                               prompt_codes=prompt_codes, total_frames=total_frames, melody=melody,
                                               melody_sr=melody_sr)
        codes = np.array(mx.concatenate(list(self.frames(request, config, progress)), axis=2))
        check_tokens(codes)  # NaN/inf logits are reported, as generate reports them
        return codes

    def generate(
        self,
        texts: list[str] | str | None = None,
        *,
        audio_prompt: PromptInput | list[PromptInput] | None = None,
        audio_prompt_sr: int | None = None,
        melody: PromptInput | list[PromptInput] | None = None,
        melody_sr: int | None = None,
        num_samples: int = 1,
        config: GenerationConfig | None = None,
        return_tokens: bool = False,
        progress: Progress | None = None,
        **settings,
    ) -> Audio | tuple[Audio, np.ndarray]:
        """Texts (or None for unconditional) -> audio (batch, channels, samples) [, codes (batch, codebooks, frames)].

        Settings (`config`, or any GenerationConfig field as a keyword: duration, max_new_tokens, do_sample,
        guidance_scale, top_k, top_p, temperature, seed, extend_stride) are described in GenerationConfig.

        `audio_prompt`: a file path or an array ((samples,) or (channels, samples) at `audio_prompt_sr`, default
        the model's rate), or a list of them; generation continues it and the audio returned starts with it.
        Prompts of different lengths are padded on the left with silence, and each item's audio is returned
        without its padding, as a list of (channels, samples) arrays.

        `melody` (melody checkpoints): a file path or an array ((samples,) or (channels, samples) at `melody_sr`,
        default the model's rate), or a list of them: one for all items, or one per item (without texts, a list
        makes one item each). The music follows its chroma (pitch classes), the texts its style; beyond one
        window, each window follows the melody from its own time on, wrapped round where the melody ends.
        """
        request, config = self.checked_request(config, settings, texts, num_samples=num_samples,
                                               audio_prompt=audio_prompt, audio_prompt_sr=audio_prompt_sr,
                                               melody=melody, melody_sr=melody_sr)
        codes = mx.concatenate(list(self.frames(request, config, progress)), axis=2)
        audio = trim_padding(self.decode(codes), list(request.padding))
        return (audio, np.array(codes)) if return_tokens else audio

    def generate_stream(
        self,
        texts: list[str] | str | None = None,
        *,
        chunk_duration: float = 1.0,
        audio_prompt: PromptInput | list[PromptInput] | None = None,
        audio_prompt_sr: int | None = None,
        melody: PromptInput | list[PromptInput] | None = None,
        melody_sr: int | None = None,
        num_samples: int = 1,
        config: GenerationConfig | None = None,
        progress: Progress | None = None,
        **settings,
    ) -> Iterator[Audio]:
        """generate, heard while it is made: yields audio chunks (batch, channels, samples), each about
        `chunk_duration` seconds, as soon as they are final; joined, they are exactly generate's output.
        With prompts of different lengths, each chunk is a list with one (channels, samples) array per item."""
        if not (math.isfinite(chunk_duration) and chunk_duration > 0):
            raise ValueError(f"chunk_duration must be a positive number of seconds, got {chunk_duration}.")
        request, config = self.checked_request(config, settings, texts, num_samples=num_samples,
                                               audio_prompt=audio_prompt, audio_prompt_sr=audio_prompt_sr,
                                               melody=melody, melody_sr=melody_sr)
        chunk_frames = max(1, round(chunk_duration * self.frame_rate))
        padding = list(request.padding)  # samples of each item's padding still to drop
        for audio in self.decode_stream(regroup(self.frames(request, config, progress), chunk_frames)):
            if not any(request.padding):
                yield audio
                continue
            items = []
            for i, item in enumerate(audio):
                drop = min(padding[i], item.shape[-1])
                padding[i] -= drop
                items.append(item[:, drop:])
            yield items
