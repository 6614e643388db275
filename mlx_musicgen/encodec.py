"""EnCodec, MusicGen's audio codec, in MLX: audio <-> discrete codes, as transformers' EncodecModel computes them.

    encode: audio (batch, channels, samples) -> SEANet encoder -> residual vector quantizer -> codes
    decode: codes (batch, codebooks, frames) -> sum of codebook entries -> SEANet decoder -> audio

The SEANet encoder is a conv, then per ratio residual blocks and a strided conv, then an LSTM and a last conv;
the decoder mirrors it with transposed convs. Inside the model, activations are (batch, time, channels).

This is the portable model (Metal, CUDA and CPU), written with MLX's own layers. On a CPU,
`mlx_musicgen.cpu.encodec.optimize_encodec` swaps some of its modules for faster ones with the same outputs.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

LSTMState = list[tuple[mx.array, mx.array]]  # each layer's (h, c) after its last step, each (batch, dim)


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

    def check(self):
        """Raise ValueError for settings that make no codec, or that MusicGen's checkpoints do not use and this
        port does not run."""
        if self.codebook_size < 2 or self.num_quantizers < 1:
            raise ValueError(f"EnCodec with codebooks of {self.codebook_size} entries and target bandwidth "
                             f"{self.target_bandwidths[-1]} kbps has no quantizer")
        if self.audio_channels != 1:
            raise ValueError(f"EnCodec of {self.audio_channels} channels is not supported (MusicGen's is mono)")
        unsupported = {
            "use_causal_conv": self.use_causal_conv,
            "normalize": self.normalize,
            "chunk_length_s": self.chunk_length_s is not None,
            "norm_type": self.norm_type != "weight_norm",
            "pad_mode": self.pad_mode not in ("reflect", "constant"),
            "trim_right_ratio": self.trim_right_ratio != 1.0,
        }
        for name, is_unsupported in unsupported.items():
            if is_unsupported:
                raise ValueError(f"EnCodec setting {name}={getattr(self, name)!r} is not supported")


def context_frames(config: EncodecConfig) -> int:
    """Frames either side that make a cut through the convolution stacks exact (an upper bound).

    The encoder's convolutions before the LSTM, and the decoder's after it, see only this far: outputs for a
    stretch of frames computed from the stretch plus this many frames either side are exact (away from the
    true ends, where the reference pads). At each resolution the strided (or transposed) conv reaches at most
    one step of its coarse side beyond a sample's own step, each residual block half its kernel span, and the
    outer conv half its kernel; summed in samples and rounded up to frames.
    """
    residual_reach = sum(
        config.residual_kernel_size // 2 * config.dilation_growth_rate**j for j in range(config.num_residual_layers)
    )
    reach = max(config.kernel_size, config.last_kernel_size) // 2
    step = 1  # samples a step, at the fine side of the current resolution
    for ratio in reversed(config.upsampling_ratios):
        reach += (residual_reach + ratio) * step
        step *= ratio
    return -(-reach // step)


def pad(x: mx.array, left: int, right: int, mode: str) -> mx.array:
    """Pad the time axis of (batch, time, channels) by reflection or with zeros ("constant", as audiocraft's
    SEANet configs may ask)."""
    return pad_reflect(x, left, right) if mode == "reflect" else mx.pad(x, [(0, 0), (left, right), (0, 0)])


def pad_reflect(x: mx.array, left: int, right: int) -> mx.array:
    """Reflect-pad the time axis of (batch, time, channels) like transformers' EncodecConv1d._pad1d."""
    if left == right == 0:
        return x
    # Reflection needs more samples than the padding: transformers zero-extends short inputs first.
    extra = max(0, max(left, right) - x.shape[1] + 1)
    if extra:
        x = mx.pad(x, [(0, 0), (0, extra), (0, 0)])
    length = x.shape[1]
    parts = [x[:, 1 : left + 1][:, ::-1], x, x[:, length - right - 1 : length - 1][:, ::-1]]
    x = mx.concatenate([p for p in parts if p.shape[1] > 0], axis=1)
    return x[:, : x.shape[1] - extra]


class EncodecConv1d(nn.Module):
    """A conv padded like transformers' non-causal one: (batch, time, in) -> (batch, ceil(time / stride), out).

    Padding (by reflection, or zeros: `pad_mode`) of kernel - stride samples (the odd one on the left), plus on the
    right what completes the last stride."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1,
                 pad_mode: str = "reflect"):
        super().__init__()
        self.pad_mode = pad_mode
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation)
        self.stride = stride
        self.kernel_size = (kernel_size - 1) * dilation + 1  # effective, with dilation
        self.padding_total = self.kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:
        extra = -x.shape[1] % self.stride  # completes the last stride
        right = self.padding_total // 2
        return self.conv(pad(x, self.padding_total - right, right + extra, self.pad_mode))


class EncodecConvTranspose1d(nn.Module):
    """A transposed conv with kernel 2 * stride, trimmed like transformers' non-causal one:
    (batch, time, in) -> (batch, time * stride, out)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.ConvTranspose1d(in_channels, out_channels, 2 * stride, stride=stride)
        self.stride = stride

    def __call__(self, x: mx.array) -> mx.array:
        y = self.conv(x)  # (batch, (time + 1) * stride, out)
        # Trim kernel - stride = stride samples: stride // 2 on the right, the rest on the left.
        right = self.stride // 2
        return y[:, self.stride - right : y.shape[1] - right]


class EncodecLSTM(nn.Module):
    """Stacked LSTM layers (torch's equations; `bias` is the sum of torch's two) with a skip connection around them.

    Causal, so a long input can be run a stretch at a time, each call starting from the state the last one ended in.
    """

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.lstm = [nn.LSTM(dim, dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array, state: LSTMState | None = None) -> tuple[mx.array, LSTMState]:
        """x (batch, time, dim), from `state` (zeros if None) -> (x + LSTM(x), the state after the last step)."""
        h = x
        new_state = []
        for layer, (hidden, cell) in zip(self.lstm, state or [(None, None)] * len(self.lstm)):
            h, cells = layer(h, hidden, cell)
            new_state.append((h[:, -1], cells[:, -1]))
        return h + x, new_state


class EncodecResnetBlock(nn.Module):
    """x + block(x): ELU, conv to dim / compress (dilated), ELU, 1x1 conv back; a 1x1 conv on the skip if configured."""

    def __init__(self, config: EncodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // config.compress
        # Same indices as transformers' block (ELU, conv, ELU, conv), so parameter names match.
        self.block = [
            nn.ELU(),
            EncodecConv1d(dim, hidden, config.residual_kernel_size, dilation=dilation, pad_mode=config.pad_mode),
            nn.ELU(),
            EncodecConv1d(hidden, dim, kernel_size=1, pad_mode=config.pad_mode),
        ]
        self.shortcut = EncodecConv1d(dim, dim, kernel_size=1, pad_mode=config.pad_mode) \
            if config.use_conv_shortcut else None

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.block:
            h = layer(h)
        return (x if self.shortcut is None else self.shortcut(x)) + h


class EncodecEncoder(nn.Module):
    """SEANet encoder: (batch, samples, audio_channels) -> (batch, ceil(samples / hop_length), hidden_size).

    layers: a conv; per ratio (in reverse), residual blocks, ELU and a conv of stride ratio that doubles the
    channels; then the LSTM, ELU and the last conv (transformers' indices, so parameter names match)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        dim = config.num_filters
        layers = [EncodecConv1d(config.audio_channels, dim, config.kernel_size, pad_mode=config.pad_mode)]
        for ratio in reversed(config.upsampling_ratios):
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
            layers += [nn.ELU(), EncodecConv1d(dim, 2 * dim, kernel_size=2 * ratio, stride=ratio,
                                               pad_mode=config.pad_mode)]
            dim *= 2
        layers += [
            EncodecLSTM(dim, config.num_lstm_layers),
            nn.ELU(),
            EncodecConv1d(dim, config.hidden_size, config.last_kernel_size, pad_mode=config.pad_mode),
        ]
        self.layers = layers

    def downsample(self, x: mx.array) -> mx.array:
        """The convolutions before the LSTM: audio (batch, samples, audio_channels) -> (batch, frames, dim)."""
        for layer in self.layers[:-3]:
            x = layer(x)
        return x

    def __call__(self, x: mx.array) -> mx.array:
        lstm, activation, last = self.layers[-3:]
        x, _ = lstm(self.downsample(x))
        return last(activation(x))


class EncodecDecoder(nn.Module):
    """SEANet decoder: (batch, frames, hidden_size) -> (batch, frames * hop_length, audio_channels).

    layers: a conv at the frame rate (`conv_in`), the LSTM (`lstm`), then the upsampling stack: per ratio, ELU, a
    transposed conv of stride ratio that halves the channels and residual blocks; then ELU and the last conv
    (transformers' indices, so parameter names match)."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        dim = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers = [
            EncodecConv1d(config.hidden_size, dim, config.kernel_size, pad_mode=config.pad_mode),
            EncodecLSTM(dim, config.num_lstm_layers),
        ]
        for ratio in config.upsampling_ratios:
            layers += [nn.ELU(), EncodecConvTranspose1d(dim, dim // 2, stride=ratio)]
            dim //= 2
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
        layers += [nn.ELU(),
                   EncodecConv1d(dim, config.audio_channels, config.last_kernel_size, pad_mode=config.pad_mode)]
        self.layers = layers

    @property
    def conv_in(self) -> EncodecConv1d:
        return self.layers[0]

    @property
    def lstm(self) -> EncodecLSTM:
        return self.layers[1]

    def upsample(self, x: mx.array) -> mx.array:
        """The upsampling stack: LSTM outputs (batch, frames, dim) -> audio (batch, frames * hop_length, channels)."""
        for layer in self.layers[2:]:
            x = layer(x)
        return x

    def __call__(self, x: mx.array) -> mx.array:
        x, _ = self.lstm(self.conv_in(x))
        return self.upsample(x)


class EncodecCodebook(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embed = mx.zeros((codebook_size, dim))

    def encode(self, x: mx.array) -> mx.array:
        """Index of the nearest entry for each vector of x (..., dim)."""
        # transformers' expression, so that near-ties go the same way.
        distance = (x.square().sum(-1, keepdims=True) - 2 * (x @ self.embed.T)) + self.embed.square().sum(-1)
        return mx.argmin(distance, axis=-1).astype(mx.int32)

    def decode(self, codes: mx.array) -> mx.array:
        return self.embed[codes]


class EncodecQuantizer(nn.Module):
    """Residual vector quantizer: each codebook quantizes what the previous ones left over."""

    def __init__(self, config: EncodecConfig):
        super().__init__()
        self.layers = [EncodecCodebook(config.codebook_size, config.codebook_dim) for _ in range(config.num_quantizers)]

    def encode(self, x: mx.array, num_codebooks: int) -> mx.array:
        """(batch, frames, dim) embeddings -> (batch, num_codebooks, frames) codes."""
        codes = []
        for codebook in self.layers[:num_codebooks]:
            indices = codebook.encode(x)
            x = x - codebook.decode(indices)
            codes.append(indices)
        return mx.stack(codes, axis=1)

    def decode(self, codes: mx.array) -> mx.array:
        """(batch, codebooks, frames) codes -> (batch, frames, dim), the sum of their entries."""
        x = self.layers[0].decode(codes[:, 0])
        for k in range(1, codes.shape[1]):
            x = x + self.layers[k].decode(codes[:, k])
        return x


class EncodecModel(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        config.check()
        self.config = config
        self.encoder = EncodecEncoder(config)
        self.decoder = EncodecDecoder(config)
        self.quantizer = EncodecQuantizer(config)

    def encode(self, audio: mx.array, num_codebooks: int | None = None) -> mx.array:
        """(batch, audio_channels, samples) audio -> (batch, num_codebooks, ceil(samples / hop_length)) int32 codes."""
        if num_codebooks is None:
            num_codebooks = self.config.num_quantizers
        x = self.encoder(audio.transpose(0, 2, 1))
        return self.quantizer.encode(x, num_codebooks)

    def decode(self, codes: mx.array) -> mx.array:
        """(batch, num_codebooks, frames) codes -> (batch, audio_channels, frames * hop_length) float32 audio."""
        return self.decoder(self.quantizer.decode(codes)).transpose(0, 2, 1)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers' EncodecModel tensors (prefix `audio_encoder.` removed) to this module's parameters.

        Weight norm is folded, k-means state dropped, conv weights laid out as MLX's, and each LSTM layer's two
        biases summed. Unknown names pass through, so that strict loading reports them."""
        weights = fold_weight_norm(weights)
        # The decoder's transposed convs are its top-level convs other than the first and the last.
        top_level = sorted(
            int(m.group(1)) for k in weights if (m := re.fullmatch(r"decoder\.layers\.(\d+)\.conv\.weight", k))
        )
        transposed = {f"decoder.layers.{i}.conv.weight" for i in top_level[1:-1]}
        out = {}
        for key, value in weights.items():
            module, _, name = key.rpartition(".")
            if key in transposed:
                out[key] = value.transpose(1, 2, 0)  # torch ConvTranspose1d (in, out, kernel) -> (out, kernel, in)
            elif module.endswith(".conv") and name == "weight":
                out[key] = value.transpose(0, 2, 1)  # torch Conv1d (out, in, kernel) -> (out, kernel, in)
            elif module.endswith(".codebook") and name in ("inited", "cluster_size", "embed_avg"):
                continue  # k-means training state
            elif module.endswith(".codebook") and name == "embed":
                out[module.removesuffix(".codebook") + ".embed"] = value
            elif m := re.fullmatch(r"(.*\.lstm)\.(weight_ih|weight_hh|bias_ih|bias_hh)_l(\d+)", key):
                lstm, kind, layer = m.groups()
                target = f"{lstm}.{layer}." + {"weight_ih": "Wx", "weight_hh": "Wh"}.get(kind, "bias")
                out[target] = out[target] + value if target in out else value
            else:
                out[key] = value
        return out


def fold_weight_norm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace weight-norm pairs (either spelling) by `weight` = g * v / ||v||, the norm over all dims but the first."""
    spellings = {
        ".weight_g": ".weight_v",
        ".parametrizations.weight.original0": ".parametrizations.weight.original1",
    }
    out = dict(weights)
    for key in weights:
        for g_suffix, v_suffix in spellings.items():
            module = key.removesuffix(g_suffix)
            if module != key and module + v_suffix in weights:
                g, v = out.pop(key), out.pop(module + v_suffix)
                norm = mx.sqrt(v.square().sum(axis=tuple(range(1, v.ndim)), keepdims=True))
                out[module + ".weight"] = g * v / norm
    return out
