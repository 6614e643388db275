"""End-to-end parity with transformers' MusicgenForConditionalGeneration.generate: greedy codes token-exact,
audio within 1e-4 relative."""

import numpy as np
import pytest

import reference
from mlx_musicgen import GenerationConfig, MusicGen
from mlx_musicgen.cpu import optimize_for_cpu
from mlx_musicgen.cpu.decoder import optimize_decoder
from mlx_musicgen.cpu.numpy_decoder import NumpyCache, NumpyDecoder

AUDIO_RTOL = 1e-4


@pytest.fixture(scope="module", params=["device", "numpy", "portable"])
def model(tiny, request):
    """The model as from_pretrained makes it for this device (on a CPU: its fast CPU forms, decoding with the
    compiled decoder here), the same decoding with the CPU's numpy step (cpu.numpy_decoder, which from_pretrained
    takes where it is faster), and the portable model that Metal and CUDA run (MLX_MUSICGEN_PORTABLE=1)."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "portable":
            patch.setenv("MLX_MUSICGEN_PORTABLE", "1")
        loaded = MusicGen.from_pretrained(tiny.folder)
    if request.param == "numpy":
        if not NumpyDecoder.supports(loaded.decoder):
            pytest.skip("the numpy step is the CPU's: compiled float32 layers")
        loaded.lm = NumpyDecoder(loaded.decoder)
    else:
        loaded.lm = loaded.decoder  # not whichever form timing chose
    return loaded


def test_greedy_guided_padded_batch_matches_reference(model, tiny):
    texts = ["80s pop track with bassy drums and synth", "90s rock song with loud guitars"]
    ref_audio, ref_codes = reference.generate(
        tiny.reference, tiny.processor, texts, do_sample=False, guidance_scale=3.0, max_new_tokens=24
    )
    audio, codes = model.generate(texts, max_new_tokens=24, do_sample=False, guidance_scale=3.0, return_tokens=True)
    assert codes.shape == ref_codes.shape == (2, 4, 24 + 1 - 4)
    np.testing.assert_array_equal(codes, ref_codes)
    assert audio.shape == ref_audio.shape and audio.dtype == np.float32
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_greedy_unconditional_matches_reference(model, tiny):
    ref_audio, ref_codes = reference.generate(tiny.reference, num_samples=2, do_sample=False, max_new_tokens=16)
    audio, codes = model.generate(None, num_samples=2, max_new_tokens=16, do_sample=False, return_tokens=True)
    np.testing.assert_array_equal(codes, ref_codes)
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_duration_maps_to_frames(model):
    frames = 37
    audio, codes = model.generate(["lofi"], duration=frames / model.frame_rate, do_sample=False, return_tokens=True)
    assert codes.shape[-1] == frames
    assert audio.shape[-1] == frames * model.config.audio_encoder.hop_length


def test_same_seed_same_audio_other_seed_other_audio(model):
    kwargs = dict(max_new_tokens=12, top_k=50, temperature=1.2)
    a = model.generate(["jazz trumpet solo"], seed=7, **kwargs)
    b = model.generate(["jazz trumpet solo"], seed=7, **kwargs)
    c = model.generate(["jazz trumpet solo"], seed=8, **kwargs)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_top_k_one_is_greedy(model):
    greedy = model.generate(["techno kick"], max_new_tokens=10, do_sample=False, return_tokens=True)[1]
    top1 = model.generate(["techno kick"], max_new_tokens=10, top_k=1, seed=3, return_tokens=True)[1]
    np.testing.assert_array_equal(greedy, top1)


def test_a_config_object_and_keywords_mean_the_same(model):
    config = GenerationConfig(max_new_tokens=10, top_k=50, seed=4)
    by_keywords = model.generate(["lofi"], max_new_tokens=10, top_k=50, seed=4, return_tokens=True)[1]
    np.testing.assert_array_equal(model.generate(["lofi"], config=config, return_tokens=True)[1], by_keywords)
    # a keyword wins over the config, a length keyword over the config's length of either kind
    longer = model.generate(["lofi"], config=config, duration=20 / model.frame_rate, return_tokens=True)[1]
    assert longer.shape[-1] == 20
    with pytest.raises(TypeError, match="unknown generation setting"):
        model.generate(["lofi"], config=config, top_q=3)


def test_generate_tokens_takes_a_duration(model):
    codes = model.generate_tokens(["lofi"], duration=12 / model.frame_rate, do_sample=False)
    assert codes.shape == (1, 4, 12)
    with pytest.raises(ValueError, match="Give duration or total_frames, not both"):
        model.generate_tokens(["lofi"], duration=0.01, total_frames=12)


def test_optimizing_twice_changes_nothing(model):
    before = model.generate(["techno"], max_new_tokens=8, do_sample=False, return_tokens=True)
    optimize_for_cpu(model.decoder, model.audio_encoder)
    optimize_for_cpu(model.decoder, model.audio_encoder)
    after = model.generate(["techno"], max_new_tokens=8, do_sample=False, return_tokens=True)
    np.testing.assert_array_equal(after[1], before[1])
    assert reference.relative_error(after[0], before[0]) < AUDIO_RTOL


def test_max_new_tokens_is_a_whole_number(model):
    for steps in (2.5, "8", True):
        with pytest.raises(ValueError, match="max_new_tokens must be a whole number of decoder steps"):
            model.generate(["rock"], max_new_tokens=steps)


@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo", "tiny_melody"])
@pytest.mark.parametrize("portable", [False, True])
def test_the_compiled_step_is_the_step_op_by_op(checkpoint, portable, request, monkeypatch):
    """Sampled codes (top-k and top-p, seeded, guided), a prompt's first step of many positions, and steps across
    two spans of the compiled step's cache (decoder.SPAN): the same codes, every one, as every step run op by op
    (MLX_MUSICGEN_STEP=op-by-op)."""
    from mlx_musicgen import decoder, generation

    ckpt = request.getfixturevalue(checkpoint)
    musicgen = MusicGen.from_pretrained(ckpt.folder, portable=portable)
    musicgen.lm = musicgen.decoder  # the compiled step (not the numpy step timing may choose)
    K = musicgen.num_codebooks
    prompt = np.random.default_rng(0).integers(0, 2048, (1, K, 5))
    extra = {"melody": np.sin(np.arange(32000) / 9).astype(np.float32)} if checkpoint == "tiny_melody" else {}
    settings = dict(max_new_tokens=decoder.SPAN + 40, seed=3, top_k=50, top_p=0.9, guidance_scale=3.0, **extra)
    compiled = musicgen.generate_tokens(["calm piano"], **settings)
    prompted = musicgen.generate_tokens(["calm piano"], prompt_codes=prompt, **settings)
    monkeypatch.setenv("MLX_MUSICGEN_STEP", "op-by-op")  # every step as it is
    made, flags = generation.decoding_step, []
    monkeypatch.setattr(generation, "decoding_step",
                        lambda *args, compiled: flags.append(compiled) or made(*args, compiled=compiled))
    np.testing.assert_array_equal(compiled, musicgen.generate_tokens(["calm piano"], **settings))
    np.testing.assert_array_equal(prompted, musicgen.generate_tokens(["calm piano"], prompt_codes=prompt, **settings))
    assert flags == [False, False]


def numpy_form(checkpoint) -> MusicGen:
    """A checkpoint with the CPU's compiled layers, decoding with the numpy step (whatever this machine's BLAS)."""
    musicgen = MusicGen.from_pretrained(checkpoint.folder, portable=True)
    optimize_decoder(musicgen.decoder, split=False)
    musicgen.lm = NumpyDecoder(musicgen.decoder)
    assert isinstance(musicgen.lm.make_cache(2, 4)[0], NumpyCache)  # guidance's 2 rows: numpy steps
    return musicgen


@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo"])
def test_the_numpy_step_matches_reference_with_text(checkpoint, request):
    """One text with guidance (2 rows: every step after the first in numpy), mono and stereo: greedy codes
    token-exact, audio within 1e-4 relative."""
    ckpt = request.getfixturevalue(checkpoint)
    texts = ["80s pop track with bassy drums and synth"]
    ref_audio, ref_codes = reference.generate(ckpt.reference, ckpt.processor, texts, do_sample=False,
                                              guidance_scale=3.0, max_new_tokens=24)
    audio, codes = numpy_form(ckpt).generate(texts, max_new_tokens=24, do_sample=False, guidance_scale=3.0,
                                             return_tokens=True)
    np.testing.assert_array_equal(codes, ref_codes)
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_the_numpy_step_continues_a_prompt_as_the_compiled_step(tiny):
    """A prompt's first step of many positions runs the compiled decoder, whose keys and values the numpy steps
    go on from: greedy codes, every one, as the compiled step's, across two spans of its cache."""
    from mlx_musicgen import decoder

    musicgen = numpy_form(tiny)
    prompt = np.random.default_rng(1).integers(0, 2048, (1, 4, 7))
    settings = dict(max_new_tokens=decoder.SPAN + 20, do_sample=False, guidance_scale=3.0, prompt_codes=prompt)
    by_numpy = musicgen.generate_tokens(["calm piano"], **settings)
    musicgen.lm = musicgen.decoder
    np.testing.assert_array_equal(by_numpy, musicgen.generate_tokens(["calm piano"], **settings))


def test_the_numpy_step_follows_new_weights(tiny):
    """Weights replaced after load (here: every one scaled) are the numpy step's too, as the compiled step's."""
    from mlx.utils import tree_map

    musicgen = numpy_form(tiny)
    decoder = musicgen.decoder
    decoder.update(tree_map(lambda w: w * 1.5, decoder.parameters()))
    by_numpy = musicgen.generate_tokens(["calm piano"], max_new_tokens=12, do_sample=False)
    musicgen.lm = decoder
    np.testing.assert_array_equal(by_numpy, musicgen.generate_tokens(["calm piano"], max_new_tokens=12,
                                                                     do_sample=False))


def test_the_decoding_step_is_timed_once_or_chosen(tiny, monkeypatch):
    """From timing (once per process and decoder shape) the numpy step where it is faster by more than 5%, or as
    MLX_MUSICGEN_STEP says; another value is refused in one line."""
    from mlx_musicgen.cpu import numpy_decoder

    decoder = numpy_form(tiny).decoder
    seconds = {"NumpyDecoder": 0.090, "MusicgenDecoder": 0.100}
    timed = []
    monkeypatch.setattr(numpy_decoder, "step_seconds",
                        lambda lm, *args, **kwargs: timed.append(type(lm).__name__) or seconds[type(lm).__name__])
    monkeypatch.setattr(numpy_decoder, "_chosen", {})
    monkeypatch.delenv("MLX_MUSICGEN_STEP", raising=False)
    assert isinstance(numpy_decoder.fastest_lm(decoder), NumpyDecoder) and len(timed) == 2
    seconds["NumpyDecoder"] = 0.097  # 3%: noise; but the shape was timed already
    assert isinstance(numpy_decoder.fastest_lm(decoder), NumpyDecoder) and len(timed) == 2
    monkeypatch.setattr(numpy_decoder, "_chosen", {})
    assert numpy_decoder.fastest_lm(decoder) is decoder and len(timed) == 4
    monkeypatch.setenv("MLX_MUSICGEN_STEP", "numpy")
    assert isinstance(numpy_decoder.fastest_lm(decoder), NumpyDecoder)
    for choice in ("compiled", "op-by-op"):
        monkeypatch.setenv("MLX_MUSICGEN_STEP", choice)
        assert numpy_decoder.fastest_lm(decoder) is decoder and len(timed) == 4
    monkeypatch.setenv("MLX_MUSICGEN_STEP", "fast")
    with pytest.raises(ValueError, match="MLX_MUSICGEN_STEP='fast' is not one of numpy, compiled, op-by-op"):
        numpy_decoder.fastest_lm(decoder)
