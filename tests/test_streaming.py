"""Streaming: chunks joined equal generate's output, and chunked EnCodec decoding equals the one-shot decode
at every seam (left context, carried LSTM state, overlap)."""

import mlx.core as mx
import numpy as np
import pytest

import reference
from mlx_musicgen import MusicGen, musicgen as musicgen_module
from mlx_musicgen.cpu.encodec import optimize_encodec
from mlx_musicgen.encodec import EncodecConfig, EncodecModel
from mlx_musicgen.streaming import StreamingDecoder
from test_prompt import music

TOLERANCE = 1e-4  # relative; float32 reordering only


@pytest.fixture(scope="module")
def model(tiny):
    return MusicGen.from_pretrained(tiny.folder)


@pytest.fixture(scope="module", params=["portable", "cpu"])
def codec(tiny, request):
    """The tiny checkpoint's EnCodec: the portable model, or its CPU form (chunks of 50 frames, so [60] has a seam)."""
    reference_codec = tiny.reference.audio_encoder
    codec = EncodecModel(EncodecConfig.from_dict(reference_codec.config.to_dict()))
    weights = {k: mx.array(v.numpy()) for k, v in reference_codec.state_dict().items()}
    codec.load_weights(list(EncodecModel.sanitize(weights).items()), strict=True)
    if request.param == "cpu":
        optimize_encodec(codec)
    return codec


@pytest.mark.parametrize("sizes", [[1] * 60, [3, 7, 1, 20, 2, 27], [60], [13] * 5])
def test_streaming_decoder_matches_one_shot_decode_at_every_seam(codec, sizes):
    codes = mx.array(np.random.default_rng(len(sizes)).integers(0, 2048, size=(2, 4, sum(sizes))))
    full = np.array(codec.decode(codes))
    decoder = StreamingDecoder(codec)
    pieces, start = [], 0
    for n in sizes:
        pieces.append(np.array(decoder.push(codes[:, :, start : start + n])))
        start += n
    pieces.append(np.array(decoder.flush()))
    streamed = np.concatenate(pieces, axis=-1)
    assert streamed.shape == full.shape
    assert reference.relative_error(streamed, full) < TOLERANCE
    seams = np.cumsum([p.shape[-1] for p in pieces])[:-1]
    for seam in seams[(seams > 0) & (seams < full.shape[-1])]:  # the samples either side of every seam
        window = slice(max(0, seam - 64), seam + 64)
        np.testing.assert_allclose(streamed[..., window], full[..., window], atol=TOLERANCE * np.abs(full).max())


@pytest.mark.parametrize("sizes", [[60], [13, 47]])
def test_last_push_decodes_to_the_end(codec, sizes):
    """push(codes, last=True) gives at once what push then flush give: all the rest, with nothing left to flush."""
    codes = mx.array(np.random.default_rng(3).integers(0, 2048, size=(2, 4, sum(sizes))))
    full = np.array(codec.decode(codes))
    decoder = StreamingDecoder(codec)
    pieces = [np.array(decoder.push(codes[:, :, : sizes[0]], last=len(sizes) == 1))]
    if len(sizes) > 1:
        pieces.append(np.array(decoder.push(codes[:, :, sizes[0] :], last=True)))
    assert decoder.flush().shape[-1] == 0
    streamed = np.concatenate(pieces, axis=-1)
    assert streamed.shape == full.shape
    assert reference.relative_error(streamed, full) < TOLERANCE


def test_stream_joined_equals_generate(model):
    kwargs = dict(max_new_tokens=40, do_sample=False)
    expected = model.generate(["80s pop track"], **kwargs)
    chunks = list(model.generate_stream(["80s pop track"], chunk_duration=0.01, **kwargs))
    assert len(chunks) > 3
    assert reference.relative_error(np.concatenate(chunks, axis=-1), expected) < TOLERANCE


def test_stream_with_sampling_and_seed_equals_generate(model):
    kwargs = dict(duration=0.05, seed=11, top_k=20)
    expected = model.generate(["jazz"], **kwargs)
    joined = np.concatenate(list(model.generate_stream(["jazz"], chunk_duration=0.007, **kwargs)), axis=-1)
    assert reference.relative_error(joined, expected) < TOLERANCE


def test_stream_of_unequal_prompts_trims_each_item(model):
    prompts = [music(0.03, seed=2), music(0.012, seed=3)]
    kwargs = dict(audio_prompt=prompts, max_new_tokens=12, do_sample=False)
    expected = model.generate(["lofi", "rock"], **kwargs)
    chunks = list(model.generate_stream(["lofi", "rock"], chunk_duration=0.005, **kwargs))
    assert all(isinstance(chunk, list) and len(chunk) == 2 for chunk in chunks)  # one type throughout
    for i in range(2):
        joined = np.concatenate([chunk[i] for chunk in chunks], axis=-1)
        assert joined.shape == expected[i].shape
        assert reference.relative_error(joined, expected[i]) < TOLERANCE


def test_stereo_stream_equals_generate(tiny_stereo):
    stereo = MusicGen.from_pretrained(tiny_stereo.folder)
    expected = stereo.generate(["rock"], max_new_tokens=30, do_sample=False)
    joined = np.concatenate(list(stereo.generate_stream(["rock"], chunk_duration=0.01, max_new_tokens=30,
                                                        do_sample=False)), axis=-1)
    assert joined.shape == expected.shape == (1, 2, 27 * 32)
    assert reference.relative_error(joined, expected) < TOLERANCE


def test_long_decode_in_stretches_equals_one_shot(model, monkeypatch):
    codes = np.random.default_rng(5).integers(0, 2048, size=(1, 4, 95))
    one_shot = model.decode(codes)
    monkeypatch.setattr(musicgen_module, "DECODE_FRAMES", 20)  # forces the stretch-by-stretch path
    assert reference.relative_error(model.decode(codes), one_shot) < TOLERANCE
