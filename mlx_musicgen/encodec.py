"""EnCodec, MusicGen's audio codec, in MLX: audio <-> discrete codes.

Inside the model, activations are (batch, time, channels). The public `encode`/`decode` take and return
(batch, channels, samples) audio and (batch, codebooks, frames) codes, like transformers' EncodecModel.

Written for speed on a 2-core CPU as well as on a GPU, with portable MLX ops only:
- MLX's CPU convolutions are slow on long sequences (transposed ones ~20x slower than torch), so every
  convolution is one matmul over all kernel taps plus, where needed, a sum of shifted slices.
- The convolutions around the LSTMs run on overlapping chunks of frames (exact, see run_in_chunks); where the
  BLAS does not thread itself (OpenBLAS), chunks alternate between two streams and the LSTMs split their
  recurrent product over two streams.
- exp, in ELU and the LSTM's sigmoids, is fused polynomial arithmetic (MLX's CPU exp is scalar and slow).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

from .cpu import blas_threads_itself, parallel_streams


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
        """Raise ValueError for settings that MusicGen's checkpoints do not use and this port does not run."""
        unsupported = {
            "use_causal_conv": self.use_causal_conv,
            "normalize": self.normalize,
            "chunk_length_s": self.chunk_length_s is not None,
            "norm_type": self.norm_type != "weight_norm",
            "pad_mode": self.pad_mode != "reflect",
            "trim_right_ratio": self.trim_right_ratio != 1.0,
        }
        for name, is_unsupported in unsupported.items():
            if is_unsupported:
                raise ValueError(f"EnCodec setting {name}={getattr(self, name)!r} is not supported")


# exp, for ELU and the LSTM's gates. MLX's CPU exp is scalar code calling libm (~13 ns an element), so exp is
# built from plain arithmetic, which MLX compiles into vectorised loops: expm1(u) for u >= 0 as Taylor at
# v = u / 8, doubled three times by expm1(2v) = expm1(v) * (expm1(v) + 2). That keeps its accuracy relative to
# tiny values, needs no exponent bits, and overflows to inf cleanly far out; exp(-u) and the rest follow from it.
# MLX fuses at most 11 dependent ops into one kernel, so each function is two compiled halves: the Taylor part
# (*_reduced) and the doublings with what follows, ~10 ops deep each.
EXPM1_DOUBLINGS = 3
EXPM1_TAYLOR = tuple(1 / math.factorial(j + 1) for j in range(7))  # expm1(v) = v * (1 + v/2 + v**2/6 + ...)


def expm1_reduced(u: mx.array, scale: float) -> mx.array:
    """expm1(v) for v = u * scale / 8, u >= 0, by Taylor (in Estrin's scheme, which is shallow)."""
    c = EXPM1_TAYLOR
    v = u * (scale / 2**EXPM1_DOUBLINGS)
    v2 = v * v
    low = (c[0] + v * c[1]) + v2 * (c[2] + v * c[3])
    high = (c[4] + v * c[5]) + v2 * c[6]
    return v * (low + (v2 * v2) * high)


def expm1_doubled(d: mx.array) -> mx.array:
    """expm1(8v) from d = expm1(v)."""
    for _ in range(EXPM1_DOUBLINGS):
        d = d * (d + 2.0)
    return d


@mx.compile
def elu_reduced(x: mx.array) -> mx.array:
    return expm1_reduced(mx.abs(x) - x, 0.5)  # u = max(-x, 0)


@mx.compile
def elu_from_reduced(x: mx.array, d: mx.array) -> mx.array:
    negative_part = -1.0 / (1.0 + 1.0 / expm1_doubled(d))  # expm1(-u) = -expm1(u) / (1 + expm1(u)): -1 at inf
    return (x + (mx.abs(x) - x) * 0.5) + negative_part  # max(x, 0) + expm1(min(x, 0))


def elu(x: mx.array) -> mx.array:
    """torch's ELU (alpha 1), in two passes over memory; max abs error 1.7e-7, relative 4e-7."""
    return elu_from_reduced(x, elu_reduced(x))


class ELU(nn.Module):
    def __call__(self, x: mx.array) -> mx.array:
        return elu(x)


@mx.compile
def add_all(*arrays: mx.array) -> mx.array:
    return sum(arrays[1:], arrays[0])


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


def conv1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, dilation: int = 1) -> mx.array:
    """Unpadded convolution of x (batch, time, in) with an MLX-layout weight (out, kernel, in)."""
    out_channels, kernel, in_channels = weight.shape
    if stride > 1:
        # Fold the stride into the channels (frames of `stride` samples, the taps grouped by frame) and
        # convolve the frames with stride 1. EnCodec's kernels are 2 * stride: the reshapes copy nothing.
        groups = -(-kernel // stride)
        num_out = (x.shape[1] - kernel) // stride + 1
        weight = mx.pad(weight, [(0, 0), (0, groups * stride - kernel), (0, 0)])
        length = (num_out + groups - 1) * stride
        x = x[:, :length] if x.shape[1] >= length else mx.pad(x, [(0, 0), (0, length - x.shape[1]), (0, 0)])
        frames = x.reshape(x.shape[0], -1, stride * in_channels)
        return conv1d(frames, weight.reshape(out_channels, groups, stride * in_channels), bias)
    batch, length, _ = x.shape
    num_out = length - (kernel - 1) * dilation
    if kernel == 1:
        return mx.addmm(bias, x, weight.reshape(out_channels, in_channels).T)
    if in_channels < out_channels:
        # The input is the smaller tensor: lay the taps side by side and do one matmul.
        taps = [x[:, k * dilation : k * dilation + num_out] for k in range(kernel)]
        return mx.addmm(bias, mx.concatenate(taps, axis=-1), weight.reshape(out_channels, -1).T)
    # The output is the smaller tensor: one matmul for all taps, then add the taps' outputs shifted into place.
    y = (x @ weight.reshape(-1, in_channels).T).reshape(batch, length, out_channels, kernel)
    return add_all(bias, *(y[:, k * dilation : k * dilation + num_out, :, k] for k in range(kernel)))


class EncodecConv1d(nn.Module):
    """Non-causal conv padded like transformers': reflect, asymmetric, plus what completes the last frame."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, dilation: int = 1):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size)  # the parameters; see conv1d()
        self.stride = stride
        self.dilation = dilation
        self.kernel_size = (kernel_size - 1) * dilation + 1  # effective, with dilation
        self.padding_total = self.kernel_size - stride

    def __call__(self, x: mx.array) -> mx.array:
        length = x.shape[1]
        num_frames = -(-(length - self.kernel_size + self.padding_total) // self.stride)
        extra = num_frames * self.stride + self.kernel_size - self.padding_total - length
        right = self.padding_total // 2
        x = pad_reflect(x, self.padding_total - right, right + extra)
        return conv1d(x, self.conv.weight, self.conv.bias, self.stride, self.dilation)


class EncodecConvTranspose1d(nn.Module):
    """Non-causal transposed conv with kernel = 2 * stride, trimmed like transformers'.

    It is computed as the equivalent stride-1 convolution over input frames: output frame j (stride
    samples) is x[j - 1] @ taps[stride:] + x[j] @ taps[:stride]. `conv.weight` is stored in that form,
    (stride * out, 2, in), and `conv.bias` repeated for each sample of a frame; see `sanitize`.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, stride * out_channels, kernel_size=2)  # the parameters
        self.stride = stride
        self.out_channels = out_channels

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, _ = x.shape
        frames = conv1d(mx.pad(x, [(0, 0), (1, 1), (0, 0)]), self.conv.weight, self.conv.bias)
        y = frames.reshape(batch, (length + 1) * self.stride, self.out_channels)
        # Trim the stride extra samples: stride // 2 on the right, the rest on the left.
        right = self.stride // 2
        return y[:, self.stride - right : y.shape[1] - right]


# One LSTM step as four compiled functions: ~15 tasks for MLX's CPU scheduler rather than ~25. A step's
# arrays are small, so the per-task cost (~4 us) is what counts.
@mx.compile
def gates_reduced(gates_x: mx.array, gates_h: mx.array, gate_scale: mx.array) -> mx.array:
    return expm1_reduced(mx.abs((gates_x + gates_h) * gate_scale), 1.0)


@mx.compile
def gates_sigmoid(gates_x: mx.array, gates_h: mx.array, gate_scale: mx.array, d: mx.array) -> mx.array:
    """sigmoid(z) = step(z) - sign(z) / (2 + expm1(|z|)), for z = (gates_x + gates_h) * gate_scale."""
    sign = mx.sign((gates_x + gates_h) * gate_scale)
    return (sign + 1.0) * 0.5 - sign / (2.0 + expm1_doubled(d))


@mx.compile
def cell_update(gates: mx.array, cell: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """torch's update (gates i, f, g, o), with tanh(g) = 2 * sigmoid(2g) - 1: gate_scale is 2 for g, so one
    sigmoid covers all gates. Returns the new cell, o, and the Taylor part of tanh(cell)."""
    i, f, g, o = mx.split(gates, 4, axis=-1)
    cell = f * cell + i * (2.0 * g - 1.0)
    return cell, o, expm1_reduced(mx.abs(cell), 2.0)


@mx.compile
def hidden_state(o: mx.array, cell: mx.array, d: mx.array) -> mx.array:
    return o * (mx.sign(cell) * (1.0 - 2.0 / (2.0 + expm1_doubled(d))))  # tanh(c) = sign(c) * (1 - 2 / (e**2|c| + 1))


def lstm_cell(
    gates_x: mx.array, gates_h: mx.array, cell: mx.array, gate_scale: mx.array
) -> tuple[mx.array, mx.array]:
    """(h, c) after one step, from the input's and the hidden state's shares of the gates."""
    gates = gates_sigmoid(gates_x, gates_h, gate_scale, gates_reduced(gates_x, gates_h, gate_scale))
    cell, o, d = cell_update(gates, cell)
    return hidden_state(o, cell, d), cell


class LSTM(nn.Module):
    """One LSTM layer; `bias` is the sum of torch's two biases."""

    def __init__(self, dim: int):
        super().__init__()
        self.Wx = mx.zeros((4 * dim, dim))
        self.Wh = mx.zeros((4 * dim, dim))
        self.bias = mx.zeros((4 * dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return self.run(x)[0]

    def run(
        self, x: mx.array, state: tuple[mx.array, mx.array] | None = None
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """x (batch, time, dim) from state (h, c), zeros if None -> (outputs, the final (h, c))."""
        batch, length, dim = x.shape
        gates_x = mx.addmm(self.bias, x, self.Wx.T)  # the input's share of the gates, all steps at once
        split = mx.default_device() == mx.cpu and not blas_threads_itself()
        recurrent = self.split_recurrent_product() if split else lambda h: h @ self.Wh.T
        gate_scale = mx.concatenate([mx.ones(2 * dim), mx.full(dim, 2.0), mx.ones(dim)])
        h, c = state if state is not None else (mx.zeros((batch, dim)), mx.zeros((batch, dim)))
        outputs = []
        for t in range(length):
            h, c = lstm_cell(gates_x[:, t], recurrent(h), c, gate_scale)
            outputs.append(h)
        return mx.stack(outputs, axis=1), (h, c)

    def split_recurrent_product(self) -> Callable[[mx.array], mx.array]:
        """h -> h @ Wh.T as two halves on two streams, each a batch of products of 1/16 of Wh's rows.

        The product reads all of Wh for a single row of h. OpenBLAS runs products this small on one
        core without repacking the weight, so the two halves run in parallel on two cores: ~1.7x
        faster than one (1, 1024) x (1024, 4096) product on a 2-core x86 CPU.
        """
        dim = self.Wh.shape[1]
        blocks = math.gcd(16, 4 * dim)
        halves = self.Wh.reshape(2, blocks // 2, -1, dim).transpose(0, 1, 3, 2)

        def product(h: mx.array) -> mx.array:
            gates = []
            for stream, weight in zip(parallel_streams(), halves):
                with mx.stream(stream):
                    gates.append((h @ weight).transpose(1, 0, 2).reshape(h.shape[0], -1))
            return mx.concatenate(gates, axis=-1)

        return product


class EncodecLSTM(nn.Module):
    """Stacked LSTM with a skip connection around it."""

    def __init__(self, dim: int, num_layers: int):
        super().__init__()
        self.lstm = [LSTM(dim) for _ in range(num_layers)]

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.lstm:
            h = layer(h)
        return h + x


class EncodecResnetBlock(nn.Module):
    def __init__(self, config: EncodecConfig, dim: int, dilation: int):
        super().__init__()
        hidden = dim // config.compress
        # Same indices as transformers' block (ELU, conv, ELU, conv), so parameter names match.
        self.block = [
            ELU(),
            EncodecConv1d(dim, hidden, config.residual_kernel_size, dilation=dilation),
            ELU(),
            EncodecConv1d(hidden, dim, kernel_size=1),
        ]
        self.shortcut = EncodecConv1d(dim, dim, kernel_size=1) if config.use_conv_shortcut else None

    def __call__(self, x: mx.array) -> mx.array:
        h = x
        for layer in self.block:
            h = layer(h)
        return (x if self.shortcut is None else self.shortcut(x)) + h


def run_in_chunks(
    layers: list[nn.Module], x: mx.array, num_frames: int, step_in: int, step_out: int, context: int, chunk_frames: int
) -> mx.array:
    """Apply convolutional `layers` to x (batch, time, channels) in overlapping chunks; same result as in one piece.

    x has `step_in` time steps a frame and the output `step_out`. Each chunk of `chunk_frames` frames is
    computed with `context` frames of its neighbours on either side, which covers everything its output
    depends on; the context's own output (wrong near the cut, where the padding sees the cut) is dropped.
    Small chunks keep buffers small (on a CPU, faulting in fresh large buffers costs more than the
    arithmetic on them), and alternating two streams keeps two cores busy.
    """
    outputs = []
    for i, start in enumerate(range(0, num_frames, chunk_frames)):
        stop = min(start + chunk_frames, num_frames)
        first, last = max(0, start - context), min(num_frames, stop + context)
        with mx.stream(parallel_streams()[i % 2]):
            y = x[:, first * step_in : last * step_in]
            for layer in layers:
                y = layer(y)
            outputs.append(y[:, (start - first) * step_out : (stop - first) * step_out])
    return mx.concatenate(outputs, axis=1)


def chunk_context(config: EncodecConfig) -> int:
    """Frames of context that make chunked convolutions exact, in the encoder and the decoder (an upper bound).

    At each resolution, the strided (or transposed) conv reaches at most one step of its coarse side beyond
    the step that a sample belongs to, and each residual block half its kernel span; the outer conv half its
    kernel. Summed in samples and rounded up to frames.
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


CHUNK_FRAMES = 50  # 1 s at 50 Hz: the largest buffers stay at a few MB


class EncodecEncoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        dim = config.num_filters
        layers = [EncodecConv1d(config.audio_channels, dim, config.kernel_size)]
        for ratio in reversed(config.upsampling_ratios):
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
            layers += [ELU(), EncodecConv1d(dim, 2 * dim, kernel_size=2 * ratio, stride=ratio)]
            dim *= 2
        layers += [
            EncodecLSTM(dim, config.num_lstm_layers),
            ELU(),
            EncodecConv1d(dim, config.hidden_size, config.last_kernel_size),
        ]
        self.layers = layers
        self.hop_length = config.hop_length
        self.context = chunk_context(config)

    def __call__(self, x: mx.array, chunk_frames: int = CHUNK_FRAMES) -> mx.array:
        """(batch, samples, audio_channels) audio -> (batch, frames, hidden) embeddings, frames = ceil(samples / hop).

        The downsampling convolutions run in chunks (see run_in_chunks), the LSTM and the last conv over all frames.
        """
        num_frames = -(-x.shape[1] // self.hop_length)
        *convolutions, lstm, activation, last = self.layers
        x = run_in_chunks(convolutions, x, num_frames, self.hop_length, 1, self.context, chunk_frames)
        return last(activation(lstm(x)))


class EncodecDecoder(nn.Module):
    def __init__(self, config: EncodecConfig):
        super().__init__()
        dim = config.num_filters * 2 ** len(config.upsampling_ratios)
        layers = [
            EncodecConv1d(config.hidden_size, dim, config.kernel_size),
            EncodecLSTM(dim, config.num_lstm_layers),
        ]
        for ratio in config.upsampling_ratios:
            layers += [ELU(), EncodecConvTranspose1d(dim, dim // 2, stride=ratio)]
            dim //= 2
            for j in range(config.num_residual_layers):
                layers.append(EncodecResnetBlock(config, dim, config.dilation_growth_rate**j))
        layers += [ELU(), EncodecConv1d(dim, config.audio_channels, config.last_kernel_size)]
        self.layers = layers
        self.hop_length = config.hop_length
        self.context = chunk_context(config)

    def __call__(self, x: mx.array, chunk_frames: int = CHUNK_FRAMES) -> mx.array:
        """(batch, frames, hidden) embeddings -> (batch, frames * hop_length, audio_channels) audio.

        The first conv, the LSTM and the first upsampling run over all frames (in chunks, that one would read
        its large weight once a chunk), the other upsampling layers in chunks (see run_in_chunks).
        """
        first, lstm, activation, upsample, *rest = self.layers
        num_frames = x.shape[1]
        x = upsample(activation(lstm(first(x))))
        return run_in_chunks(rest, x, num_frames, upsample.stride, self.hop_length, self.context, chunk_frames)


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
        """(batch, audio_channels, samples) audio -> (batch, num_codebooks, frames) int32 codes."""
        if num_codebooks is None:
            num_codebooks = self.config.num_quantizers
        x = self.encoder(audio.transpose(0, 2, 1))
        return self.quantizer.encode(x, num_codebooks)

    def decode(self, codes: mx.array) -> mx.array:
        """(batch, num_codebooks, frames) codes -> (batch, audio_channels, frames * hop_length) float32 audio."""
        return self.decoder(self.quantizer.decode(codes)).transpose(0, 2, 1)

    @staticmethod
    def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map transformers' EncodecModel tensors (prefix `audio_encoder.` removed) to this module's parameters."""
        weights = fold_weight_norm(weights)
        # The decoder's transposed convs are its top-level convs other than the first and the last.
        top_level = sorted(
            int(m.group(1)) for k in weights if (m := re.fullmatch(r"decoder\.layers\.(\d+)\.conv\.weight", k))
        )
        transposed = {f"decoder.layers.{i}.conv" for i in top_level[1:-1]}
        out = {}
        for key, value in weights.items():
            module, _, name = key.rpartition(".")
            if module in transposed and name == "weight":
                out[key] = frame_conv_weight(value)
            elif module in transposed and name == "bias":
                stride = weights[module + ".weight"].shape[-1] // 2
                out[key] = mx.tile(value, (stride,))
            elif module.endswith(".conv") and name == "weight":
                out[key] = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
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


def frame_conv_weight(weight: mx.array) -> mx.array:
    """torch ConvTranspose1d weight (in, out, 2 * stride) -> EncodecConvTranspose1d's (stride * out, 2, in)."""
    in_channels, out_channels, kernel = weight.shape
    stride = kernel // 2
    # Tap q * stride + r of input step j lands on sample r of output frame j + q, and the frame
    # convolution sees x[j - 1] (q = 1) before x[j] (q = 0).
    taps = weight.reshape(in_channels, out_channels, 2, stride)[:, :, ::-1]
    return taps.transpose(3, 1, 2, 0).reshape(stride * out_channels, 2, in_channels)
