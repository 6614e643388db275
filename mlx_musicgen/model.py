"""The MusicGen model: its parts as one module whose parameter names are the checkpoint's (text_encoder.*,
enc_to_dec_proj.*, decoder.*, audio_enc_to_dec_proj.*, audio_encoder.*), and its config.

    text -> T5 -> (projected) states -> decoder over K delayed codebooks (+ guidance) -> EnCodec -> audio

The conditioning is made here once per window as one decoder.Context: cross-attention keys and values of the
text (MusicGen), or a prefix of chroma and text (MusicGen-Melody). The public front door is musicgen.MusicGen.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .decoder import Context, DecoderConfig, MusicgenDecoder
from .encodec import EncodecConfig, EncodecModel
from .limits import FAMILIES
from .magnet import MagnetConfig, MagnetDecoder
from .melody import MelodyConfig, MelodyDecoder, chroma_rows, prefix_context
from .t5 import T5Config, T5Encoder

CONVERTED_KEY = "mlx_musicgen"  # the converted config.json's own section
AUDIOCRAFT_KEY = "audiocraft"  # the section of a model read from audiocraft's files (loading.read_audiocraft)
DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}  # the decoder's, by name


@dataclass
class MusicGenConfig:
    text_encoder: T5Config
    decoder: DecoderConfig
    audio_encoder: EncodecConfig
    project_text: bool  # the reference projects T5 states only when the widths differ
    max_length: int = 1500  # the checkpoint's generation window: frames by duration, positions by steps
    quantization: dict | None = None
    melody: MelodyConfig | None = None  # MusicGen-Melody's chroma conditioning
    family: str = "musicgen"  # or "audiogen": music or sound (settings.MODEL_DEFAULTS)
    magnet: MagnetConfig | None = None  # MAGNeT: masked decoding of a fixed clip (magnet.py)
    # audiocraft's models attend to the text's padding too (zero states, hence zero keys and values), where
    # transformers' mask it: the same only without padding (one text, or texts of one length)
    attend_text_padding: bool = False

    @classmethod
    def from_dict(cls, config: dict, generation: dict | None = None,
                  preprocessor: dict | None = None) -> MusicGenConfig:
        """config.json, generation_config.json and (melody checkpoints) preprocessor_config.json, as read."""
        text = T5Config.from_dict(config["text_encoder"])
        decoder = DecoderConfig.from_dict(config["decoder"])
        audio = EncodecConfig.from_dict(config["audio_encoder"])
        origin = config.get(AUDIOCRAFT_KEY)  # audiocraft's LM always projects the text
        project = origin is not None or (text.d_model != decoder.hidden_size
                                         and config["decoder"].get("cross_attention_hidden_size") is None)
        converted = config.get(CONVERTED_KEY, {})
        max_length = (generation or {}).get("max_length") or converted.get("max_length") or 1500
        chroma = MelodyConfig.from_dict(config, preprocessor) if config["model_type"] == "musicgen_melody" \
            else None
        family = "musicgen" if origin is None else origin["family"]
        if family not in FAMILIES:
            raise ValueError(f"family {family!r} is not one of {', '.join(FAMILIES)}")
        magnet = None if origin is None or origin.get("magnet") is None else MagnetConfig(**origin["magnet"])
        return cls(text, decoder, audio, project, max_length, converted.get("quantization"), chroma, family, magnet,
                   attend_text_padding=origin is not None)  # checked by the loader

    @property
    def sampling_rate(self) -> int:
        return self.audio_encoder.sampling_rate

    @property
    def frame_rate(self) -> float:
        return self.audio_encoder.frame_rate

    @property
    def window_frames(self) -> int:
        """Frames one generation window makes by duration: audiocraft's int(max_duration * frame_rate), 1500
        (30 s at 50 Hz) for the Hub checkpoints, whose max_length of 1500 is that window. The decoder's positions
        hold it plus the start column and the codebook delays."""
        return self.max_length


class MusicGenModel(nn.Module):
    """T5, the projection of its states to the decoder's width (when they differ), the decoder (MusicGen's or
    MusicGen-Melody's, with the chroma's projection) and EnCodec."""

    def __init__(self, config: MusicGenConfig):
        super().__init__()
        self.config = config
        self.text_encoder = T5Encoder(config.text_encoder)
        if config.project_text:
            self.enc_to_dec_proj = nn.Linear(config.text_encoder.d_model, config.decoder.hidden_size)
        if config.magnet is not None:
            self.decoder = MagnetDecoder(config.decoder, config.magnet)
        else:
            self.decoder = (MusicgenDecoder if config.melody is None else MelodyDecoder)(config.decoder)
        if config.melody is not None and config.melody.num_chroma != config.decoder.hidden_size:
            self.audio_enc_to_dec_proj = nn.Linear(config.melody.num_chroma, config.decoder.hidden_size)
        self.audio_encoder = EncodecModel(config.audio_encoder)
        if config.quantization:
            self.quantize_decoder(**config.quantization)

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

    # ---- conditioning

    def project_text(self, states: mx.array, mask: mx.array) -> mx.array:
        """T5 states (B, S, d_model) -> the decoder's width (when the widths differ), zero where `mask` is 0."""
        if self.config.project_text:
            states = self.enc_to_dec_proj(states.astype(self.decoder.dtype))
        return states * mask[..., None].astype(states.dtype)

    def decoder_context(self, states: mx.array, mask: mx.array, chroma: np.ndarray | None = None,
                        guided: bool = False, skip_needless_mask: bool = False) -> Context:
        """What the decoder is conditioned on, from the text rows (B, S, D) and their mask (with guidance, the
        unconditional rows follow): each layer's keys and values of the text (MusicGen), or the prefix of
        chroma and text (MusicGen-Melody; `chroma` (B, frames, num_chroma) one-hot of the conditional rows, None:
        the null melody). `skip_needless_mask`: see MusicgenDecoder.text_context (generation, not training)."""
        if self.config.melody is None:
            mask = mx.ones_like(mask) if self.config.attend_text_padding else mask
            return self.decoder.text_context(states, mask, skip_needless_mask)
        rows = states.shape[0] // (2 if guided else 1)
        features = mx.array(chroma_rows(chroma, rows, guided, self.config.melody.num_chroma))
        if "audio_enc_to_dec_proj" in self:
            features = self.audio_enc_to_dec_proj(features.astype(self.decoder.dtype))
        return prefix_context(features, states.astype(self.decoder.dtype), self.config.melody.chroma_length)
