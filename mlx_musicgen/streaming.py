"""Decoding EnCodec codes that arrive a stretch at a time, into exactly the audio of a one-shot decode.

The SEANet decoder is a frame-rate conv (7 taps: 3 frames of look-ahead), a causal LSTM (unbounded memory),
then an upsampling stack whose reach is a few frames either side (encodec.context_frames). So: the first conv
runs on each new stretch with its reach of context either side; the LSTM carries its state from stretch to
stretch; the upsampling stack runs with `context` frames either side, whose samples are thrown away. Only the
true ends of the stream see the reference's reflect padding, so seams are exact (no clicks), and memory stays
flat however long the stream. Whatever form the model's modules have (portable or CPU), this runs them.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from .encodec import EncodecModel, LSTMState, context_frames
from .sampling import check_tokens


class StreamingDecoder:
    def __init__(self, model: EncodecModel):
        self.quantizer = model.quantizer
        self.decoder = model.decoder
        self.hop = model.config.hop_length
        self.reach = (self.decoder.conv_in.kernel_size - 1) // 2  # frames the first conv looks ahead and back
        self.context = context_frames(model.config)

        self.embeddings = None  # quantized frames not yet through the first conv, with `reach` behind them
        self.embeddings_start = 0  # frame index of embeddings[:, 0]
        self.conv_done = 0  # frames through the first conv and the LSTM
        self.lstm_state: LSTMState | None = None
        self.features = None  # LSTM output frames not yet turned into audio, with `context` behind them
        self.features_start = 0
        self.audio_done = 0  # frames turned into audio

    def push(self, codes: mx.array, last: bool = False) -> mx.array:
        """codes (batch, codebooks, n) -> the (batch, channels, samples) audio that is now final (maybe none);
        `last`: these are the stream's last codes, so all the rest of the audio (as push, then flush, would give,
        in one pass through the upsampling stack instead of two)."""
        embeddings = self.quantizer.decode(codes)  # (batch, n, dim)
        self.embeddings = embeddings if self.embeddings is None else mx.concatenate([self.embeddings, embeddings], 1)
        return self.advance(final=last)

    def flush(self) -> mx.array:
        """The rest of the audio, once the last codes have been pushed."""
        return self.advance(final=True)

    def advance(self, final: bool) -> mx.array:
        total = self.embeddings_start + self.embeddings.shape[1]
        ready = total if final else total - self.reach
        if ready > self.conv_done:
            self.run_lstm(ready)
        features_end = self.features_start + (0 if self.features is None else self.features.shape[1])
        audible = features_end if final else features_end - self.context
        if audible <= self.audio_done:
            return mx.zeros((self.embeddings.shape[0], 1, 0))
        audio = self.run_upsample(audible, features_end)
        mx.eval(audio)
        return audio

    def run_lstm(self, ready: int) -> None:
        """First conv for frames [conv_done, ready), then the LSTM from its carried state."""
        lo = max(0, self.conv_done - self.reach)
        x = self.embeddings[:, lo - self.embeddings_start :]
        y = self.decoder.conv_in(x)[:, self.conv_done - lo : ready - lo]
        y, self.lstm_state = self.decoder.lstm(y, self.lstm_state)
        self.features = y if self.features is None else mx.concatenate([self.features, y], axis=1)
        self.conv_done = ready
        # keep only what the first conv still needs behind the next frames
        keep_from = max(0, ready - self.reach)
        self.embeddings = self.embeddings[:, keep_from - self.embeddings_start :]
        self.embeddings_start = keep_from

    def run_upsample(self, audible: int, features_end: int) -> mx.array:
        """Audio for frames [audio_done, audible), computed with up to `context` frames either side."""
        lo = max(self.features_start, self.audio_done - self.context)
        hi = min(features_end, audible + self.context)
        x = self.decoder.upsample(self.features[:, lo - self.features_start : hi - self.features_start])
        audio = x[:, (self.audio_done - lo) * self.hop : (audible - lo) * self.hop]
        self.audio_done = audible
        keep_from = max(self.features_start, audible - self.context)
        self.features = self.features[:, keep_from - self.features_start :]
        self.features_start = keep_from
        return audio.transpose(0, 2, 1)


def regroup(frames: Iterable[mx.array], size: int) -> Iterator[mx.array]:
    """Code stretches (B, K, n) of any lengths -> stretches of `size` frames (the last may be shorter)."""
    pending: list[mx.array] = []
    held = 0
    for stretch in frames:
        pending.append(stretch)
        held += stretch.shape[-1]
        while held >= size:
            joined = mx.concatenate(pending, axis=-1)
            yield joined[..., :size]
            pending, held = [joined[..., size:]], held - size
    if held:
        yield mx.concatenate(pending, axis=-1)


def decode_stream(model: EncodecModel, channels: int, codes: Iterable[mx.array | np.ndarray]) -> Iterator[np.ndarray]:
    """Codes arriving a stretch (batch, codebooks, n) at a time -> the audio (batch, channels, samples) that each
    makes final; the audio joined is the whole decode, sample-exact at the seams. Stereo codebooks are
    interleaved L0, R0, L1, ... and each channel decoded apart. When `codes` is a sequence (a list: all of them
    known), its last stretch is decoded to the end at once."""
    decoders = [StreamingDecoder(model) for _ in range(channels)]

    def joined(pieces: list[mx.array]) -> np.ndarray:
        return np.array(mx.concatenate(pieces, axis=1).astype(mx.float32))

    last = len(codes) - 1 if isinstance(codes, Sequence) else None
    for i, stretch in enumerate(codes):
        check_tokens(stretch)  # NaN/inf logits are reported, not decoded into noise
        stretch = mx.array(stretch)
        audio = joined([d.push(stretch[:, c::channels], i == last) for c, d in enumerate(decoders)])
        if audio.shape[-1]:
            yield audio
    audio = joined([d.flush() for d in decoders])
    if audio.shape[-1]:
        yield audio
