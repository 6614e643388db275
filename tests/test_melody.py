"""MusicGen-Melody against transformers' MusicgenMelodyForConditionalGeneration: the decoder's logits with the
chroma + text prefix (1e-4), greedy generation with guidance (codes identical, audio within 1e-4 relative),
long form with a melody against the reference window by window, loading and conversion."""

import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import reference
from mlx_musicgen import MusicGen
from mlx_musicgen.chroma import melody_at
from mlx_musicgen.convert import convert
from mlx_musicgen.cpu.numpy_decoder import NumpyDecoder, numba_kernels
from mlx_musicgen.loading import CheckpointError
from test_chroma import chord_progression, tune_over_noise
from test_prompt import music

AUDIO_RTOL = 1e-4
LOGITS_RTOL = 1e-4


@pytest.fixture(scope="module", params=["device", "numpy", "portable"])
def model(tiny_melody, request):
    """As from_pretrained makes it for this device (on a CPU: compiled layers, decoding with the compiled decoder
    here), the same decoding with the CPU's numpy step (cpu.numpy_decoder, which from_pretrained takes where it is
    faster), and the portable model."""
    with pytest.MonkeyPatch.context() as patch:
        if request.param == "portable":
            patch.setenv("MLX_MUSICGEN_PORTABLE", "1")
        loaded = MusicGen.from_pretrained(tiny_melody.folder)
    if request.param == "numpy":
        if not NumpyDecoder.supports(loaded.decoder):
            pytest.skip("the numpy step is the CPU's: compiled float32 layers")
        loaded.lm = NumpyDecoder(loaded.decoder)
        if numba_kernels() is not None:  # Melody's layers (no cross-attention) in numba's decoder layer too
            assert all(layer.kernel_weights is not None for layer in loaded.lm.layers)
    return loaded


def melodies():
    return [chord_progression()[: 3 * 32000], tune_over_noise()[:50000]]


def assert_same_generation(ours, theirs):
    (audio, codes), (ref_audio, ref_codes) = ours, theirs
    assert codes.shape == ref_codes.shape
    np.testing.assert_array_equal(codes, ref_codes)
    assert audio.shape == ref_audio.shape
    assert reference.relative_error(audio, ref_audio) < AUDIO_RTOL


def test_logits_with_the_prefix_match_the_reference(model, tiny_melody):
    """A padded batch of two texts with a melody each, teacher-forced; the prefix is 7 chroma frames + text."""
    import mlx.core as mx

    texts = ["80s pop track with bassy drums and synth", "jazz"]
    inputs = tiny_melody.inputs(texts, melodies())
    codes = torch.randint(0, 2048, (2 * 4, 9), generator=torch.Generator().manual_seed(0))
    expected = tiny_melody.reference(**inputs, decoder_input_ids=codes).logits.reshape(2, 4, -1, 2048)[:, :, -9:]
    states, mask = model.conditioning(texts, 2, guided=False)
    context = model.model.decoder_context(states, mask, inputs["input_features"].numpy())
    assert context.prefix.shape[1] == 7 + inputs["input_ids"].shape[1]
    codes = mx.array(codes.numpy().reshape(2, 4, 9))
    logits = np.array(model.decoder(codes, context))
    assert reference.relative_error(logits, expected.numpy()) < LOGITS_RTOL

    cache = model.lm.make_cache(2, 9 + context.length)  # the decoding steps' form (the numpy step's included)
    steps = [model.lm(codes[:, :, :4], context, cache)] + [model.lm(codes[:, :, i : i + 1], context, cache)
                                                           for i in range(4, 9)]
    cached = np.array(mx.concatenate(steps, axis=2))
    assert reference.relative_error(cached, expected.numpy()) < LOGITS_RTOL


def test_text_and_a_melody_each_padded_batch(model, tiny_melody):
    texts = ["80s pop track with bassy drums and synth", "jazz"]
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(texts, melodies()),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=20)
    assert_same_generation(model.generate(texts, melody=melodies(), max_new_tokens=20, do_sample=False,
                                          return_tokens=True), expected)


def test_one_melody_for_every_text(model, tiny_melody):
    texts = ["lofi slow bpm", "epic orchestral strings cinematic"]
    melody = tune_over_noise()
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(texts, [melody, melody]),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=16)
    assert_same_generation(model.generate(texts, melody=melody, max_new_tokens=16, do_sample=False,
                                          return_tokens=True), expected)


def test_a_melody_alone_is_guided_against_the_null_text(model, tiny_melody):
    """No text: the null text condition (one masked-out token, zero states), as audiocraft gives a melody alone,
    still guided against the null melody. transformers' generate without input_ids feeds T5 the codebooks' BOS
    id instead (for the Hub's T5, a token whose states are masked to zero all the same): the reference gets the
    equivalent input."""
    melody = chord_progression()[:40000]
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(None, [melody]),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=18)
    assert_same_generation(model.generate(None, melody=melody, max_new_tokens=18, do_sample=False,
                                          return_tokens=True), expected)


def test_text_alone_gets_the_null_melody(model, tiny_melody):
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(["90s rock song"]),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=15)
    assert_same_generation(model.generate(["90s rock song"], max_new_tokens=15, do_sample=False,
                                          return_tokens=True), expected)


def test_unconditional(model, tiny_melody):
    """Neither text nor melody: the null text and the null melody, unguided (both halves would be the same)."""
    inputs = {"input_ids": torch.zeros((2, 1), dtype=torch.long), "attention_mask": torch.zeros((2, 1),
                                                                                                dtype=torch.long)}
    expected = reference.generate(tiny_melody.reference, inputs=inputs, do_sample=False, guidance_scale=1.0,
                                  max_new_tokens=11)
    assert_same_generation(model.generate(None, num_samples=2, max_new_tokens=11, do_sample=False,
                                          return_tokens=True), expected)


def test_without_guidance(model, tiny_melody):
    texts = ["ambient pads warm bass"]
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(texts, melodies()[:1]),
                                  do_sample=False, guidance_scale=1.0, max_new_tokens=12)
    assert_same_generation(model.generate(texts, melody=melodies()[0], guidance_scale=1.0, max_new_tokens=12,
                                          do_sample=False, return_tokens=True), expected)


def test_an_audio_prompt_continued_with_a_melody(model, tiny_melody):
    prompt = music(0.04, seed=7)  # 40 frames of the tiny codec
    codes = model.encode_audio(prompt[None, None])[0]
    inputs = tiny_melody.inputs(["jazz trumpet solo"], [tune_over_noise()])
    inputs["decoder_input_ids"] = torch.from_numpy(np.concatenate([np.full((4, 1), 2048), codes], axis=1))
    expected = reference.generate(tiny_melody.reference, inputs=inputs, do_sample=False, guidance_scale=3.0,
                                  max_new_tokens=14)
    ours = model.generate(["jazz trumpet solo"], audio_prompt=prompt, melody=tune_over_noise(), max_new_tokens=14,
                          do_sample=False, return_tokens=True)
    assert ours[1].shape[-1] == 40 + 14 + 1 - 4
    assert_same_generation(ours, expected)


def test_stereo_melody_model(tiny_melody_stereo):
    model = MusicGen.from_pretrained(tiny_melody_stereo.folder)
    texts = ["80s pop track", "folk acoustic happy"]
    stereo = np.stack([chord_progression()[:60000], tune_over_noise()[:60000]])  # a stereo melody: mixed to mono
    expected = reference.generate(tiny_melody_stereo.reference,
                                  inputs=tiny_melody_stereo.inputs(texts, [stereo, np.stack([melodies()[1]] * 2)]),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=13)
    ours = model.generate(texts, melody=[stereo, melodies()[1]], max_new_tokens=13, do_sample=False,
                          return_tokens=True)
    assert ours[0].shape[1] == 2 and ours[1].shape[1] == 8
    assert_same_generation(ours, expected)


def test_other_rates_and_files(model, tiny_melody, tmp_path):
    """A melody file at 44.1 kHz is read and resampled to the chroma's rate; an array says its rate."""
    import soundfile as sf

    path = tmp_path / "tune.flac"
    sf.write(path, np.stack([chord_progression(44100)] * 2, axis=1), 44100)
    from_file = model.generate(["rock"], melody=str(path), max_new_tokens=10, do_sample=False, return_tokens=True)
    from_array = model.generate(["rock"], melody=chord_progression(44100), melody_sr=44100, max_new_tokens=10,
                                do_sample=False, return_tokens=True)
    np.testing.assert_array_equal(from_file[1], from_array[1])


def test_sampling_and_streaming_with_a_melody(model):
    settings = dict(melody=melodies(), duration=0.03, top_k=50, top_p=0.9, temperature=0.8, seed=3)
    audio = model.generate(["lofi", "techno kick"], **settings)
    again = model.generate(["lofi", "techno kick"], **settings)
    np.testing.assert_array_equal(audio, again)
    streamed = np.concatenate(list(model.generate_stream(["lofi", "techno kick"], chunk_duration=0.01, **settings)),
                              axis=-1)
    # The same codes; a whole decode takes its last stretch to the end in one pass: float32 reordering only.
    np.testing.assert_allclose(streamed, audio, atol=1e-6, rtol=0)
    other = model.generate(["lofi", "techno kick"], **{**settings, "melody": melodies()[::-1]})
    assert not np.array_equal(other, audio)


def test_bad_melodies_are_refused_in_one_line(model, tiny, tmp_path):
    with pytest.raises(ValueError, match="3 melodies for 2 items"):
        model.generate(["a", "b"], melody=[tune_over_noise()] * 3, max_new_tokens=4)
    with pytest.raises(ValueError, match="silent"):
        model.generate(["a"], melody=np.zeros(32000, dtype=np.float32), max_new_tokens=4)
    with pytest.raises(FileNotFoundError, match="melody .*missing.wav does not exist"):
        model.generate(["a"], melody=str(tmp_path / "missing.wav"), max_new_tokens=4)
    with pytest.raises(ValueError, match="NaN"):
        model.generate(["a"], melody=np.full(1000, np.nan, dtype=np.float32), max_new_tokens=4)
    with pytest.raises(ValueError, match="empty"):
        model.generate(["a"], melody=[], max_new_tokens=4)
    plain = MusicGen.from_pretrained(tiny.folder)
    with pytest.raises(ValueError, match="no melody conditioning.*facebook/musicgen-melody"):
        plain.generate(["a"], melody=tune_over_noise(), max_new_tokens=4)


def test_melodies_without_texts_make_one_item_each(model):
    audio = model.generate(None, melody=melodies(), max_new_tokens=6, do_sample=False)
    assert audio.shape[0] == 2


# ---- long form


@pytest.fixture(scope="module")
def short_window(tiny_melody, tmp_path_factory):
    """The tiny melody model with a window of 60 frames (0.06 s at its 1000 frames/s)."""
    folder = tmp_path_factory.mktemp("melody-window") / "m"
    shutil.copytree(tiny_melody.folder, folder)
    config = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**config, "max_length": 60}))
    return MusicGen.from_pretrained(folder)


def test_long_form_follows_the_melody_window_by_window(short_window, tiny_melody):
    """0.1 s with a stride of 0.036 s: windows at frames 0, 36 and 72, of 60, 60 and 28 frames. Each is the
    reference continuing the last 24 frames so far, conditioned on the melody's 0.06 s from the window's time
    on, wrapped round (the melody is 0.07 s long), as audiocraft extends a melody-conditioned generation."""
    melody = tune_over_noise()[: int(0.07 * 32000)]
    texts = ["80s pop track"]
    codes = short_window.generate_tokens(texts, melody=melody, duration=0.1, extend_stride=0.036,
                                         do_sample=False)
    assert codes.shape == (1, 4, 100)
    made = np.zeros((1, 4, 0), dtype=codes.dtype)
    for offset, span in ((0, 60), (36, 60), (72, 28)):
        known = made[:, :, offset:]
        inputs = tiny_melody.inputs(texts, [melody_at(melody, offset / 1000, 0.06, 32000)])
        inputs["decoder_input_ids"] = torch.from_numpy(np.concatenate([np.full((4, 1), 2048), known[0]], axis=1))
        new = span - known.shape[-1]
        out = reference.generate(tiny_melody.reference, inputs=inputs, do_sample=False, guidance_scale=3.0,
                                 max_new_tokens=new + 3)[1]
        made = np.concatenate([made, out[:, :, known.shape[-1] : known.shape[-1] + new]], axis=2)
    np.testing.assert_array_equal(codes, made)


def test_one_window_uses_the_melody_from_its_start(short_window, tiny_melody):
    """Up to one window, the melody's chroma is the reference's: from its start (at most 30 s), its frames tiled
    or cut to the prefix, not a wrapped slice of the window's length."""
    melody = tune_over_noise()
    within = short_window.generate_tokens(["rock"], melody=melody, duration=0.06, do_sample=False)
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(["rock"], [melody]),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=63)[1]
    np.testing.assert_array_equal(within, expected)


# ---- loading


def test_conversion_round_trip_and_strict_loading(model, tiny_melody, tmp_path):
    out = convert(tiny_melody.folder, tmp_path / "converted")
    assert (out / "preprocessor_config.json").is_file()
    converted = MusicGen.from_pretrained(out)
    settings = dict(melody=melodies(), max_new_tokens=10, do_sample=False, return_tokens=True)
    np.testing.assert_array_equal(converted.generate(["rock", "jazz"], **settings)[1],
                                  model.generate(["rock", "jazz"], **settings)[1])

    with warnings.catch_warnings():  # on a CPU: "8-bit quantized ... runs ~10x slower", as it should say
        warnings.simplefilter("ignore")
        quantized = MusicGen.from_pretrained(convert(tiny_melody.folder, tmp_path / "q8", q_bits=8))
    assert quantized.config.quantization == {"group_size": 64, "bits": 8}
    import mlx.core as mx

    states, mask = model.conditioning(["rock"], 1, guided=False)
    chroma = np.eye(12, dtype=np.float32)[None, [0, 4, 7, 9, 2]]
    codes = mx.array(np.arange(4 * 6).reshape(1, 4, 6))
    logits = [np.array(m.decoder(codes, m.model.decoder_context(states, mask, chroma))) for m in (model, quantized)]
    assert reference.relative_error(logits[1], logits[0]) < 0.05  # 8-bit weights: a small, bounded drift

    broken = tmp_path / "no-preprocessor"
    shutil.copytree(tiny_melody.folder, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(CheckpointError, match="no preprocessor_config.json"):
        MusicGen.from_pretrained(broken)

    mismatch = tmp_path / "mismatch"
    shutil.copytree(tiny_melody.folder, mismatch)
    pre = json.loads((mismatch / "preprocessor_config.json").read_text())
    (mismatch / "preprocessor_config.json").write_text(json.dumps({**pre, "feature_size": 24}))
    with pytest.raises(CheckpointError, match="feature_size 24 is not the model's num_chroma 12"):
        MusicGen.from_pretrained(mismatch)

    for i, (name, edit, message) in enumerate((
        ("config.json", {"chroma_length": 10**9}, "chroma_length 1000000000 is longer than the generation window"),
        ("config.json", {"num_chroma": 0}, "melody.num_chroma must be a whole number from 1"),
        ("preprocessor_config.json", {"n_fft": 2**40}, "preprocessor.n_fft must be a whole number from 1"),
        ("preprocessor_config.json", {"n_fft": 2**22}, "n_fft must be even and at most 2\\*\\*20"),
        ("preprocessor_config.json", {"hop_length": 32768}, "hop_length 32768 is longer than n_fft 16384"),
        ("preprocessor_config.json", {"sampling_rate": "fast"}, "preprocessor.sampling_rate must be a whole number"),
    )):
        hostile = tmp_path / f"hostile-{i}"
        shutil.copytree(tiny_melody.folder, hostile)
        settings = json.loads((hostile / name).read_text())
        (hostile / name).write_text(json.dumps({**settings, **edit}))
        with pytest.raises(CheckpointError, match=message):
            MusicGen.from_pretrained(hostile)

    from safetensors.numpy import load_file, save_file

    missing = tmp_path / "missing-projection"
    shutil.copytree(tiny_melody.folder, missing)
    weights = load_file(missing / "model.safetensors")
    del weights["audio_enc_to_dec_proj.weight"]
    save_file(weights, missing / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 missing tensors \\(audio_enc_to_dec_proj.weight\\)"):
        MusicGen.from_pretrained(missing)


def test_the_cli_follows_a_melody_file_and_records_it(tiny_melody, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import soundfile as sf

    tune = tmp_path / "tune.wav"
    sf.write(tune, tune_over_noise(), 32000)
    out = tmp_path / "take.wav"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "generate.py"), "--model", str(tiny_melody.folder),
                             "--text", "lofi", "--melody", str(tune), "--duration", "0.05", "--greedy", "--quiet",
                             "--output", str(out)], capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert audio.shape[0] == 50 * 32 and rate == 32000
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["melody"] == str(tune) and record["text"] == "lofi"


def test_the_numpy_step_is_timed_for_a_melody_decoder_on_its_own(model, monkeypatch):
    """fastest_lm times a melody decoder's steps (over a placeholder prefix), apart from a MusicGen decoder's of the
    same shape, and returns one of the two forms."""
    from mlx_musicgen.cpu import numpy_decoder

    if not NumpyDecoder.supports(model.decoder):
        pytest.skip("the numpy step is the CPU's: compiled float32 layers")
    monkeypatch.setattr(numpy_decoder, "_chosen", {})
    monkeypatch.delenv("MLX_MUSICGEN_STEP", raising=False)
    lm = numpy_decoder.fastest_lm(model.decoder)
    assert lm is model.decoder or isinstance(lm, NumpyDecoder)
    assert [key[0] for key in numpy_decoder._chosen] == ["MelodyDecoder"]
