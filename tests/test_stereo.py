"""Stereo checkpoints: 8 interleaved codebooks, each channel decoded by the mono EnCodec, against the reference."""

import numpy as np
import pytest
import torch

import reference
from mlx_musicgen import MusicGen
from test_prompt import music

AUDIO_RTOL = 1e-4


@pytest.fixture(scope="module")
def model(tiny_stereo):
    return MusicGen.from_pretrained(tiny_stereo.folder)


def test_stereo_greedy_generation_matches_reference(model, tiny_stereo):
    texts = ["80s pop track with bassy drums and synth", "rock"]
    ref_audio, ref_codes = reference.generate(tiny_stereo.reference, tiny_stereo.processor, texts,
                                              do_sample=False, guidance_scale=3.0, max_new_tokens=14)
    audio, codes = model.generate(texts, max_new_tokens=14, do_sample=False, return_tokens=True)
    assert codes.shape == (2, 8, 14 + 1 - 4) and audio.shape[1] == 2
    np.testing.assert_array_equal(codes, ref_codes)
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_stereo_continuation_matches_reference(model, tiny_stereo):
    prompt = np.stack([music(0.03, seed=4), music(0.03, seed=5)])  # (2 channels, samples)
    inputs = tiny_stereo.processor(text=["ambient pads"], padding=True, return_tensors="pt")
    inputs["input_values"] = torch.from_numpy(prompt[None])
    ref_audio, ref_codes = reference.generate(tiny_stereo.reference, inputs=inputs, do_sample=False,
                                              guidance_scale=3.0, max_new_tokens=9)
    audio, codes = model.generate(["ambient pads"], audio_prompt=prompt, max_new_tokens=9, do_sample=False,
                                  return_tokens=True)
    np.testing.assert_array_equal(codes, ref_codes)
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_mono_prompt_for_a_stereo_model_is_duplicated(model):
    mono = music(0.03, seed=6)
    from_mono = model.generate(None, audio_prompt=mono, max_new_tokens=6, do_sample=False, return_tokens=True)[1]
    from_both = model.generate(None, audio_prompt=np.stack([mono, mono]), max_new_tokens=6, do_sample=False,
                               return_tokens=True)[1]
    np.testing.assert_array_equal(from_mono, from_both)
    np.testing.assert_array_equal(from_mono[:, 0::2, :30], from_mono[:, 1::2, :30])  # same prompt codes L and R
