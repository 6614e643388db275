"""MusicGen: text -> T5 -> decoder with guidance over delayed codebooks -> EnCodec -> audio."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import cpu, delay, loading
from .decoder import DecoderConfig, MusicgenDecoder
from .encodec import EncodecConfig, EncodecModel
from .melody import MelodyConfig, MelodyDecoder, chroma_rows, prefix
from .generation import GenerationConfig, Progress, generate_frames
from .prompt import PromptInput, prepare, trim_padding
from .sampling import check_tokens
from .streaming import StreamingDecoder, regroup
from .t5 import T5Config, T5Encoder

DECODE_FRAMES = 500  # codes are decoded a stretch of this many frames (10 s) at a time, in flat memory
Audio = np.ndarray | list[np.ndarray]  # (batch, channels, samples), or one (channels, samples) per item


@dataclass
class MusicGenConfig:
    text_encoder: T5Config
    decoder: DecoderConfig
    audio_encoder: EncodecConfig
    project_text: bool  # the reference projects T5 states only when the widths differ
    max_length: int = 1500  # the checkpoint's generation window: frames by duration, positions by steps
    quantization: dict | None = None
    melody: MelodyConfig | None = None  # MusicGen-Melody's chroma conditioning

    @classmethod
    def from_dict(cls, config: dict, generation: dict | None = None,
                  preprocessor: dict | None = None) -> MusicGenConfig:
        """config.json, generation_config.json and (melody checkpoints) preprocessor_config.json, as read."""
        text = T5Config.from_dict(config["text_encoder"])
        decoder = DecoderConfig.from_dict(config["decoder"])
        audio = EncodecConfig.from_dict(config["audio_encoder"])
        project = text.d_model != decoder.hidden_size and config["decoder"].get("cross_attention_hidden_size") is None
        converted = config.get(loading.CONVERTED_KEY, {})
        max_length = (generation or {}).get("max_length") or converted.get("max_length") or 1500
        chroma = MelodyConfig.from_dict(config, preprocessor) if config["model_type"] == "musicgen_melody" \
            else None
        return cls(text, decoder, audio, project, max_length, converted.get("quantization"), chroma)  # checked by
        # the loader


class MusicGen(nn.Module):
    """The three parts and the text conditioning, with the public generation API on top."""

    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.config = config
        self.text_encoder = T5Encoder(config.text_encoder)
        if config.project_text:
            self.enc_to_dec_proj = nn.Linear(config.text_encoder.d_model, config.decoder.hidden_size)
        self.decoder = (MusicgenDecoder if config.melody is None else MelodyDecoder)(config.decoder)
        if config.melody is not None and config.melody.num_chroma != config.decoder.hidden_size:
            self.audio_enc_to_dec_proj = nn.Linear(config.melody.num_chroma, config.decoder.hidden_size)
        self.audio_encoder = EncodecModel(config.audio_encoder)
        if config.quantization:
            self.quantize_decoder(**config.quantization)
        self.tokenizer = None

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, *, dtype: mx.Dtype | None = None,
                        adapter: str | Path | None = None) -> MusicGen:
        """A converted folder, a Hub-layout folder (converted in memory) or a Hub id such as facebook/musicgen-small;
        `adapter`: a fine-tune's output folder (finetune.py --adapter-path), merged into the weights.

        On a CPU, the modules are swapped for their fast CPU forms (see cpu), unless MLX_MUSICGEN_PORTABLE=1."""
        model = loading.load_model(path_or_id, dtype=dtype)
        if adapter is not None:
            from .lora import fuse_lora, load_adapters

            load_adapters(model, Path(adapter))
            fuse_lora(model)
        if mx.default_device() == mx.cpu:
            cpu.warn_if_slow(model)
            if not cpu.portable_requested():
                cpu.optimize_for_cpu(model)
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

    def set_decoder_dtype(self, dtype: mx.Dtype) -> None:
        """Half precision for the decoder (the heavy part); T5 and EnCodec stay float32 for accuracy."""
        for module in (self.decoder, getattr(self, "enc_to_dec_proj", None), getattr(self, "audio_enc_to_dec_proj",
                                                                                      None)):
            if module is not None:
                module.set_dtype(dtype)

    def quantize_decoder(self, group_size: int, bits: int) -> None:
        """Quantize the decoder's projections, heads and embeddings (those whose width divides into groups)."""

        def quantizable(path: str, module: nn.Module) -> bool:
            return isinstance(module, (nn.Linear, nn.Embedding)) and module.weight.shape[-1] % group_size == 0

        nn.quantize(self.decoder, group_size=group_size, bits=bits, class_predicate=quantizable)
        self.config.quantization = {"group_size": group_size, "bits": bits}

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

    @property
    def window_frames(self) -> int:
        """Frames one generation window makes by duration: audiocraft's int(max_duration * frame_rate), 1500
        (30 s at 50 Hz) for the Hub checkpoints, whose max_length of 1500 is that window. The decoder's positions
        hold it plus the start column and the codebook delays."""
        return self.config.max_length

    # ---- conditioning

    def encode_text(self, texts: list[str]) -> tuple[mx.array, mx.array]:
        """Texts -> decoder-width states (B, S, D), zero at padding, and the (B, S) padding mask.

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
        return self.project_text(self.text_encoder(ids, mask), mask), mask

    def project_text(self, states: mx.array, mask: mx.array) -> mx.array:
        """T5 states (B, S, d_model) -> the decoder's width (when the widths differ), zero where `mask` is 0."""
        if self.config.project_text:
            states = self.enc_to_dec_proj(states.astype(self.decoder.dtype))
        return states * mask[..., None].astype(states.dtype)

    def conditioning(self, texts: list[str] | None, num_samples: int, guided: bool) -> tuple[mx.array, mx.array]:
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

    def decoder_context(self, states: mx.array, mask: mx.array, chroma: np.ndarray | None = None,
                        guided: bool = False):
        """What the decoder is conditioned on, from conditioning's text rows: each layer's keys and values of the
        text (MusicGen), or the prefix of chroma and text (MusicGen-Melody; `chroma` (B, frames, num_chroma)
        one-hot of the conditional rows, None: the null melody)."""
        if self.config.melody is None:
            return self.decoder.text_context(states, mask)
        rows = states.shape[0] // (2 if guided else 1)
        features = mx.array(chroma_rows(chroma, rows, guided, self.config.melody.num_chroma))
        if hasattr(self, "audio_enc_to_dec_proj"):
            features = self.audio_enc_to_dec_proj(features.astype(self.decoder.dtype))
        return prefix(features, states.astype(self.decoder.dtype), self.config.melody.chroma_length)

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
        each makes final; the audio joined is the whole decode, sample-exact at the seams."""
        C = self.audio_channels
        decoders = [StreamingDecoder(self.audio_encoder) for _ in range(C)]

        def joined(pieces: list[mx.array]) -> np.ndarray:
            return np.array(mx.concatenate(pieces, axis=1).astype(mx.float32))

        for stretch in codes:
            check_tokens(stretch)  # NaN/inf logits are reported, not decoded into noise
            stretch = mx.array(stretch)
            audio = joined([d.push(stretch[:, c::C]) for c, d in enumerate(decoders)])
            if audio.shape[-1]:
                yield audio
        audio = joined([d.flush() for d in decoders])
        if audio.shape[-1]:
            yield audio

    def decode(self, codes: mx.array | np.ndarray) -> np.ndarray:
        """(batch, codebooks, frames) -> (batch, channels, samples) float32; stereo codebooks are L0, R0, L1, ...

        Decoded a stretch of DECODE_FRAMES at a time, so memory does not grow with the duration."""
        codes = mx.array(codes)
        stretches = (codes[:, :, i : i + DECODE_FRAMES] for i in range(0, codes.shape[-1], DECODE_FRAMES))
        return np.concatenate(list(self.decode_stream(stretches)), axis=-1)

    # ---- generation

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
        config = GenerationConfig.with_settings(config, settings)
        request = prepare(self, config, texts, num_samples=num_samples, prompt_codes=prompt_codes,
                          total_frames=total_frames, melody=melody, melody_sr=melody_sr)
        return np.array(mx.concatenate(list(generate_frames(self, request, config, progress)), axis=2))

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
        config = GenerationConfig.with_settings(config, settings)
        request = prepare(self, config, texts, num_samples=num_samples, audio_prompt=audio_prompt,
                          audio_prompt_sr=audio_prompt_sr, melody=melody, melody_sr=melody_sr)
        codes = mx.concatenate(list(generate_frames(self, request, config, progress)), axis=2)
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
        config = GenerationConfig.with_settings(config, settings)
        request = prepare(self, config, texts, num_samples=num_samples, audio_prompt=audio_prompt,
                          audio_prompt_sr=audio_prompt_sr, melody=melody, melody_sr=melody_sr)
        frames = generate_frames(self, request, config, progress)
        chunk_frames = max(1, round(chunk_duration * self.frame_rate))
        padding = list(request.padding)  # samples of each item's padding still to drop
        for audio in self.decode_stream(regroup(frames, chunk_frames)):
            if not any(request.padding):
                yield audio
                continue
            items = []
            for i, item in enumerate(audio):
                drop = min(padding[i], item.shape[-1])
                padding[i] -= drop
                items.append(item[:, drop:])
            yield items
