"""Random-weight MusicGen checkpoints in the Hub layout, built with transformers for parity tests.

Nothing here is downloaded: the tokenizer is a sentencepiece model trained on a few hundred generated lines,
and the weights are transformers' random initialisation under a fixed torch seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

WORDS = (
    "80s pop track with bassy drums and synth 90s rock song loud guitars heavy drums lofi slow bpm "
    "electro chill guitar riff piano ballad jazz trumpet solo ambient pads warm bass techno kick "
    "orchestral strings cinematic epic folk acoustic happy sad upbeat dance reggae hip hop beat vinyl "
    "crackle soft vocals choir organ flute violin cello brass fast tempo groove funk disco house"
).split()


def build_tokenizer(folder: Path, extra_pieces: int = 0) -> None:
    """Train a tiny T5-style sentencepiece tokenizer (pad 0, eos 1, unk 2; 91 pieces, and `extra_pieces` more)
    and save it as spiece.model."""
    import sentencepiece as spm

    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(400)]
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(lines))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "spiece"),
        vocab_size=120 + extra_pieces,
        user_defined_symbols=[f"<extra{i}>" for i in range(extra_pieces)],
        model_type="unigram",
        hard_vocab_limit=False,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    corpus.unlink()
    (folder / "spiece.vocab").unlink()


@dataclass(frozen=True)
class Shape:
    """The sizes of a random MusicGen; the defaults are tiny, with text width != decoder width."""

    text_hidden: int = 48
    text_layers: int = 2
    text_heads: int = 3
    text_ffn: int = 64
    decoder_hidden: int = 64
    decoder_layers: int = 2
    decoder_heads: int = 2
    decoder_ffn: int = 128
    num_codebooks: int = 4
    audio_channels: int = 1
    codebook_size: int = 2048
    num_filters: int = 8
    codec_hidden: int = 32
    upsampling_ratios: tuple[int, ...] = (4, 4, 2)
    sampling_rate: int = 32000
    max_position_embeddings: int = 1024
    text_vocab: int = 120


SMALL = Shape(
    text_hidden=768, text_layers=12, text_heads=12, text_ffn=3072,
    decoder_hidden=1024, decoder_layers=24, decoder_heads=16, decoder_ffn=4096,
    num_filters=64, codec_hidden=128, upsampling_ratios=(8, 5, 4, 4), max_position_embeddings=2048,
    text_vocab=32128,
)


def musicgen_config(shape: Shape = Shape(), chroma_length: int | None = None):
    """transformers' config of a random MusicGen; with `chroma_length`, of a MusicGen-Melody with that prefix."""
    from transformers import (
        EncodecConfig,
        MusicgenConfig,
        MusicgenDecoderConfig,
        MusicgenMelodyConfig,
        MusicgenMelodyDecoderConfig,
        T5Config,
    )

    text = T5Config(
        vocab_size=shape.text_vocab, d_model=shape.text_hidden, d_kv=shape.text_hidden // shape.text_heads,
        d_ff=shape.text_ffn, num_layers=shape.text_layers, num_heads=shape.text_heads,
        relative_attention_num_buckets=32, feed_forward_proj="relu",
    )
    hop = 1
    for r in shape.upsampling_ratios:
        hop *= r
    frame_rate = shape.sampling_rate / hop
    # 4 codebooks of 2048 entries (11 bits) per frame: the bandwidth that makes the encoder use all of them.
    bits = max(1, (shape.codebook_size - 1).bit_length())
    bandwidth = shape.num_codebooks // shape.audio_channels * bits * frame_rate / 1000
    audio = EncodecConfig(
        sampling_rate=shape.sampling_rate, audio_channels=1, normalize=False, chunk_length_s=None, overlap=None,
        hidden_size=shape.codec_hidden, num_filters=shape.num_filters, num_residual_layers=1,
        upsampling_ratios=list(shape.upsampling_ratios), norm_type="weight_norm", kernel_size=7,
        last_kernel_size=7, residual_kernel_size=3, dilation_growth_rate=2, use_causal_conv=False,
        pad_mode="reflect", compress=2, num_lstm_layers=2, trim_right_ratio=1.0,
        codebook_size=shape.codebook_size, codebook_dim=shape.codec_hidden, use_conv_shortcut=False,
        target_bandwidths=[bandwidth],
    )
    decoder = (MusicgenDecoderConfig if chroma_length is None else MusicgenMelodyDecoderConfig)(
        vocab_size=shape.codebook_size, max_position_embeddings=shape.max_position_embeddings,
        num_hidden_layers=shape.decoder_layers, ffn_dim=shape.decoder_ffn,
        num_attention_heads=shape.decoder_heads, hidden_size=shape.decoder_hidden,
        num_codebooks=shape.num_codebooks, audio_channels=shape.audio_channels,
        pad_token_id=shape.codebook_size, bos_token_id=shape.codebook_size,
        activation_function="gelu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        layerdrop=0.0, scale_embedding=False, tie_word_embeddings=False,
    )
    parts = {"text_encoder": text.to_dict(), "audio_encoder": audio.to_dict(), "decoder": decoder.to_dict()}
    if chroma_length is None:
        return MusicgenConfig(**parts)
    return MusicgenMelodyConfig(**parts, num_chroma=12, chroma_length=chroma_length)


def build_model(shape: Shape = Shape(), seed: int = 0, chroma_length: int | None = None):
    """A random-weight reference model in eval mode, with the generation defaults of the Hub checkpoints; with
    `chroma_length`, a MusicGen-Melody."""
    import torch
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    torch.manual_seed(seed)
    kind = MusicgenForConditionalGeneration if chroma_length is None else MusicgenMelodyForConditionalGeneration
    model = kind(musicgen_config(shape, chroma_length)).eval()
    # transformers starts EnCodec codebooks at zero (they are learned by k-means); with zeros every code would
    # decode to the same audio and every encoding would tie, so give them random entries.
    with torch.no_grad():
        for layer in model.audio_encoder.quantizer.layers:
            layer.codebook.embed.normal_()
            layer.codebook.embed_avg.copy_(layer.codebook.embed)
    pad = shape.codebook_size
    gc = model.generation_config
    gc.decoder_start_token_id = pad
    gc.pad_token_id = pad
    gc.bos_token_id = pad
    gc.do_sample = True
    gc.guidance_scale = 3.0
    gc.top_k = 250
    gc.max_length = 1500
    return model


def build_melody_checkpoint(folder: Path, shape: Shape = Shape(), chroma_length: int = 7, seed: int = 0):
    """Write a Hub-layout MusicGen-Melody checkpoint (config, safetensors, tokenizer, preprocessor_config.json)
    and return (model, tokenizer, feature extractor)."""
    from transformers import T5Tokenizer

    folder = Path(folder)
    model = build_model(shape, seed, chroma_length)
    build_tokenizer(folder)
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    extractor = melody_extractor()
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    extractor.save_pretrained(str(folder))
    return model, tokenizer, extractor


def build_processor(folder: Path):
    from transformers import EncodecFeatureExtractor, MusicgenProcessor, T5Tokenizer

    build_tokenizer(folder)
    tokenizer = T5Tokenizer.from_pretrained(str(folder), extra_ids=0)
    extractor = EncodecFeatureExtractor(feature_size=1, sampling_rate=32000, padding_side="left")
    processor = MusicgenProcessor(extractor, tokenizer)
    return processor


def build_checkpoint(folder: Path, shape: Shape = Shape(), seed: int = 0):
    """Write a Hub-layout checkpoint (config, safetensors, tokenizer, processor) and return (model, processor)."""
    folder = Path(folder)
    model = build_model(shape, seed)
    processor = build_processor(folder)
    model.save_pretrained(str(folder))
    processor.save_pretrained(str(folder))
    return model, processor


class SpectrogramStandIn:
    """A test-only stand-in for torchaudio.transforms.Spectrogram, which is all the reference chroma extractor
    uses of torchaudio for 32 kHz input: torchaudio cannot be installed beside torch 2.13 here (its newest
    wheel, 2.11, fails to load). torch.stft with torchaudio's arguments and defaults: a periodic Hann window of
    win_length, centred frames with reflect padding, one-sided, divided by sqrt(sum(window^2)) when normalized,
    |.|^power."""

    def __init__(self, n_fft, win_length, hop_length, power, center, pad, normalized):
        import torch

        assert win_length == n_fft and pad == 0 and power == 2 and normalized is True
        self.n_fft, self.hop_length, self.center = n_fft, hop_length, center
        self.window = torch.hann_window(n_fft, periodic=True)

    def __call__(self, waveform):
        import torch

        shape = waveform.shape
        spec = torch.stft(waveform.reshape(-1, shape[-1]), self.n_fft, self.hop_length, self.n_fft, self.window,
                          center=self.center, pad_mode="reflect", normalized=False, onesided=True,
                          return_complex=True)
        spec = spec / self.window.pow(2.0).sum().sqrt()
        return spec.abs().pow(2.0).reshape(*shape[:-1], *spec.shape[-2:])


def melody_extractor(**kwargs):
    """transformers' MusicgenMelodyFeatureExtractor, with SpectrogramStandIn for torchaudio's Spectrogram. Give it
    32 kHz audio only (other rates need torchaudio's resampler)."""
    import importlib
    from types import SimpleNamespace

    # imported by its full name: the package's lazy attribute is a placeholder that demands torchaudio
    module = importlib.import_module("transformers.models.musicgen_melody.feature_extraction_musicgen_melody")

    module.torchaudio = SimpleNamespace(transforms=SimpleNamespace(Spectrogram=SpectrogramStandIn))
    return module.MusicgenMelodyFeatureExtractor(**kwargs)
