"""MAGNeT against audiocraft 1.3.0's own (models/lm_magnet.py, models/magnet.py): random-weight models built by
audiocraft's builders (music and sound shaped, restricted and unrestricted attention), exported as its
utils/export.py exports them, loaded by its load_lm_model_magnet on one side and MusicGen.from_pretrained on the
other.

Tolerances: teacher-forced logits with a given mask within 1e-4 (float32); codes token-exact with argmax decoding
(use_sampling=False), guidance annealed from 10 to 1, both span arrangements; the schedule exactly."""

import dataclasses
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch

import audiocraft_reference as acref
from mlx_musicgen import MusicGen, magnet, torch_order
from test_audiocraft import TEXTS, t5_folder

ATOL = 1e-4
SECONDS = 2  # the clips: 100 frames at 50 Hz
STEPS = (4, 3, 3, 3)  # passes per codebook (audiocraft's default is 20, 10, 10, 10)


@dataclasses.dataclass
class Built:
    folder: Path
    t5: Path
    reference: object  # audiocraft's MAGNeT, loaded from the folder by its loaders


def build(tiny, folder: Path, *, solver: str = "magnet", subcodes_context: int = 5, seed: int = 0) -> Built:
    ac = acref.import_audiocraft()
    t5 = t5_folder(tiny, folder.parent / f"{folder.name}-t5")
    rate = 16000 if solver == "audio_magnet" else 32000
    codec_cfg = acref.codec_config(sample_rate=rate, ratios=(8, 5, 4, 4) if rate == 32000 else (8, 5, 4, 2), bins=64)
    t5_name = "t5-large" if solver == "audio_magnet" else "t5-base"
    cfg = acref.lm_config(t5_name, solver=solver, sample_rate=rate, duration=SECONDS,
                          subcodes_context=subcodes_context)
    with acref.LocalT5(t5, tiny.reference.text_encoder.config.d_model, t5_name), acref.xformers_backend():
        # heads wide enough that the tokens' probabilities spread: spans that score alike to float32 rounding
        # would be ranked by that rounding
        acref.export(folder / "state_dict.bin", acref.random_lm(cfg, seed=seed, head_scale=1.0).state_dict(), cfg)
        lm = ac.loaders.load_lm_model_magnet(folder, compression_model_frame_rate=50)
    acref.export(folder / "compression_state_dict.bin", acref.random_codec(codec_cfg, seed=seed).state_dict(),
                 codec_cfg)
    codec = ac.loaders.load_compression_model(folder)
    return Built(folder, t5, ac.MAGNeT(name=folder.name, compression_model=codec, lm=lm))


@pytest.fixture(scope="module")
def music(tiny, tmp_path_factory):
    return build(tiny, tmp_path_factory.mktemp("magnet") / "music")


@pytest.fixture(scope="module")
def sound_unrestricted(tiny, tmp_path_factory):
    return build(tiny, tmp_path_factory.mktemp("magnet") / "sound", solver="audio_magnet", subcodes_context=-1,
                 seed=1)


def load(built: Built, portable: bool | None = None) -> MusicGen:
    return MusicGen.from_pretrained(built.folder, text_encoder=built.t5, portable=portable)


def reference_logits(built: Built, texts, codes: np.ndarray, stage: int) -> np.ndarray:
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = built.reference.lm
    attributes = [ConditioningAttributes(text={"description": text}) for text in texts]
    with acref.xformers_backend():
        condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
        return lm(torch.from_numpy(codes), [], condition_tensors, stage=stage).numpy()


@pytest.mark.parametrize("which", ["music", "sound_unrestricted"])
@pytest.mark.parametrize("stage", [0, 2])
@pytest.mark.parametrize("portable", [True, False], ids=["portable", "cpu-forms"])
def test_teacher_forced_logits_with_a_mask_match_audiocraft(which, stage, portable, request):
    built = request.getfixturevalue(which)
    model = load(built, portable)
    assert model.config.magnet.frames == 100
    rng = np.random.default_rng(stage)
    codes = rng.integers(0, 64, size=(2, 4, 99))
    codes[:, stage][rng.random((2, 99)) < 0.5] = 64  # this stage half masked
    codes[:, stage + 1:] = 64  # later stages all masked
    states, mask = model.encode_text(TEXTS)
    ours = np.array(model.decoder(mx.array(codes), model.model.decoder_context(states, mask), stage))
    np.testing.assert_allclose(ours, reference_logits(built, TEXTS, codes, stage), atol=ATOL, rtol=0)


def generate_both(built: Built, span_arrangement: str, texts=TEXTS):
    built.reference.set_generation_params(use_sampling=False, decoding_steps=list(STEPS),
                                          span_arrangement=span_arrangement)
    with acref.xformers_backend():
        audio, tokens = built.reference.generate(texts, progress=False, return_tokens=True)
    passes = []
    ours, codes = load(built).generate(texts, do_sample=False, decoding_steps=STEPS,
                                       span_arrangement=span_arrangement, return_tokens=True,
                                       progress=lambda done, total: passes.append((done, total)))
    assert passes[-1] == (sum(STEPS), sum(STEPS)) and len(passes) == sum(STEPS)
    return (audio.numpy(), tokens.numpy()), (ours, codes)


@pytest.mark.parametrize("which", ["music", "sound_unrestricted"])
@pytest.mark.parametrize("span_arrangement", ["nonoverlap", "stride1"])
def test_argmax_codes_are_audiocraft_s(which, span_arrangement, request):
    """use_sampling=False with guidance annealed from 10 to 1: the same codes, pass by pass; 'nonoverlap' trims
    the clip to whole spans (99 of 100 frames), as audiocraft does."""
    (audio, tokens), (ours, codes) = generate_both(request.getfixturevalue(which), span_arrangement)
    assert codes.shape == tokens.shape == (2, 4, 99 if span_arrangement == "nonoverlap" else 100)
    np.testing.assert_array_equal(codes, tokens)
    np.testing.assert_allclose(ours, audio, atol=ATOL, rtol=0)


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 20, 60])
def test_the_schedule_is_audiocraft_s(steps):
    """The masked counts of every pass, computed as lm_magnet.py's _generate_stage computes them (float32)."""
    np.testing.assert_array_equal(magnet.linspace(steps), torch.linspace(0, 1, steps).numpy())
    ratios = torch.stack([torch.cos(t * math.pi * 0.5) for t in torch.linspace(0, 1, steps)]).numpy()
    np.testing.assert_array_max_ulp(magnet.mask_ratios(steps), ratios, maxulp=1)  # torch's cosine: a step off
    for candidates in list(range(1, 200)) + [333, 498, 500, 1498, 1500]:
        expected = [max(int((torch.cos(t * math.pi * 0.5) * candidates).item()), 1)
                    for t in torch.linspace(0, 1, steps)]
        assert magnet.schedule(steps, candidates) == expected, (steps, candidates)


def test_sampled_codes_differ_by_seed_and_repeat_with_one(music):
    model = load(music)
    settings = dict(decoding_steps=STEPS, duration=1.0)
    first, again, other = (model.generate_tokens(TEXTS[:1], seed=seed, **settings) for seed in (1, 1, 2))
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.3
    assert first.shape == (1, 4, 50)  # cut to the second asked for


def test_lengths_beyond_the_clip_are_refused(music):
    model = load(music)
    with pytest.raises(ValueError, match="makes clips of 2 s, and not longer"):
        model.generate_tokens(TEXTS, duration=3.0)
    with pytest.raises(ValueError, match="not steps: give a duration"):
        model.generate_tokens(TEXTS, max_new_tokens=10)
    with pytest.raises(ValueError, match="passes for each of the model's 4 codebooks"):
        model.generate_tokens(TEXTS, decoding_steps=(3, 3))


def test_equal_span_scores_are_picked_as_torch_picks_them():
    """Spans of highest score are masked; among equal scores (late passes, whose low temperature rounds many
    a top probability to 1), torch's unstable CPU sort ('stride1') and topk ('nonoverlap') decide."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 600))
        keys = rng.choice(np.array([0.0, 0.25, 0.5, -1e4, rng.random()], np.float32), size=n)
        some = rng.random(n) < 0.3
        keys[some] = rng.random(int(some.sum())).astype(np.float32)
        expected = torch.argsort(torch.from_numpy(keys), descending=True).numpy()
        np.testing.assert_array_equal(torch_order.descending_order(keys), expected)
        for k in (1, int(rng.integers(1, n + 1)), max(1, n // 64)):  # topk's two paths: k * 64 <= n, or not
            picked = set(torch.from_numpy(keys).topk(k).indices.tolist())
            assert set(torch_order.torch_topk(keys, k).tolist()) == picked, (n, k)


def test_generate_py_makes_the_clip_with_magnet_s_options(music, tmp_path):
    """No --duration: the model's clip (2 s here); MAGNeT's options and defaults recorded with it."""
    import json
    import subprocess
    import sys

    import soundfile as sf

    out = tmp_path / "clip.wav"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "generate.py"), "--model", str(music.folder),
                             "--text-encoder", str(music.t5), "--text", "jazz", "--decoding-steps", "3,2,2,2",
                             "--span-arrangement", "stride1", "--max-cfg", "5", "--seed", "3", "--output", str(out)],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 32000 and audio.shape == (SECONDS * 32000,)
    recorded = json.loads(out.with_suffix(".json").read_text())
    assert (recorded["duration"], recorded["top_k"], recorded["top_p"], recorded["temperature"]) == (2.0, 0, 0.9, 3.0)
    bad = subprocess.run([sys.executable, str(root / "generate.py"), "--model", str(music.folder), "--text-encoder",
                          str(music.t5), "--duration", "5", "--output", str(tmp_path / "long.wav")],
                         capture_output=True, text=True, cwd=root)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "error: this MAGNeT model makes clips of 2 s, and not longer: ask for at most 2 s.")


def test_the_studio_and_streaming_serve_magnet(music):
    from mlx_musicgen.studio.jobs import describe
    from mlx_musicgen.studio.settings import JobSettings

    model = load(music)
    info = describe(model)
    settings = JobSettings.from_fields({"text": "jazz"}, info)
    assert (settings.config.duration, settings.config.top_p, settings.config.temperature) == (2.0, 0.9, 3.0)
    whole = model.generate(TEXTS, seed=4, decoding_steps=STEPS)
    streamed = np.concatenate(list(model.generate_stream(TEXTS, seed=4, decoding_steps=STEPS, chunk_duration=0.5)),
                              axis=-1)
    np.testing.assert_allclose(streamed, whole, atol=1e-6, rtol=0)


def test_conversion_round_trips(music, tmp_path):
    from mlx_musicgen import convert

    out = convert.convert(music.folder, tmp_path / "converted", text_encoder=music.t5)
    converted, direct = MusicGen.from_pretrained(out), load(music)
    assert converted.config.magnet == direct.config.magnet
    settings = dict(do_sample=False, decoding_steps=STEPS)
    np.testing.assert_array_equal(converted.generate_tokens(TEXTS, **settings), direct.generate_tokens(TEXTS, **settings))


def test_top_p_draws_from_audiocraft_s_nucleus():
    """audiocraft's sample_top_p: the most likely tokens whose probabilities before each sum to at most p, drawn
    in proportion (here tokens 0 and 1 of 0.5, 0.3, 0.15, 0.05 with p 0.7: 5/8 and 3/8)."""
    logits = mx.array(np.log(np.array([[[0.5, 0.3, 0.15, 0.05]]], np.float32)))
    decoding = magnet.Decoding(do_sample=True, temperature=1.0, top_k=0, top_p=0.7, max_cfg=10.0, min_cfg=1.0,
                               decoding_steps=STEPS, span_arrangement="nonoverlap")
    tokens = np.array([magnet.draw(logits, decoding, 1.0, key)[0].item()
                       for key in mx.random.split(mx.random.key(1), 2000)])
    counts = np.bincount(tokens, minlength=4) / len(tokens)
    assert counts[2] == counts[3] == 0 and abs(counts[0] - 0.625) < 0.04
    with pytest.raises(FloatingPointError):
        magnet.draw(mx.full((1, 1, 4), mx.nan), decoding, 1.0, mx.random.key(0))


def test_an_audio_prompt_is_continued_as_audiocraft_continues_it(music):
    """generate_continuation: the prompt's codes kept, the rest of the clip made around them (argmax)."""
    prompt = np.random.default_rng(6).standard_normal((2, 1, 16000)).astype(np.float32) * 0.3  # 0.5 s: 25 frames
    music.reference.set_generation_params(use_sampling=False, decoding_steps=list(STEPS))
    with acref.xformers_backend():
        audio, tokens = music.reference.generate_continuation(torch.from_numpy(prompt), 32000, TEXTS,
                                                              progress=False, return_tokens=True)
    ours, codes = load(music).generate(TEXTS, audio_prompt=prompt, audio_prompt_sr=32000, do_sample=False,
                                       decoding_steps=STEPS, return_tokens=True)
    assert codes.shape == tokens.shape
    np.testing.assert_array_equal(codes, tokens.numpy())
    np.testing.assert_allclose(ours, audio.numpy(), atol=ATOL, rtol=0)


def test_the_studio_serves_a_magnet_model(music, tmp_path):
    """A studio process with a MAGNeT model: its info offers the clip and MAGNeT's sampling, a job with only a
    text makes the whole clip with them, and a longer one is refused at submit."""
    import io

    import soundfile as sf
    from studio import Studio

    studio = Studio(music.folder, tmp_path / "takes", "--text-encoder", str(music.t5))
    try:
        info = studio.client.get("/api/info").json()
        assert info["kind"] == "magnet" and info["defaults"]["duration"] == SECONDS
        assert (info["defaults"]["top_p"], info["defaults"]["temperature"]) == (0.9, 3.0)
        job = studio.wait(studio.client.post("/api/jobs", json={"text": "jazz", "seed": 2}).json()["id"])
        assert job["status"] == "done", job
        settings = studio.client.get(f"/api/takes/{job['take']}").json()
        assert (settings["duration"], settings["top_k"], settings["decoding_steps"]) == (SECONDS, 0, [20, 10, 10, 10])
        audio, rate = sf.read(io.BytesIO(studio.client.get(f"/api/takes/{job['take']}/audio").content))
        assert rate == 32000 and audio.shape[0] == 99 * 640  # the clip, in whole spans
        refused = studio.client.post("/api/jobs", json={"text": "jazz", "duration": 3})
        assert refused.status_code == 422 and "clips of 2 s" in refused.json()["detail"]
    finally:
        studio.stop()


def test_finetune_py_refuses_a_magnet_model(music, tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, str(root / "finetune.py"), "--model", str(music.folder), "--text-encoder",
                             str(music.t5), "--data", str(tmp_path), "--adapter-path", str(tmp_path / "out")],
                            capture_output=True, text=True, cwd=root)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and "is a MAGNeT model" in result.stderr
