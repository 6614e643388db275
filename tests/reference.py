"""Running the transformers reference the way the tests compare against it."""

from __future__ import annotations

import numpy as np
import torch


def generate(reference, processor=None, texts=None, num_samples=1, inputs=None, **kwargs):
    """Reference generation -> (audio (B, C, samples), codes (B, K, frames)) as numpy.

    The codes are caught on their way into the EnCodec decoder, since generate returns only audio.
    """
    caught = []
    decode = reference.audio_encoder.decode

    def catching_decode(audio_codes, *args, **kw):
        caught.append(audio_codes)
        return decode(audio_codes, *args, **kw)

    reference.audio_encoder.decode = catching_decode
    try:
        if inputs is not None:
            pass
        elif texts is None:
            inputs = reference.get_unconditional_inputs(num_samples)
        else:
            inputs = processor(text=texts, padding=True, return_tensors="pt")
        audio = reference.generate(**inputs, **kwargs)
    finally:
        del reference.audio_encoder.decode
    codes = torch.cat([c[0] for c in caught], dim=1) if len(caught) > 1 else caught[0][0]
    if len(caught) > 1:  # stereo: the left and right halves were decoded apart; re-interleave L0, R0, L1, ...
        left, right = caught[0][0], caught[1][0]
        codes = torch.stack([left, right], dim=2).reshape(left.shape[0], -1, left.shape[-1])
    return audio.float().numpy(), codes.numpy()


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|"""
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))
