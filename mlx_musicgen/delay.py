"""The delay ("interleaving") pattern: codebook k runs k frames behind codebook 0.

Delaying lets one decoder step predict all K codebooks of a column while each finer codebook already sees the
coarser codes of its own frame. Stereo models interleave left/right codebooks (L0, R0, L1, R1, ...), and both
codebooks of a pair share one delay.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

UNSET = -1  # a position the decoder must predict


def codebook_delays(num_codebooks: int, audio_channels: int) -> np.ndarray:
    """Delay in frames of each codebook: 0, 1, 2, ... (mono) or 0, 0, 1, 1, ... (stereo)."""
    return np.arange(num_codebooks) // audio_channels


def applies(length: int, num_codebooks: int, audio_channels: int) -> bool:
    """The reference leaves sequences shorter than 2 * (codebooks per channel) - 1 undelayed."""
    return length >= 2 * (num_codebooks // audio_channels) - 1


def delay_pattern(prompt: np.ndarray, length: int, pad_id: int, audio_channels: int) -> np.ndarray:
    """The (B, K, length) pattern of a generation: a fixed code where one is known, UNSET where to predict.

    `prompt` (B, K, P) holds the start column (pad_id) followed by any prompt codes, undelayed. Known are: the
    pads before each codebook's start and after its end, and the prompt codes shifted by their delay.
    """
    B, K, P = prompt.shape
    pattern = np.full((B, K, length), UNSET, dtype=np.int32)
    if not applies(length, K, audio_channels):
        pattern[:, :, :P] = prompt  # too short to delay: the reference keeps the prompt as it is
        return pattern
    delays = codebook_delays(K, audio_channels)
    last = length - K // audio_channels  # the last position a codebook without delay may take
    for k, d in enumerate(delays):
        n = min(P, length - d)
        pattern[:, k, d : d + n] = prompt[:, k, :n]
        pattern[:, k, : d + 1] = pad_id
        pattern[:, k, last + d + 1 :] = pad_id
    return pattern


def first_free_position(pattern: np.ndarray, prompt_length: int) -> int:
    """Where decoding starts: the first position codebook 0 must predict (everything before it is known), or,
    as in the reference, the end of the prompt when nothing is left to predict."""
    free = np.nonzero((pattern[:, 0] == UNSET).any(axis=0))[0]
    return int(free[0]) if free.size else prompt_length


def frames_out(length: int, num_codebooks: int, audio_channels: int) -> int:
    """Frames a delayed sequence of `length` columns (start column included) holds once undelayed."""
    if not applies(length, num_codebooks, audio_channels):
        return length - 1
    return length - num_codebooks // audio_channels


def undelay(sequence: np.ndarray | mx.array, audio_channels: int, length: int | None = None) -> np.ndarray | mx.array:
    """(B, K, n) delayed sequence with its start column -> (B, K, frames) aligned codes (numpy or MLX, as given).

    `length` is the full length of the generation when `sequence` is only its first n columns (streaming):
    then only the frames whose every codebook is known are returned.
    """
    B, K, n = sequence.shape
    length = n if length is None else length
    if not applies(length, K, audio_channels):
        return sequence[:, :, 1:]
    frames = n - K // audio_channels
    delays = codebook_delays(K, audio_channels)
    stack = mx.stack if isinstance(sequence, mx.array) else np.stack
    return stack([sequence[:, k, d + 1 : d + 1 + frames] for k, d in enumerate(delays.tolist())], axis=1)
