"""Parity with audiocraft 1.3.0 itself on its own checkpoint files: random-weight MusicGen (mono, stereo) and
AudioGen models built by audiocraft's builders, saved as its utils/export.py saves them, loaded by audiocraft's
loaders on one side and by MusicGen.from_pretrained (no torch) on the other.

Tolerances: teacher-forced logits and the codec's audio within 1e-4 (float32); codes token-exact with greedy
decoding and guidance 3, over a whole window and over a long form."""

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf
import torch

import audiocraft_reference as acref
from mlx_musicgen import MusicGen, convert
from mlx_musicgen.loading import CheckpointError
from mlx_musicgen.settings import command_settings

ROOT = Path(__file__).resolve().parents[1]
ATOL = 1e-4
TEXTS = ["warm bass and soft vocals", "jazz"]  # of different lengths: audiocraft attends to the padding
TOKENIZER_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


@dataclasses.dataclass
class Built:
    folder: Path  # state_dict.bin and compression_state_dict.bin
    t5: Path
    reference: object  # audiocraft's MusicGen or AudioGen, loaded from the folder by audiocraft's loaders


def t5_folder(tiny, folder: Path) -> Path:
    """The tiny checkpoint's T5 encoder and tokenizer as a T5 folder of its own, with what the Hub's t5-base
    also holds: T5's own generation_config.json (max_length 20), which is not the model's."""
    tiny.reference.text_encoder.save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tiny.folder / name).is_file():
            shutil.copyfile(tiny.folder / name, folder / name)
    (folder / "generation_config.json").write_text(json.dumps({"max_length": 20, "decoder_start_token_id": 0}))
    return folder


def build(tiny, folder: Path, *, solver: str = "musicgen", channels: int = 1, t5_name: str = "t5-base",
          codec_cfg=None, pointer: tuple[str, Path] | None = None, card: int = 64, seed: int = 0,
          edit=None) -> Built:
    """A random-weight audiocraft checkpoint of `solver`'s kind, exported into `folder`, and audiocraft's own
    generator loaded back from it (its window the config's segment_duration, as audiocraft's get_pretrained
    takes it). `pointer` (name, transformers EnCodec folder): the compression file names a pretrained codec
    instead of holding one. `edit`: changes the LM's config before it is built."""
    ac = acref.import_audiocraft()
    t5 = t5_folder(tiny, folder.parent / f"{folder.name}-t5")
    dim = tiny.reference.text_encoder.config.d_model
    rate = 16000 if solver == "audiogen" else 32000
    if codec_cfg is None and pointer is None:
        codec_cfg = acref.codec_config(sample_rate=rate, ratios=(8, 5, 4, 4) if rate == 32000 else (8, 5, 4, 2),
                                       bins=card)
    if pointer is not None:
        rate = tiny.reference.audio_encoder.config.sampling_rate
    cfg = acref.lm_config(t5_name, n_q=4 * channels, card=card, solver=solver, sample_rate=rate, channels=channels,
                          duration=10.0 if solver == "audiogen" else 30.0)
    if edit is not None:
        edit(cfg)
    with acref.LocalT5(t5, dim, t5_name):
        lm = acref.random_lm(cfg, seed=seed)
        acref.export(folder / "state_dict.bin", lm.state_dict(), cfg)
        lm = ac.loaders.load_lm_model(folder)
    if pointer is None:
        acref.export(folder / "compression_state_dict.bin", acref.random_codec(codec_cfg, seed=seed).state_dict(),
                     codec_cfg)
        codec = ac.loaders.load_compression_model(folder)
    else:
        acref.export_pointer(folder / "compression_state_dict.bin", pointer[0])
        with acref.hf_codec(*pointer):
            codec = ac.loaders.load_compression_model(folder)
    kind = ac.AudioGen if solver == "audiogen" else ac.MusicGen
    return Built(folder, t5, kind(folder.name, codec, lm))


@pytest.fixture(scope="module")
def music(tiny, tmp_path_factory):
    return build(tiny, tmp_path_factory.mktemp("ac") / "musicgen")


@pytest.fixture(scope="module")
def sound(tiny, tmp_path_factory):
    return build(tiny, tmp_path_factory.mktemp("ac") / "audiogen", solver="audiogen", t5_name="t5-large", seed=1)


@pytest.fixture(scope="module")
def stereo(tiny, tmp_path_factory):
    return build(tiny, tmp_path_factory.mktemp("ac") / "stereo", channels=2, seed=2)


def reference_logits(built: Built, texts: list[str], codes: np.ndarray) -> np.ndarray:
    """audiocraft's LM on `codes` (B, K, T), conditioned on `texts` as its generate conditions them."""
    from audiocraft.modules.conditioners import ConditioningAttributes

    lm = built.reference.lm
    attributes = [ConditioningAttributes(text={"description": text}) for text in texts]
    condition_tensors = lm.condition_provider(lm.condition_provider.tokenize(attributes))
    with acref.xformers_stand_in():
        return lm(torch.from_numpy(codes), [], condition_tensors).numpy()


def our_logits(model: MusicGen, texts: list[str], codes: np.ndarray) -> np.ndarray:
    states, mask = model.encode_text(texts)
    return np.array(model.decoder(mx.array(codes), model.model.decoder_context(states, mask)))


@pytest.mark.parametrize("which", ["music", "sound", "stereo"])
@pytest.mark.parametrize("portable", [True, False], ids=["portable", "cpu-forms"])
def test_teacher_forced_logits_match_audiocraft(which, portable, request):
    built = request.getfixturevalue(which)
    model = MusicGen.from_pretrained(built.folder, text_encoder=built.t5, portable=portable)
    K = model.num_codebooks
    codes = np.random.default_rng(0).integers(0, 64, size=(2, K, 12))
    expected = reference_logits(built, TEXTS, codes)
    actual = our_logits(model, TEXTS, codes)
    assert actual.shape == expected.shape == (2, K, 12, 64)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def test_padding_is_attended_as_audiocraft_attends_it(music):
    """The shorter text's logits change with the longer text beside it (its padding is attended), as in
    audiocraft, where transformers masks it."""
    model = MusicGen.from_pretrained(music.folder, text_encoder=music.t5)
    codes = np.random.default_rng(1).integers(0, 64, size=(1, 4, 6))
    alone = our_logits(model, TEXTS[1:], codes)
    beside = our_logits(model, TEXTS, np.concatenate([codes, codes]))[1:]
    assert np.abs(alone - beside).max() > 1e-3
    np.testing.assert_allclose(beside, reference_logits(music, TEXTS, np.concatenate([codes, codes]))[1:],
                               atol=ATOL, rtol=0)


def generate_both(built: Built, duration: float, extend_stride: float, texts=TEXTS):
    built.reference.set_generation_params(use_sampling=False, duration=duration, cfg_coef=3.0,
                                          extend_stride=extend_stride)
    with acref.xformers_stand_in():
        audio, tokens = built.reference.generate(texts, progress=False, return_tokens=True)
    model = MusicGen.from_pretrained(built.folder, text_encoder=built.t5)
    ours, codes = model.generate(texts, duration=duration, do_sample=False, guidance_scale=3.0, top_k=0,
                                 extend_stride=extend_stride, return_tokens=True)
    return (audio.numpy(), tokens.numpy()), (ours, codes)


@pytest.mark.parametrize("which, duration", [("music", 30.0), ("sound", 10.0), ("stereo", 2.0)])
def test_greedy_codes_over_a_whole_window_are_audiocraft_s(which, duration, request):
    (audio, tokens), (ours, codes) = generate_both(request.getfixturevalue(which), duration, 2.0)
    assert codes.shape == tokens.shape and codes.shape[-1] == round(duration * 50)
    np.testing.assert_array_equal(codes, tokens)
    np.testing.assert_allclose(ours, audio, atol=ATOL, rtol=0)


def test_greedy_codes_over_a_long_form_are_audiocraft_s(sound):
    """AudioGen beyond its 10 s window: windows 2 s apart (its extend_stride), each continuing the last 8 s."""
    (audio, tokens), (ours, codes) = generate_both(sound, 13.0, 2.0, TEXTS[:1])
    assert codes.shape[-1] == 650
    np.testing.assert_array_equal(codes, tokens)
    np.testing.assert_allclose(ours, audio, atol=ATOL, rtol=0)


def test_audiogen_takes_audiocraft_s_defaults(sound):
    model = MusicGen.from_pretrained(sound.folder, text_encoder=sound.t5)
    assert (model.family, model.sampling_rate, model.frame_rate, model.num_codebooks) == ("audiogen", 16000, 50, 4)
    assert model.shape.window_seconds == 10.0
    codes = model.generate_tokens(["rain"], do_sample=False, top_k=0)  # no length: AudioGen's 5 s
    assert codes.shape[-1] == 250


@pytest.mark.parametrize("pad_mode", ["constant", "reflect"])
def test_codec_encode_and_decode_match_audiocraft(tiny, tmp_path, pad_mode):
    cfg = acref.codec_config(sample_rate=16000, bins=64)
    cfg.seanet.pad_mode = pad_mode
    built = build(tiny, tmp_path / "codec", solver="audiogen", codec_cfg=cfg, seed=3)
    model = MusicGen.from_pretrained(built.folder, text_encoder=built.t5)
    audio = np.random.default_rng(0).standard_normal((2, 1, 16000 // 5 + 37)).astype(np.float32) * 0.3
    codes, _ = built.reference.compression_model.encode(torch.from_numpy(audio))
    np.testing.assert_array_equal(model.encode_audio(audio), codes.numpy())
    expected = built.reference.compression_model.decode(codes).numpy()
    np.testing.assert_allclose(model.decode(codes.numpy()), expected, atol=ATOL, rtol=0)


def fake_hub_cache(root: Path, repos: dict[str, Path]) -> Path:
    """A Hugging Face cache holding `repos` (id -> folder) as snapshot_download leaves them."""
    commit = "0" * 40
    for repo, source in repos.items():
        repo_folder = root / ("models--" + repo.replace("/", "--"))
        shutil.copytree(source, repo_folder / "snapshots" / commit)
        (repo_folder / "refs").mkdir()
        (repo_folder / "refs" / "main").write_text(commit)
    return root


def test_a_pointer_to_a_pretrained_codec_and_the_t5_come_from_the_hub_cache(tiny, tmp_path, monkeypatch):
    """A Hub repo of audiocraft's two files only: compression_state_dict.bin names facebook/encodec_32khz and
    the config names t5-base; all three are taken from the Hub's cache, offline, the codec and T5 in
    transformers' layout, as audiocraft takes them from the Hub."""
    from huggingface_hub import constants

    codec = tmp_path / "encodec_32khz"
    tiny.reference.audio_encoder.save_pretrained(codec)
    built = build(tiny, tmp_path / "finetune", pointer=("facebook/encodec_32khz", codec), card=2048, seed=4)
    cache = fake_hub_cache(tmp_path / "cache", {"facebook/encodec_32khz": codec, "t5-base": built.t5,
                                                 "someone/finetune": built.folder})
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model = MusicGen.from_pretrained("someone/finetune")  # no text_encoder: the config's t5-base
    rate = model.frame_rate
    (audio, tokens), (ours, codes) = generate_both(built, 40 / rate, 2.0)
    np.testing.assert_array_equal(codes, tokens)
    np.testing.assert_allclose(ours, audio, atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.decode(tokens), audio, atol=ATOL, rtol=0)


def test_a_missing_t5_says_how_to_give_one(music, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(CheckpointError, match="text encoder t5-base is not in the local Hugging Face cache"):
        MusicGen.from_pretrained(music.folder)


def test_conversion_round_trips(music, tmp_path):
    """Converted once (no torch), the folder loads alone (its T5 and tokenizer inside) and gives the same logits
    and greedy codes as the audiocraft files it came from."""
    out = convert.convert(music.folder, tmp_path / "converted", text_encoder=music.t5)
    direct = MusicGen.from_pretrained(music.folder, text_encoder=music.t5)
    converted = MusicGen.from_pretrained(out)
    assert converted.family == "musicgen" and converted.config.attend_text_padding
    assert converted.window_frames == direct.window_frames == 1500  # not T5's generation_config.json's 20
    codes = np.random.default_rng(2).integers(0, 64, size=(2, 4, 9))
    np.testing.assert_array_equal(our_logits(converted, TEXTS, codes), our_logits(direct, TEXTS, codes))
    settings = dict(duration=1.0, do_sample=False, guidance_scale=3.0, top_k=0)
    np.testing.assert_array_equal(converted.generate_tokens(TEXTS, **settings), direct.generate_tokens(TEXTS, **settings))


def test_transformers_files_are_preferred_where_a_folder_has_both(tiny, music, tmp_path):
    both = tmp_path / "both"
    shutil.copytree(tiny.folder, both)
    for name in ("state_dict.bin", "compression_state_dict.bin"):
        shutil.copyfile(music.folder / name, both / name)
    assert MusicGen.from_pretrained(both).config.decoder.hidden_size == tiny.reference.decoder.config.hidden_size
    picked = MusicGen.from_pretrained(both, checkpoint_format="audiocraft", text_encoder=music.t5)
    assert picked.config.attend_text_padding and picked.config.decoder.vocab_size == 64
    with pytest.raises(CheckpointError, match="has no audiocraft checkpoint"):
        MusicGen.from_pretrained(tiny.folder, checkpoint_format="audiocraft")


def rewritten(music: Path, tmp_path: Path, change) -> Path:
    """A copy of the checkpoint whose config `change` edits."""
    import yaml

    from mlx_musicgen import torch_bin

    package = torch_bin.read_torch_bin(music / "state_dict.bin")
    cfg = yaml.safe_load(package["xp.cfg"])
    change(cfg)
    folder = tmp_path / "changed"
    folder.mkdir()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in package["best_state"].items()}
    torch.save({**package, "best_state": state, "xp.cfg": yaml.safe_dump(cfg)}, folder / "state_dict.bin")
    shutil.copyfile(music / "compression_state_dict.bin", folder / "compression_state_dict.bin")
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda c: c["conditioners"].update(self_wav={"model": "chroma_stem"}),
     "audiocraft-format melody checkpoint, which conditions through Demucs .* facebook/musicgen-melody"),
    (lambda c: c["conditioners"].update(self_wav={"model": "style"}), "MusicGen-Style, whose style conditioner"),
    (lambda c: c.update(lm_model="transformer_lm_magnet"), "transformer_lm.causal is not False"),
    (lambda c: c.update(lm_model="transformer_lm_other"), "its LM is not audiocraft's transformer_lm"),
    (lambda c: c["transformer_lm"].update(bias_attn=True), "transformer_lm.bias_attn is not False \\(True\\)"),
    (lambda c: c["codebooks_pattern"].update(modeling="parallel"), "codebook pattern is not 'delay'"),
    (lambda c: c.update(fuser=[1]), "its fuser is not the text cross-attended"),
    (lambda c: c.update(codebooks_pattern=[1]), "its codebook pattern is not 'delay'"),
    (lambda c: c["conditioners"].update({3: 1}), "it conditions on more than text"),
    (lambda c: c["dataset"].update(segment_duration="${nowhere}"), "refers to \\$\\{nowhere\\}"),
])
def test_what_this_port_does_not_run_is_refused_in_one_line(music, tmp_path, change, message):
    folder = rewritten(music.folder, tmp_path, change)
    with pytest.raises(CheckpointError, match=message) as error:
        MusicGen.from_pretrained(folder, text_encoder=music.t5)
    assert "\n" not in str(error.value)


def test_audiogen_continues_an_audio_prompt_as_audiocraft_does(sound):
    prompt = np.random.default_rng(5).standard_normal((2, 1, 16000)).astype(np.float32) * 0.3  # 1 s: 50 frames
    sound.reference.set_generation_params(use_sampling=False, duration=3.0, cfg_coef=3.0)
    with acref.xformers_stand_in():
        audio, tokens = sound.reference.generate_continuation(torch.from_numpy(prompt), 16000, TEXTS,
                                                              progress=False, return_tokens=True)
    model = MusicGen.from_pretrained(sound.folder, text_encoder=sound.t5)
    ours, codes = model.generate(TEXTS, audio_prompt=prompt, audio_prompt_sr=16000, duration=3.0, do_sample=False,
                                 top_k=0, return_tokens=True)
    np.testing.assert_array_equal(codes, tokens.numpy())
    np.testing.assert_allclose(ours, audio.numpy(), atol=ATOL, rtol=0)


def test_audiogen_streams_what_it_generates(sound):
    model = MusicGen.from_pretrained(sound.folder, text_encoder=sound.t5)
    settings = dict(duration=3.0, do_sample=False, top_k=0)
    whole = model.generate(TEXTS, **settings)
    streamed = np.concatenate(list(model.generate_stream(TEXTS, chunk_duration=0.5, **settings)), axis=-1)
    np.testing.assert_allclose(streamed, whole, atol=1e-6, rtol=0)


def test_generate_py_makes_audiogen_s_default_clip(sound, tmp_path):
    """No --duration: AudioGen's 5 s (MusicGen's would be 10 s), recorded with its stride of 2 s."""
    out = tmp_path / "dog.wav"
    result = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(sound.folder),
                             "--text-encoder", str(sound.t5), "--text", "dog barking in the rain", "--greedy",
                             "--top-k", "0", "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    audio, rate = sf.read(out)
    assert rate == 16000 and audio.shape == (5 * 16000,)
    recorded = json.loads(out.with_suffix(".json").read_text())
    assert (recorded["duration"], recorded["extend_stride"]) == (5.0, 2.0)


def test_the_studio_takes_the_model_s_defaults(sound, music):
    from mlx_musicgen.studio.jobs import describe
    from mlx_musicgen.studio.settings import JobSettings

    for built, duration, stride in ((sound, 5.0, 2.0), (music, 10.0, 18.0)):
        info = describe(MusicGen.from_pretrained(built.folder, text_encoder=built.t5))
        settings = JobSettings.from_fields({"text": "rain on a tin roof", "top_k": "0"}, info)
        assert (settings.config.duration, settings.config.extend_stride) == (duration, stride)
        assert {k: v.default for k, v in command_settings(info["family"]).items() if k in ("duration", "extend_stride")
                } == {"duration": duration, "extend_stride": stride}


def edited(**changes):
    def edit(cfg):
        for path, value in changes.items():
            node = cfg
            *parents, last = path.split(".")
            for part in parents:
                node = node[part]
            node[last] = value
    return edit


@pytest.mark.parametrize("changes", [
    {"conditioners.description.t5.finetune": True},  # the T5 is saved with the LM, and read from there
    {"transformer_lm.memory_efficient": False},  # torch's own attention: `mha.` in the names
], ids=["fine-tuned-t5", "torch-attention"])
def test_fine_tunes_of_other_settings_match_audiocraft(tiny, tmp_path, changes):
    built = build(tiny, tmp_path / "variant", edit=edited(**changes), seed=6)
    if "conditioners.description.t5.finetune" in changes:
        # the Hub's T5 differs from the fine-tuned one the checkpoint holds: the checkpoint's must win
        with torch.no_grad():
            for tensor in built.reference.lm.condition_provider.conditioners["description"].t5.parameters():
                tensor.add_(0.05)
        state = built.reference.lm.state_dict()
        assert any(".t5." in name for name in state)
        acref.export(built.folder / "state_dict.bin", state, built.reference.lm.cfg)
    model = MusicGen.from_pretrained(built.folder, text_encoder=built.t5)
    codes = np.random.default_rng(3).integers(0, 64, size=(2, 4, 10))
    np.testing.assert_allclose(our_logits(model, TEXTS, codes), reference_logits(built, TEXTS, codes), atol=ATOL,
                               rtol=0)


def test_a_fine_tune_s_own_window_is_its_segment_duration(tiny, tmp_path):
    """Trained on 4 s segments: audiocraft's window is 4 s (max_duration = dataset.segment_duration), and long
    form beyond it moves on by the stride. (AudioGen's: audiocraft's MusicGen cannot be built with a window
    within its default stride of 18 s.)"""
    built = build(tiny, tmp_path / "short", solver="audiogen", edit=edited(**{"dataset.segment_duration": 4.0}),
                  seed=7)
    model = MusicGen.from_pretrained(built.folder, text_encoder=built.t5)
    assert model.window_frames == 200
    (audio, tokens), (ours, codes) = generate_both(built, 7.0, 2.0, TEXTS[:1])
    assert codes.shape[-1] == 350
    np.testing.assert_array_equal(codes, tokens)
    np.testing.assert_allclose(ours, audio, atol=ATOL, rtol=0)


def with_config_text(music: Path, tmp_path: Path, text: str) -> Path:
    """A copy of the checkpoint whose saved config is `text`."""
    from mlx_musicgen import torch_bin

    package = torch_bin.read_torch_bin(music / "state_dict.bin")
    folder = tmp_path / "hostile"
    folder.mkdir()
    state = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in package["best_state"].items()}
    torch.save({**package, "best_state": state, "xp.cfg": text}, folder / "state_dict.bin")
    shutil.copyfile(music / "compression_state_dict.bin", folder / "compression_state_dict.bin")
    return folder


@pytest.mark.parametrize("text, message", [
    ("a: &x [1, 2]\nb: [*x, *x]\n", "uses YAML aliases"),  # a chain of these expands to any size
    ("a: " + "[" * 5000 + "]" * 5000, "is not valid YAML"),
    ("a: " + "x" * 2**20, "characters long"),
    ("- a list", "not a table of settings"),
    ("a: ${b}\nb: ${a}\n", "go round in a circle"),
])
def test_hostile_configs_are_refused_in_one_line(music, tmp_path, text, message):
    with pytest.raises(CheckpointError, match=message) as error:
        MusicGen.from_pretrained(with_config_text(music.folder, tmp_path, text), text_encoder=music.t5)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("pointer, message", [
    ("/home", "not a Hub id"),  # a checkpoint does not choose folders on this machine
    ("~/codec", "not a Hub id"),
    ("dac_44khz", "which this port does not run"),
])
def test_a_codec_pointer_names_a_hub_encodec_only(music, tmp_path, pointer, message):
    folder = tmp_path / "pointing"
    folder.mkdir()
    shutil.copyfile(music.folder / "state_dict.bin", folder / "state_dict.bin")
    acref.export_pointer(folder / "compression_state_dict.bin", pointer)
    with pytest.raises(CheckpointError, match=message):
        MusicGen.from_pretrained(folder, text_encoder=music.t5)


def test_text_encoder_is_for_audiocraft_checkpoints_only(tiny, music):
    with pytest.raises(CheckpointError, match="--text-encoder is for audiocraft checkpoints"):
        MusicGen.from_pretrained(tiny.folder, text_encoder=music.t5)


def test_an_audiocraft_model_fine_tunes_and_fuses(music, tmp_path):
    """finetune.py on audiocraft's files with --text-encoder, then --fuse into a converted folder that loads alone."""
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(int(1.2 * 32000)) / 32000
    for i in range(2):
        sf.write(data / f"clip{i}.wav", (0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t)).astype(np.float32), 32000)
    out, fused = tmp_path / "adapters", tmp_path / "fused"
    common = ["--model", str(music.folder), "--text-encoder", str(music.t5), "--adapter-path", str(out), "--quiet"]
    trained = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *common, "--data", str(data), "--caption",
                              "a tone", "--iters", "2", "--val-fraction", "0", "--lora-rank", "4"],
                             capture_output=True, text=True, cwd=ROOT)
    assert trained.returncode == 0, trained.stderr
    merged = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *common, "--fuse", "--mlx-path", str(fused)],
                            capture_output=True, text=True, cwd=ROOT)
    assert merged.returncode == 0, merged.stderr
    model = MusicGen.from_pretrained(fused)
    assert model.config.attend_text_padding and model.window_frames == 1500
