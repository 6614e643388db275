"""EnCodec on a CPU: `optimize_encodec(model)` swaps an EncodecModel's modules, in place, for ones with the same
interface and the same outputs (up to float32 reordering) that run faster on a CPU (see docs/performance.md):
- MLX's CPU convolutions are slow on long sequences (transposed ones most of all), so every convolution is one
  matmul over all kernel taps plus, where needed, a sum of shifted slices, and a transposed one is the equivalent
  stride-1 convolution over frames of `stride` samples (its weight re-laid at swap time; nothing is saved so).
- Every product (in float32) is numpy's, whose OpenBLAS ran them 1.3-2.9x as fast as MKL through MLX (matmul).
- The convolution stacks around the LSTMs run on overlapping chunks of frames (exact, see run_in_chunks).
- exp, in ELU, is fused polynomial arithmetic (MLX's CPU exp is scalar and slow).
- An LSTM's recurrence, 50 small steps a second of audio a layer, runs in numpy (NumpyLSTM).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..encodec import EncodecConfig, EncodecDecoder, EncodecEncoder, EncodecModel, context_frames

CHUNK_FRAMES = 50  # 1 s at 50 Hz: the largest buffers stay at a few MB


# exp, for ELU. MLX's CPU exp is scalar code calling libm, so exp is built from plain arithmetic, which MLX
# compiles into vectorised loops: expm1(u) for u >= 0 as Taylor at v = u / 8, doubled three times by
# expm1(2v) = expm1(v) * (expm1(v) + 2). That keeps its accuracy relative to tiny values, needs no exponent bits,
# and overflows to inf cleanly far out; exp(-u) and the rest follow from it.
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


class PolynomialELU(nn.Module):
    """nn.ELU (alpha 1) in two passes over memory; max abs error 1.7e-7, relative 4e-7."""

    def __call__(self, x: mx.array) -> mx.array:
        return elu_from_reduced(x, elu_reduced(x))


@mx.compile
def add_all(*arrays: mx.array) -> mx.array:
    return sum(arrays[1:], arrays[0])


def matmul(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """x (..., in) @ weight (out, in).T (+ bias), by numpy's BLAS where both are float32 (x is evaluated here).

    numpy's OpenBLAS has kernels for CPUs that MKL runs its generic code on (AMD's), and ran each of EnCodec's
    products 1.3-2.9x as fast as MKL through MLX, the copy back into MLX included (docs/performance.md)."""
    if any(a.dtype != mx.float32 for a in (x, weight, bias) if a is not None):
        return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)
    y = np.asarray(x.reshape(-1, x.shape[-1])) @ np.asarray(weight).T
    if bias is not None:
        y += np.asarray(bias)
    return mx.array(y).reshape(*x.shape[:-1], weight.shape[0])


def conv1d(x: mx.array, weight: mx.array, bias: mx.array, stride: int = 1, dilation: int = 1) -> mx.array:
    """Unpadded convolution of x (batch, time, in) with an MLX-layout weight (out, kernel, in), as matmuls."""
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
        return matmul(x, weight.reshape(out_channels, in_channels), bias)
    if in_channels < out_channels:
        # The input is the smaller tensor: lay the taps side by side and do one matmul.
        taps = [x[:, k * dilation : k * dilation + num_out] for k in range(kernel)]
        return matmul(mx.concatenate(taps, axis=-1), weight.reshape(out_channels, -1), bias)
    # The output is the smaller tensor: one matmul for all taps, then add the taps' outputs shifted into place.
    y = matmul(x, weight.reshape(-1, in_channels)).reshape(batch, length, out_channels, kernel)
    return add_all(bias, *(y[:, k * dilation : k * dilation + num_out, :, k] for k in range(kernel)))


class MatmulConv1d(nn.Module):
    """nn.Conv1d (no padding) computed by conv1d(), with the same parameters."""

    def __init__(self, conv: nn.Conv1d):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        self.stride, self.dilation = conv.stride, conv.dilation

    def __call__(self, x: mx.array) -> mx.array:
        return conv1d(x, self.weight, self.bias, self.stride, self.dilation)


class FrameConvTranspose1d(nn.Module):
    """nn.ConvTranspose1d with kernel 2 * stride (no padding), as a stride-1 convolution over frames.

    Output frame j (stride samples) is x[j - 1] @ taps[stride:] + x[j] @ taps[:stride], for j = 0 .. time:
    (batch, time, in) -> (batch, (time + 1) * stride, out), like the transposed conv."""

    def __init__(self, conv: nn.ConvTranspose1d):
        super().__init__()
        out_channels, kernel, in_channels = conv.weight.shape
        self.stride, self.out_channels = conv.stride, out_channels
        # Tap q * stride + r of input step j lands on sample r of output frame j + q, and the frame convolution
        # sees x[j - 1] (q = 1) before x[j] (q = 0): (out, 2 * stride, in) -> (stride * out, 2, in).
        taps = conv.weight.reshape(out_channels, 2, self.stride, in_channels)[:, ::-1]
        self.frame_weight = mx.contiguous(taps.transpose(2, 0, 1, 3).reshape(-1, 2, in_channels))
        self.frame_bias = mx.tile(conv.bias, (self.stride,))

    def __call__(self, x: mx.array) -> mx.array:
        batch, length, _ = x.shape
        frames = conv1d(mx.pad(x, [(0, 0), (1, 1), (0, 0)]), self.frame_weight, self.frame_bias)
        return frames.reshape(batch, (length + 1) * self.stride, self.out_channels)


class NumpyLSTM(nn.Module):
    """nn.LSTM (with bias, batched input) whose recurrence runs in numpy; the same parameters.

    Each step multiplies one row per item by the whole recurrent weight (16 MB for EnCodec 32 kHz), which stays
    in the CPU's cache from step to step. numpy's own BLAS (OpenBLAS, on every core unless OPENBLAS_NUM_THREADS
    says otherwise) does that product 3-4x faster than MKL's through MLX, and a step's dozen small element-wise
    ops cost microseconds in numpy against tens of microseconds each as MLX tasks (docs/performance.md). The
    input's share of the gates, one large product for all steps, is numpy's too (~2x MKL's speed through MLX
    here)."""

    def __init__(self, layer: nn.LSTM):
        super().__init__()
        self.Wx, self.Wh, self.bias = layer.Wx, layer.Wh, layer.bias

    def __call__(
        self, x: mx.array, hidden: mx.array | None = None, cell: mx.array | None = None
    ) -> tuple[mx.array, mx.array]:
        """x (batch, time, dim) from (hidden, cell) (batch, dim), zeros if None -> h and c at every step."""
        batch, length, _ = x.shape
        dim = self.Wh.shape[1]
        weight, bias = (np.asarray(a.astype(mx.float32)) for a in (self.Wx, self.bias))
        gates_x = np.asarray(x.astype(mx.float32)) @ weight.T + bias  # all steps at once
        recurrent = np.asarray(self.Wh.astype(mx.float32)).T  # a view: (dim, 4 * dim)
        h = np.zeros((batch, dim), np.float32) if hidden is None else np.array(hidden.astype(mx.float32))
        c = np.zeros((batch, dim), np.float32) if cell is None else np.array(cell.astype(mx.float32))
        hs, cs = np.empty((batch, length, dim), np.float32), np.empty((batch, length, dim), np.float32)
        gates = np.empty((batch, 4 * dim), np.float32)
        i, f, g, o = (slice(k * dim, (k + 1) * dim) for k in range(4))  # torch's order of the gates
        with np.errstate(over="ignore"):  # exp(-z) overflows to inf for z < -88: the sigmoid is then 0, exactly
            for t in range(length):
                np.matmul(h, recurrent, out=gates)
                gates += gates_x[:, t]
                cell_input = np.tanh(gates[:, g])
                np.reciprocal(np.exp(np.negative(gates, out=gates), out=gates) + 1.0, out=gates)  # sigmoid
                c = gates[:, f] * c + gates[:, i] * cell_input
                h = gates[:, o] * np.tanh(c)
                hs[:, t], cs[:, t] = h, c
        return mx.array(hs, dtype=x.dtype), mx.array(cs, dtype=x.dtype)


def run_in_chunks(
    layers: list[nn.Module], x: mx.array, num_frames: int, step_in: int, step_out: int, context: int, chunk_frames: int
) -> mx.array:
    """Apply convolutional `layers` to x (batch, time, channels) in overlapping chunks; same result as in one piece.

    x has `step_in` time steps a frame and the output `step_out`. Each chunk of `chunk_frames` frames is
    computed with `context` frames of its neighbours on either side, which covers everything its output
    depends on; the context's own output (wrong near the cut, where the padding sees the cut) is dropped.
    Small chunks keep buffers small (on a CPU, faulting in fresh large buffers costs more than the
    arithmetic on them).
    """
    outputs = []
    for start in range(0, num_frames, chunk_frames):
        stop = min(start + chunk_frames, num_frames)
        first, last = max(0, start - context), min(num_frames, stop + context)
        y = x[:, first * step_in : last * step_in]
        for layer in layers:
            y = layer(y)
        outputs.append(y[:, (start - first) * step_out : (stop - first) * step_out])
    return mx.concatenate(outputs, axis=1)


class Chunked:
    """Shared by ChunkedEncoder and ChunkedDecoder: the portable stack's own layers (so the same parameter names),
    run in chunks of `chunk_frames` frames with the context that makes them exact."""

    def __init__(self, stack: EncodecEncoder | EncodecDecoder, config: EncodecConfig):
        nn.Module.__init__(self)
        self.layers = stack.layers
        self.hop_length = config.hop_length
        self.context = context_frames(config)
        self.chunk_frames = CHUNK_FRAMES


class ChunkedEncoder(Chunked, EncodecEncoder):
    """EncodecEncoder whose convolutions before the LSTM run in chunks."""

    def downsample(self, x: mx.array) -> mx.array:
        num_frames = -(-x.shape[1] // self.hop_length)
        return run_in_chunks(self.layers[:-3], x, num_frames, self.hop_length, 1, self.context, self.chunk_frames)


class ChunkedDecoder(Chunked, EncodecDecoder):
    """EncodecDecoder whose upsampling stack runs in chunks, but for its first transposed conv, which runs over all
    frames (in chunks, it would read its large weight once a chunk)."""

    def upsample(self, x: mx.array) -> mx.array:
        activation, upsample, *rest = self.layers[2:]
        num_frames = x.shape[1]
        x = upsample(activation(x))
        return run_in_chunks(rest, x, num_frames, upsample.stride, self.hop_length, self.context, self.chunk_frames)


CPU_FORMS: dict[type, Callable[[nn.Module], nn.Module]] = {
    nn.Conv1d: MatmulConv1d,
    nn.ConvTranspose1d: FrameConvTranspose1d,
    nn.ELU: lambda _: PolynomialELU(),
    nn.LSTM: NumpyLSTM,
}


def cpu_form(module: nn.Module) -> nn.Module:
    """The module's CPU form if it has one; otherwise the module itself, with its children swapped in place."""
    if type(module) in CPU_FORMS:
        return CPU_FORMS[type(module)](module)
    for key, value in module.items():
        if isinstance(value, list):
            value[:] = [cpu_form(item) if isinstance(item, nn.Module) else item for item in value]
        elif isinstance(value, nn.Module):
            module[key] = cpu_form(value)
    return module


def optimize_encodec(model: EncodecModel) -> None:
    """Swap a loaded EncodecModel's modules for their CPU forms, in place (see the module's docstring)."""
    cpu_form(model)
    if not isinstance(model.encoder, ChunkedEncoder):
        model.encoder = ChunkedEncoder(model.encoder, model.config)
        model.decoder = ChunkedDecoder(model.decoder, model.config)
    mx.eval(model.parameters())  # re-lay the weights now, once, rather than in the first decode
