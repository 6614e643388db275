"""Folders shared with transformers: a fine-tune fused into the Hub's transformers layout (finetune.py --fuse
--hf-path) loads in transformers with every tensor in place and generates our greedy codes; a melody model saved
by transformers 5 (processor_config.json only) and a full fine-tune saved by transformers' Trainer load and
convert as Hub checkpoints do. Codes token-exact (greedy, guidance 3), audio within 1e-4 relative, teacher-forced
logits within 1e-4 relative."""

import importlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures
import mlx.core as mx
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

import reference
from mlx_musicgen import MusicGen, loading, lora
from mlx_musicgen.convert import convert, fuse, hf_weights
from mlx_musicgen.model import MusicGenModel
from test_chroma import chord_progression, tune_over_noise
from test_finetune import reference_labels

ROOT = Path(__file__).resolve().parents[1]
AUDIO_RTOL = 1e-4
LOGITS_RTOL = 1e-4
TEXTS = ["80s pop track with bassy drums and synth", "jazz trumpet solo"]
STEPS = 14  # greedy steps of each generation


def melodies():
    return [chord_progression()[: 3 * 32000], tune_over_noise()[:50000]]


def finetune(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)


def random_adapters(base: Path, out: Path, seed: int, full: bool = False) -> None:
    """Our LoRA on every target (rank 4, alpha 8), B drawn non-zero so that it changes the model, or (`full`) a
    full fine-tune (the decoder and projections moved by noise), saved as finetune.py saves them."""
    model, _, _ = loading.build_model(base)
    mx.random.seed(seed)
    config = lora.AdapterConfig(rank=4, alpha=8.0, full=full)
    if full:
        lora.unfreeze_for_full(model)
    else:
        lora.apply_lora(model, config)
    rng = np.random.default_rng(seed)
    weights = {name: value + mx.array(rng.normal(0, 0.02, value.shape).astype(np.float32)) if full
               else mx.array(rng.normal(0, 0.05, value.shape).astype(np.float32)) if name.endswith("lora_b")
               else value for name, value in lora.adapter_weights(model, full).items()}
    model.load_weights(list(weights.items()), strict=False)
    lora.save_adapters(model, config, out, extra={"model": str(base)})


def load_in_transformers(folder: Path, melody: bool):
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    kind = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
    model, info = kind.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model.eval()


def reference_inputs(checkpoint, texts, melody: bool) -> dict:
    if melody:
        return checkpoint.inputs(texts, melodies())
    return dict(checkpoint.processor(text=texts, padding=True, return_tensors="pt"))


def greedy(model: MusicGen, melody: bool):
    extra = {"melody": melodies()} if melody else {}
    return model.generate(TEXTS, max_new_tokens=STEPS, do_sample=False, guidance_scale=3.0, return_tokens=True,
                          **extra)


def assert_same_generation(ours, theirs) -> float:
    """Codes token-exact, audio within AUDIO_RTOL; returns the audio's relative error."""
    (audio, codes), (ref_audio, ref_codes) = ours, theirs
    assert codes.shape == ref_codes.shape
    np.testing.assert_array_equal(codes, ref_codes)
    error = reference.relative_error(audio, ref_audio)
    assert audio.shape == ref_audio.shape and error < AUDIO_RTOL
    return error


def logits_difference(model: MusicGen, theirs, inputs: dict) -> tuple[float, float]:
    """Teacher-forced logits of 9 random codes per codebook after the texts (and melodies): (max |ours - theirs|,
    relative error)."""
    K = model.num_codebooks
    codes = torch.randint(0, 2048, (2 * K, 9), generator=torch.Generator().manual_seed(0))
    expected = theirs(**inputs, decoder_input_ids=codes).logits.reshape(2, K, -1, 2048)[:, :, -9:].numpy()
    states, mask = model.conditioning(TEXTS, 2, guided=False)
    chroma = inputs["input_features"].numpy() if "input_features" in inputs else None
    context = model.model.decoder_context(states, mask, chroma)
    ours = np.array(model.decoder(mx.array(codes.numpy().reshape(2, K, 9)), context))
    return float(np.abs(ours - expected).max()), reference.relative_error(ours, expected)


# ---- fused models for transformers


@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo", "tiny_melody"])
def test_a_fused_fine_tune_loads_in_transformers_and_gives_our_codes(checkpoint, request, tmp_path):
    """LoRA adapters (mono, melody) or a full fine-tune (stereo) fused with --hf-path."""
    ckpt = request.getfixturevalue(checkpoint)
    melody = checkpoint == "tiny_melody"
    random_adapters(ckpt.folder, tmp_path / "adapters", seed=len(checkpoint), full=checkpoint == "tiny_stereo")
    if checkpoint == "tiny":  # the command, writing both folders
        result = finetune("--fuse", "--adapter-path", tmp_path / "adapters", "--hf-path", tmp_path / "hf",
                          "--mlx-path", tmp_path / "mlx")
        assert result.returncode == 0, result.stderr
        assert "wrote" in result.stderr and (tmp_path / "mlx" / "model.safetensors").is_file()
    else:
        assert fuse(tmp_path / "adapters", hf_path=tmp_path / "hf") == [tmp_path / "hf"]
    folder = tmp_path / "hf"
    for name in ("config.json", "generation_config.json", "tokenizer_config.json"):
        assert json.loads((folder / name).read_text()) == json.loads((ckpt.folder / name).read_text())
    assert (folder / "preprocessor_config.json").is_file() == melody
    theirs = load_in_transformers(folder, melody)
    ours = MusicGen.from_pretrained(ckpt.folder, adapter=tmp_path / "adapters")
    inputs = reference_inputs(ckpt, TEXTS, melody)
    expected = reference.generate(theirs, inputs=inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=STEPS)
    error = assert_same_generation(greedy(ours, melody), expected)
    base = reference.generate(ckpt.reference, inputs=inputs, do_sample=False, guidance_scale=3.0,
                              max_new_tokens=STEPS)[1]
    assert (base != expected[1]).mean() > 0.5  # the fine-tune changed the music: the test tests it
    difference, relative = logits_difference(ours, theirs, inputs)
    assert relative < LOGITS_RTOL
    print(f"\n{checkpoint} fused: audio relative error {error:.2e}, logits max |diff| {difference:.2e} "
          f"(relative {relative:.2e})")


def test_the_transformers_names_are_the_inverse_of_sanitize(tiny_melody):
    model, _, _ = loading.build_model(tiny_melody.folder)
    ours = dict(tree_flatten(model.parameters()))
    back = MusicGenModel.sanitize(hf_weights(model))
    assert set(back) == set(ours)
    for name, value in ours.items():  # weight norm (g * v / ||v||) gives EnCodec's convs back to rounding
        np.testing.assert_allclose(np.array(back[name]), np.array(value), rtol=1e-6, atol=1e-7, err_msg=name)


def test_a_half_precision_base_is_written_in_float32_and_a_quantized_one_refused(tiny, tmp_path):
    random_adapters(tiny.folder, tmp_path / "adapters", seed=0)
    half = convert(tiny.folder, tmp_path / "f16", dtype="float16")
    fuse(tmp_path / "adapters", model_id=str(half), hf_path=tmp_path / "hf")
    theirs = load_in_transformers(tmp_path / "hf", melody=False)
    assert {p.dtype for p in theirs.parameters()} == {torch.float32}
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "mlx_musicgen" not in config and config.get("dtype", "float32") == "float32"

    base = convert(tiny.folder, tmp_path / "q8", q_bits=8)
    result = finetune("--fuse", "--adapter-path", tmp_path / "adapters", "--model", base, "--hf-path",
                      tmp_path / "hf-q8")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {base} is quantized, which transformers "
                                                             f"cannot load: fuse onto the float checkpoint")
    assert not (tmp_path / "hf-q8").exists()
    result = finetune("--fuse", "--adapter-path", tmp_path / "adapters")
    assert result.returncode == 2 and "give one" in result.stderr.strip().splitlines()[-1], result.stderr


# ---- transformers 5 melody folders


@pytest.fixture(scope="module")
def melody_v5(tiny_melody, tmp_path_factory):
    """tiny_melody saved as transformers 5 saves a model and its processor: one processor_config.json with the
    chroma settings under "feature_extractor", no preprocessor_config.json, no spiece.model."""
    # the module itself: the package's lazy name is a placeholder that demands torchaudio (see fixtures)
    processing = importlib.import_module("transformers.models.musicgen_melody.processing_musicgen_melody")
    folder = tmp_path_factory.mktemp("melody_v5")
    tiny_melody.reference.save_pretrained(str(folder))
    processing.MusicgenMelodyProcessor(tiny_melody.extractor, tiny_melody.tokenizer).save_pretrained(str(folder))
    return folder


def test_a_transformers_5_melody_folder_loads_converts_and_matches(melody_v5, tiny_melody, tmp_path):
    names = {p.name for p in melody_v5.iterdir()}
    assert "processor_config.json" in names and not names & {"preprocessor_config.json", "spiece.model"}
    nested = json.loads((melody_v5 / "processor_config.json").read_text())["feature_extractor"]
    assert nested["feature_extractor_type"] == "MusicgenMelodyFeatureExtractor"
    expected = reference.generate(tiny_melody.reference, inputs=tiny_melody.inputs(TEXTS, melodies()),
                                  do_sample=False, guidance_scale=3.0, max_new_tokens=STEPS)
    loaded = MusicGen.from_pretrained(melody_v5)
    error = assert_same_generation(greedy(loaded, True), expected)
    out = convert(melody_v5, tmp_path / "converted")
    assert (out / "processor_config.json").read_text() == (melody_v5 / "processor_config.json").read_text()
    assert_same_generation(greedy(MusicGen.from_pretrained(out), True), expected)
    difference, relative = logits_difference(loaded, tiny_melody.reference, tiny_melody.inputs(TEXTS, melodies()))
    assert relative < LOGITS_RTOL
    print(f"\ntransformers 5 melody folder: audio relative error {error:.2e}, logits max |diff| {difference:.2e}")


def test_nested_chroma_settings_are_checked_as_a_preprocessor_config_is(melody_v5, tmp_path):
    for i, (edit, message) in enumerate((
        ({"n_fft": 2**40}, r"processor_config.json: preprocessor.n_fft must be a whole number from 1"),
        ({"hop_length": 32768}, r"hop_length 32768 is longer than n_fft 16384"),
        ({"feature_size": 24}, r"feature_size 24 is not the model's num_chroma 12"),
    )):
        hostile = tmp_path / f"hostile-{i}"
        shutil.copytree(melody_v5, hostile)
        settings = json.loads((hostile / "processor_config.json").read_text())
        settings["feature_extractor"].update(edit)
        (hostile / "processor_config.json").write_text(json.dumps(settings))
        with pytest.raises(loading.CheckpointError, match=message):
            MusicGen.from_pretrained(hostile)
    broken = tmp_path / "not-a-table"
    shutil.copytree(melody_v5, broken)
    (broken / "processor_config.json").write_text(json.dumps({"feature_extractor": [1, 2]}))
    with pytest.raises(loading.CheckpointError, match=r'its "feature_extractor" is not a table of settings'):
        MusicGen.from_pretrained(broken)
    other = tmp_path / "encodec-extractor"  # plain MusicGen's processor: no chroma settings in it
    shutil.copytree(melody_v5, other)
    (other / "processor_config.json").write_text(json.dumps({"feature_extractor": {
        "feature_extractor_type": "EncodecFeatureExtractor", "feature_size": 1, "sampling_rate": 32000}}))
    with pytest.raises(loading.CheckpointError, match=r"has no preprocessor_config.json, which holds a melody"):
        MusicGen.from_pretrained(other)


# ---- full fine-tunes saved by transformers


@pytest.fixture(scope="module")
def trainer_fine_tune(tmp_path_factory):
    """A random MusicgenForConditionalGeneration trained 2 steps by transformers' Trainer (AdamW, lr 1e-3) on two
    captioned clips, saved by Trainer.save_model, its processor beside: (folder, the trained model, processor)."""
    from transformers import Trainer, TrainingArguments

    folder = tmp_path_factory.mktemp("trainer")
    model = fixtures.build_model(fixtures.Shape(), seed=2)
    processor = fixtures.build_processor(tmp_path_factory.mktemp("tokenizer"))
    model.config.decoder.decoder_start_token_id = 2048  # what shifts the labels right
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2048, (4, 10)) for _ in TEXTS]
    tokens = processor(text=TEXTS, padding=True, return_tensors="pt")
    labels = reference_labels(model, codes)
    rows = [{"input_ids": tokens["input_ids"][i], "attention_mask": tokens["attention_mask"][i],
             "labels": labels[i]} for i in range(len(TEXTS))]
    before = model.decoder.lm_heads[0].weight.clone()
    args = TrainingArguments(output_dir=str(folder / "run"), max_steps=2, per_device_train_batch_size=2,
                             learning_rate=1e-3, use_cpu=True, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
                             remove_unused_columns=False)
    # No processing_class: transformers 5.24's Trainer then aligns the model's special tokens with the tokenizer's
    # through config.get_text_config(), which MusicGen's two text configs (T5's, the decoder's) make ambiguous.
    trainer = Trainer(model=model, args=args, train_dataset=rows)
    with torch.enable_grad():
        trainer.train()
    model.eval()
    assert not torch.equal(before, model.decoder.lm_heads[0].weight)  # it trained
    trainer.save_model(str(folder / "model"))
    processor.save_pretrained(str(folder / "model"))
    return folder / "model", model, processor


def test_a_full_fine_tune_saved_by_transformers_loads_and_converts(trainer_fine_tune, tmp_path):
    folder, trained, processor = trainer_fine_tune
    expected = reference.generate(trained, processor, TEXTS, do_sample=False, guidance_scale=3.0,
                                  max_new_tokens=STEPS)
    loaded = MusicGen.from_pretrained(folder)
    error = assert_same_generation(greedy(loaded, False), expected)
    converted = MusicGen.from_pretrained(convert(folder, tmp_path / "converted"))
    assert_same_generation(greedy(converted, False), expected)
    inputs = dict(processor(text=TEXTS, padding=True, return_tensors="pt"))
    difference, relative = logits_difference(loaded, trained, inputs)
    assert relative < LOGITS_RTOL
    print(f"\nTrainer fine-tune: audio relative error {error:.2e}, logits max |diff| {difference:.2e}")
