"""EnCodec (the 32 kHz codec of MusicGen) in MLX: codes <-> audio.

Layout is (batch, time, channels) inside the model; the public `encode`/`decode` take and return
(batch, channels, samples) audio and (batch, codebooks, frames) codes like transformers' EncodecModel.

MLX's CPU convolutions are slow for long sequences (transposed ones ~20x slower than torch), so every
convolution here is written as one matmul over all kernel taps plus a few shifted slice additions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn


@dataclass
class EncodecConfig:
    # Defaults are transformers' EncodecConfig defaults, so a missing key means what it means there.
    sampling_rate: int = 24_000
    audio_channels: int = 1
    num_filters: int = 32
    hidden_size: int = 128
    upsampling_ratios: tuple[int, ...] = (8, 5, 4, 2)
    kernel_size: int = 7
    last_kernel_size: int = 7
    residual_kernel_size: int = 3
    dilation_growth_rate: int = 2
    num_residual_layers: int = 1
    num_lstm_layers: int = 2
    compress: int = 2
    use_causal_conv: bool = True
    pad_mode: str = "reflect"
    norm_type: str = "weight_norm"
    codebook_size: int = 1024
    codebook_dim: int | None = None
    target_bandwidths: tuple[float, ...] = (1.5, 3.0, 6.0, 12.0, 24.0)
    use_conv_shortcut: bool = True
    trim_right_ratio: float = 1.0
    normalize: bool = False
    chunk_length_s: float | None = None
    overlap: float | None = None

    def __post_init__(self):
        self.upsampling_ratios = tuple(self.upsampling_ratios)
        self.target_bandwidths = tuple(self.target_bandwidths)
        if self.codebook_dim is None:
            self.codebook_dim = self.hidden_size

    @classmethod
    def from_dict(cls, d: dict) -> "EncodecConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @property
    def hop_length(self) -> int:
        return math.prod(self.upsampling_ratios)

    @property
    def frame_rate(self) -> int:
        return math.ceil(self.sampling_rate / self.hop_length)

    @property
    def num_quantizers(self) -> int:
        bits = math.ceil(math.log2(self.codebook_size))
        return int(1000 * self.target_bandwidths[-1] // (self.frame_rate * bits))

    def check_supported(self):
        """Raise ValueError for settings that MusicGen's checkpoints never use and this port does not run."""
        unsupported = {
            "use_causal_conv": self.use_causal_conv,
            "normalize": self.normalize,
            "chunk_length_s": self.chunk_length_s is not None,
            "norm_type": self.norm_type != "weight_norm",
            "pad_mode": self.pad_mode != "reflect",
            "trim_right_ratio": self.trim_right_ratio != 1.0,
        }
        for name, bad in unsupported.items():
            if bad:
                raise ValueError(f"EnCodec setting {name}={getattr(self, name)!r} is not supported")


def elu(x: mx.array) -> mx.array:
    return nn.elu(x)


class ELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return elu(x)


def pad_reflect(x: mx.array, left: int, right: int) -> mx.array:
    """Reflect-pad the time axis of (batch, time, channels), like transformers' EncodecConv1d._pad1d."""
    if left == 0 and right == 0:
        return x
    # Reflection needs more samples than the padding: transformers zero-extends short inputs first.
    length = x.shape[1]
    extra = max(0, max(left, right) - length + 1)
    if extra:
        x = mx.pad(x, [(0, 0), (0, extra), (0, 0)])
    parts = [x[:, 1 : left + 1][:, ::-1], x, x[:, -right - 1 : -1][:, ::-1]]
    x = mx.concatenate([p for p in parts if p.shape[1]], axis=1)
    return x[:, : x.shape[1] - extra] if extra else x


def conv1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, dilation: int = 1) -> mx.array:
    """Valid (unpadded) convolution of (batch, time, in) with an MLX-layout (out, kernel, in) weight."""
    if stride > 1:
        # Fold the stride into the channels: frames of `stride` samples, taps grouped per frame.
        out_channels, kernel, in_channels = weight.shape
        groups = -(-kernel // stride)
        num_out = (x.shape[1] - kernel) // stride + 1
        weight = mx.pad(weight, [(0, 0), (0, groups * stride - kernel), (0, 0)])
        weight = weight.reshape(out_channels, groups, stride * in_channels)
        length = (num_out + groups - 1) * stride
        x = x[:, :length] if x.shape[1] >= length else mx.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0)])
        x = x.reshape(x.shape[0], -1, stride * in_channels)
    batch, length, in_channels = x.shape
    out_channels, kernel, _ = weight.shape
    num_out = length - (kernel - 1) * dilation
    if kernel == 1:
        return x @ weight.reshape(out_channels, in_channels).T + bias
    if in_channels < out_channels:
        # Gather the taps side by side, then one matmul (the input is the smaller tensor).
        taps = [x[:, k * dilation : k * dilation + num_out] for k in range(kernel)]
        return mx.concatenate(taps, axis=-1) @ weight.reshape(out_channels, -1).T + bias
    # One matmul for all taps, then add the taps' outputs shifted into place (the output is smaller).
    z = (x @ weight.reshape(-1, in_channels).T).reshape(batch, length, out_channels, kernel)
    y = z[:, :num_out, :, 0] + bias
    for k in range(1, kernel):
        y = y + z[:, k * dilation : k * dilation + num_out, :, k]
    return y


def conv_transpose1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int) -> mx.array:
    """Full transposed convolution of (batch, time, in) with an MLX-layout (out, kernel, in) weight."""
    batch, length, _ = x.shape
    out_channels, kernel, in_channels = weight.shape
    groups = -(-kernel // stride)
    # Every input step writes `kernel` output samples: one matmul makes them all, then the
    # `groups` blocks of `stride` samples are overlap-added at their frame offsets.
    weight = mx.pad(weight, [(0, 0), (0, groups * stride - kernel), (0, 0)])
    weight = weight.transpose(1, 0, 2).reshape(-1, in_channels)
    z = (x @ weight.T).reshape(batch, length, groups, stride, out_channels)
    num_frames = length + groups - 1
    y = None
    for g in range(groups):
        block = mx.pad(z[:, :, g], [(0, 0), (g, groups - 1 - g), (0, 0), (0, 0)])
        y = block if y is None else y + block
    y = y.reshape(batch, num_frames * stride, out_channels)
    return y[:, : (length - 1) * stride + kernel] + bias


class EncodecConv1d(nn.Module):
    """Non-causal conv with transformers' padding: reflect, asymmetric, plus extra right padding for the last frame."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride, dilation=dilation)
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = (kernel_size - 1) * dilation + 1
        self.padding_total = self.kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:
        length = x.shape[1]
        num_frames = -(-(length - self.kernel_size + self.padding_total) // self.stride)
        extra = num_frames * self.stride + self.kernel_size - self.padding_total - length
        right = self.padding_total // 2
        x = pad_reflect(x, self.padding_total - right, right + extra)
        return conv1d(x, self.conv.weight, self.conv.bias, self.stride, self.dilation)


class EncodecConvTranspose1d(nn.Module):
    """Non-causal transposed conv, trimmed like transformers' (more on the left for odd totals)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride)
        self.stride = stride
        self.padding_total = kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:
        y = conv_transpose1d(x, self.conv.weight, self.conv.bias, self.stride)
        right = self.padding_total // 2
        left = self.padding_total - right
        return y[:, left : y.shape[1] - right]


class EncodecLSTM(nn.Module):
    """Stacked LSTM with a skip connection around it."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.lstm = [nn.LSTM(dim, dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.lstm:
            h = layer(h)[0]
        return h + x


class EncodecResnetBlock(nn.Module):
    def __init__(self, config: EncodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // config.compress
        self.block = [
            ELU(),
            EncodecConv1d(dim, hidden, config.residual_kernel_size, dilation=dilation),
            ELU(),
            EncodecConv1d(hidden, dim, 1),
        ]
        self.shortcut = EncodecConv1d(dim, dim, 1) if config.use_conv_shortcut else None

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.block:
            h = layer(h)
        return (self.shortcut(x) if self.shortcut is not None else x) + h


class EncodecEncoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        layers = [EncodecConv1d(config.audio_channels, config.num_filters, config.kernel_size)]
        dim = config.num_filters
        for ratio in reversed(config.upsampling_ratios):
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
            layers += [ELU(), EncodecConv1d(dim, dim * 2, kernel_size=ratio * 2, stride=ratio)]
            dim *= 2
        layers += [
            EncodecLSTM(dim, config.num_lstm_layers),
            ELU(),
            EncodecConv1d(dim, config.hidden_size, config.last_kernel_size),
        ]
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecDecoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        dim = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers = [
            EncodecConv1d(config.hidden_size, dim, config.kernel_size),
            EncodecLSTM(dim, config.num_lstm_layers),
        ]
        for ratio in config.upsampling_ratios:
            layers += [ELU(), EncodecConvTranspose1d(dim, dim // 2, kernel_size=ratio * 2, stride=ratio)]
            dim //= 2
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
        layers += [ELU(), EncodecConv1d(dim, config.audio_channels, config.last_kernel_size)]
        self.layers = layers

    def __call__(self, x: mx.array) -> mx.array:
        for layer in self.layers:
            x = layer(x)
        return x


class EncodecCodebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embed = mx.zeros((codebook_size, dim))

    def encode(self, x: mx.array) -> mx.array:
        """Index of the nearest entry (Euclidean) for each vector of x (..., dim)."""
        # Same expression as transformers, so that near-ties break the same way.
        distance = (x.square().sum(-1, keepdims=True) - 2 * (x @ self.embed.T)) + self.embed.square().sum(-1)
        return mx.argmin(distance, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embed[codes]


class EncodecQuantizer(nn.Module):
    """Residual vector quantizer: each codebook quantizes what the previous ones left."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.layers = [
            EncodecCodebook(config.codebook_size, config.codebook_dim) for _ in range(config.num_quantizers)
        ]

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        codes = []
        for codebook in self.layers[:num_codebooks]:
            indices = codebook.encode(x)
            x = x - codebook.decode(indices)
            codes.append(indices)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        x = self.layers[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            x = x + self.layers[k].decode(codes[:, k])
        return x


class EncodecModel(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        config.check_supported()
        self.config = config
        self.encoder = EncodecEncoder(config)
        self.decoder = EncodecDecoder(config)
        self.quantizer = EncodecQuantizer(config)

    def encode(self, audio: mx.array, num_codebooks: int | None = None) -> mx.array:
        """(batch, channels, samples) audio -> (batch, num_codebooks, frames) int32 codes."""
        if num_codebooks is None:
            num_codebooks = self.config.num_quantizers
        x = self.encoder(audio.transpose(0, 2, 1))
        return self.quantizer.encode(x, num_codebooks)

    def decode(self, codes: mx.array) -> mx.array:
        """(batch, num_codebooks, frames) codes -> (batch, audio_channels, frames * hop_length) float32 audio."""
        x = self.decoder(self.quantizer.decode(codes))
        return x.transpose(0, 2, 1)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers' EncodecModel tensors (prefix `audio_encoder.` removed) to this module's parameters."""
        weights = dict(weights)
        out = {}
        # Weight norm, in either spelling: weight = g * v / ||v||, the norm over all dims but the first.
        for g_suffix, v_suffix in (
            (".weight_g", ".weight_v"),
            (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
        ):
            for key in [k for k in weights if k.endswith(g_suffix)]:
                base = key[: -len(g_suffix)]
                if base + v_suffix not in weights:
                    continue
                g, v = weights.pop(key), weights.pop(base + v_suffix)
                norm = mx.sqrt(v.square().sum(axis=tuple(range(1, v.ndim)), keepdims=True))
                weights[base + ".weight"] = g * v / norm
        # The decoder's transposed convs are its top-level convs between the first and the last one.
        decoder_convs = sorted(
            int(k.split(".")[2]) for k in weights if k.startswith("decoder.layers.") and k.endswith(".conv.weight")
            and k.count(".") == 4
        )
        transposed = {f"decoder.layers.{i}.conv.weight" for i in decoder_convs[1:-1]}
        lstm_biases = {}
        for key, value in weights.items():
            parts = key.split(".")
            if key in transposed:
                out[key] = value.transpose(1, 2, 0)  # (in, out, kernel) -> (out, kernel, in)
            elif key.endswith(".conv.weight"):
                out[key] = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
            elif parts[-1] in ("inited", "cluster_size", "embed_avg") and "codebook" in parts:
                continue  # training-time k-means state
            elif key.startswith("quantizer.layers.") and key.endswith(".codebook.embed"):
                out[key.replace(".codebook.embed", ".embed")] = value
            elif ".lstm." in key and parts[-1][:-1].rstrip("_l").startswith(("weight_", "bias_")):
                prefix = key[: key.index(".lstm.") + len(".lstm.")]
                kind, layer = parts[-1].rsplit("_l", 1)
                if kind == "weight_ih":
                    out[f"{prefix}{layer}.Wx"] = value
                elif kind == "weight_hh":
                    out[f"{prefix}{layer}.Wh"] = value
                elif kind in ("bias_ih", "bias_hh"):
                    lstm_biases.setdefault(f"{prefix}{layer}.bias", []).append(value)
                else:
                    out[key] = value
            else:
                out[key] = value
        for key, biases in lstm_biases.items():
            out[key] = sum(biases)
        return out
