"""PEFT adapters both ways, against transformers + peft on tiny random models.

In: a LoRA made by `peft.get_peft_model` on transformers' model over every target of the MusicGen recipe (the
attention projections, fc1/fc2, the heads, the projections into the decoder, the embeddings), its B (and the
embeddings' A) drawn non-zero and saved by `save_pretrained`, then given to MusicGen.from_pretrained(adapter=):
greedy codes with guidance 3 token for token, and teacher-forced logits within 1e-4 relative, of PEFT's model; with
use_rslora, rank_pattern/alpha_pattern and fan_in_fan_out too, and for a melody model. What cannot be applied
exactly is refused in one line. Out: adapters trained here load in `PeftModel.from_pretrained` and give our codes.
"""

import json
import warnings

import fixtures
import mlx.core as mx
from mlx.utils import tree_flatten
import numpy as np
import pytest
import torch

import reference
from mlx_musicgen import MusicGen, lora
from mlx_musicgen.dataset import Example, text_states
from mlx_musicgen.loading import CheckpointError
from mlx_musicgen.trainer import TrainConfig, Trainer

LOGITS_RTOL = 1e-4
TEXTS = ["80s pop track with bassy drums and synth", "jazz"]
MEASURED = {}  # case -> max relative logit difference, printed at the end (pytest -s)


def targets(num_codebooks: int, melody: bool) -> list[str]:
    """Every target the recipe uses, by peft's names: lists' members one by one (`lm_heads` alone names the list)."""
    names = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "enc_to_dec_proj"]
    names += ["audio_enc_to_dec_proj"] if melody else []
    return names + [f"lm_heads.{k}" for k in range(num_codebooks)] + [f"embed_tokens.{k}" for k in range(num_codebooks)]


def transformers_model(folder, melody: bool = False):
    from transformers import MusicgenForConditionalGeneration, MusicgenMelodyForConditionalGeneration

    kind = MusicgenMelodyForConditionalGeneration if melody else MusicgenForConditionalGeneration
    return kind.from_pretrained(str(folder)).eval()


def make_adapter(base, out, seed: int = 0, **settings):
    """peft's LoRA on a transformers model (every recipe target unless `target_modules` is given), each B (and the
    embeddings' A, zero at peft's start) drawn non-zero, saved in `out`; returns the PeftModel."""
    from peft import LoraConfig, get_peft_model

    melody = "audio_enc_to_dec_proj" in dict(base.named_children())
    settings = {"target_modules": targets(base.decoder.num_codebooks, melody), "r": 4, "lora_alpha": 8, **settings}
    model = get_peft_model(base, LoraConfig(**settings)).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "lora_embedding" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(str(out))
    return model


def their_logits(model, inputs, codes: np.ndarray) -> np.ndarray:
    """Teacher-forced logits (B, K, T, V) of codes (B, K, T); a melody model's prefix positions dropped."""
    B, K, T = codes.shape
    with torch.no_grad():
        logits = model(**inputs, decoder_input_ids=torch.from_numpy(codes.reshape(B * K, T))).logits
    return logits.reshape(B, K, -1, logits.shape[-1])[:, :, -T:].numpy()


def our_logits(musicgen: MusicGen, codes: np.ndarray, chroma=None) -> np.ndarray:
    states, mask = musicgen.conditioning(TEXTS, len(TEXTS), guided=False)
    context = musicgen.model.decoder_context(states, mask, chroma)
    return np.array(musicgen.decoder(mx.array(codes), context))


def random_codes(num_codebooks: int, frames: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2048, (len(TEXTS), num_codebooks, frames))


def assert_same_logits(case: str, ours: np.ndarray, theirs: np.ndarray) -> None:
    error = reference.relative_error(ours, theirs)
    MEASURED[case] = (error, float(np.abs(ours - theirs).max()))
    assert error < LOGITS_RTOL, (case, error)


def assert_matches_peft(checkpoint, peft_model, adapter, case: str, frames: int = 14) -> MusicGen:
    """Ours with the adapter against PEFT's model: greedy guided codes, then teacher-forced logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the adapter names this very folder: no warning
        ours = MusicGen.from_pretrained(checkpoint.folder, adapter=adapter)
    _, expected = reference.generate(peft_model, checkpoint.processor, TEXTS, do_sample=False, guidance_scale=3.0,
                                     max_new_tokens=frames)
    codes = ours.generate_tokens(TEXTS, max_new_tokens=frames, do_sample=False, guidance_scale=3.0)
    np.testing.assert_array_equal(codes, expected)
    K = ours.num_codebooks
    inputs = checkpoint.processor(text=TEXTS, padding=True, return_tensors="pt")
    codes = random_codes(K)
    assert_same_logits(case, our_logits(ours, codes), their_logits(peft_model, inputs, codes))
    return ours


@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo"])
def test_a_peft_adapter_gives_peft_models_codes_and_logits(checkpoint, request, tmp_path):
    ckpt = request.getfixturevalue(checkpoint)
    peft_model = make_adapter(transformers_model(ckpt.folder), tmp_path / "adapter")
    ours = assert_matches_peft(ckpt, peft_model, tmp_path / "adapter", checkpoint)
    base = MusicGen.from_pretrained(ckpt.folder)
    codes = random_codes(ours.num_codebooks)
    assert reference.relative_error(our_logits(base, codes), our_logits(ours, codes)) > 1e-2  # it adapts


def test_rslora_patterns_and_fan_in_fan_out(tiny, tmp_path):
    """Per-module ranks and alphas by regex (peft's get_pattern_key), rsLoRA's alpha / sqrt(r), and
    fan_in_fan_out written true (peft resets it for nn.Linear, so it changes nothing)."""
    from peft import PeftModel

    out = tmp_path / "adapter"
    settings = dict(use_rslora=True, rank_pattern={"fc1": 2, r"layers\.1\.self_attn\.q_proj": 6, "lm_heads.3": 3},
                    alpha_pattern={"lm_heads.1": 3, "embed_tokens.2": 5, "fc2": 16})
    make_adapter(transformers_model(tiny.folder), out, seed=1, **settings)
    config = json.loads((out / "adapter_config.json").read_text())
    (out / "adapter_config.json").write_text(json.dumps({**config, "fan_in_fan_out": True}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's own: fan_in_fan_out set back to False for nn.Linear
        peft_model = PeftModel.from_pretrained(transformers_model(tiny.folder), str(out)).eval()
    assert peft_model.base_model.model.decoder.model.decoder.layers[1].self_attn.q_proj.r["default"] == 6
    assert_matches_peft(tiny, peft_model, out, "rslora + patterns + fan_in_fan_out")


def test_a_melody_models_adapter(tiny_melody, tmp_path):
    from test_chroma import chord_progression, tune_over_noise

    peft_model = make_adapter(transformers_model(tiny_melody.folder, melody=True), tmp_path / "adapter", seed=2)
    ours = MusicGen.from_pretrained(tiny_melody.folder, adapter=tmp_path / "adapter")
    melodies = [chord_progression()[: 3 * 32000], tune_over_noise()[:50000]]
    inputs = tiny_melody.inputs(TEXTS, melodies)
    _, expected = reference.generate(peft_model, inputs=inputs, do_sample=False, guidance_scale=3.0,
                                     max_new_tokens=14)
    codes = ours.generate_tokens(TEXTS, melody=melodies, max_new_tokens=14, do_sample=False, guidance_scale=3.0)
    np.testing.assert_array_equal(codes, expected)
    codes = random_codes(4)
    ours_logits = our_logits(ours, codes, inputs["input_features"].numpy())
    assert_same_logits("melody", ours_logits, their_logits(peft_model, inputs, codes))


# ---- refusals and warnings, each in one line


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_what_cannot_be_applied_exactly_is_refused_in_one_line(tiny, tmp_path):
    from peft import IA3Config, get_peft_model

    cases = {
        "use_dora": lambda out: make_adapter(transformers_model(tiny.folder), out, use_dora=True),
        "IA3": lambda out: get_peft_model(transformers_model(tiny.folder), IA3Config(
            target_modules=["k_proj", "fc2"], feedforward_modules=["fc2"])).save_pretrained(str(out)),
        "another shape": lambda out: make_adapter(fixtures.build_model(fixtures.Shape(decoder_ffn=96)), out),
        "T5": lambda out: make_adapter(transformers_model(tiny.folder), out, target_modules=["q"]),
    }
    expected = {
        "use_dora": r"holds a DoRA adapter \(use_dora\), which this loader cannot apply",
        "IA3": r"holds a PEFT IA3 adapter, and only LoRA adapters \(peft_type LORA\) load here",
        "another shape": r"does not fit this model: decoder\.model\.decoder\.layers\.0\.fc1's A and B are \(4, 64\) "
                         r"and \(96, 4\), this model's takes \(4, 64\) and \(128, 4\): it was made for a model of "
                         r"another shape",
        "T5": r"adapts text_encoder\.encoder\.block\.0\.layer\.0\.SelfAttention\.q: only the decoder and the "
              r"projections into it take adapters here",
    }
    for case, make in cases.items():
        make(tmp_path / case)
        with pytest.raises(CheckpointError, match=expected[case]) as error:
            MusicGen.from_pretrained(tiny.folder, adapter=tmp_path / case)
        one_line(error)
    with pytest.raises(CheckpointError, match=r"nothing holds no adapters \(adapter_config.json and "
                                              r"adapters.safetensors\), nor PEFT's") as error:
        lora.read_adapter_config(tmp_path / "nothing")
    one_line(error)


def test_other_settings_that_cannot_be_applied_are_named(tiny, tmp_path):
    """Config fields peft would apply beyond W + scale B A, each refused by name (the config alone is read)."""
    out = tmp_path / "adapter"
    make_adapter(transformers_model(tiny.folder), out, target_modules=["fc1"])
    config = json.loads((out / "adapter_config.json").read_text())
    for field, value, message in (("bias", "lora_only", r"bias='lora_only'"),
                                  ("modules_to_save", ["lm_heads"], r"modules_to_save=\['lm_heads'\]"),
                                  ("layer_replication", [[0, 2]], r"layer_replication=\[\[0, 2\]\]"),
                                  ("init_lora_weights", "pissa", r"initialised with 'pissa', which changes the base")):
        (out / "adapter_config.json").write_text(json.dumps({**config, field: value}))
        with pytest.raises(CheckpointError, match=message) as error:
            lora.read_adapter_config(out)
        one_line(error)


def test_base_model_names_match_by_id_path_or_folder_name(tmp_path):
    from mlx_musicgen.peft import same_model

    (tmp_path / "musicgen-small").mkdir()
    converted = tmp_path / "mlx_model"
    converted.mkdir()
    (converted / "config.json").write_text(json.dumps({"mlx_musicgen": {"source": "facebook/musicgen-small"}}))
    assert same_model("facebook/musicgen-small", "facebook/musicgen-small")
    assert not same_model("facebook/musicgen-small", "facebook/musicgen-melody")
    assert same_model("facebook/musicgen-small", str(tmp_path / "musicgen-small"))  # a folder named after the repo
    assert same_model("facebook/musicgen-small", str(converted))  # converted from it
    assert not same_model("facebook/musicgen-medium", str(converted))


def test_another_base_model_warns_in_one_line(tiny, tmp_path):
    out = tmp_path / "adapter"
    make_adapter(transformers_model(tiny.folder), out, target_modules=["fc1"])
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny.folder)
    config["base_model_name_or_path"] = "facebook/musicgen-melody"
    (out / "adapter_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"was made for facebook/musicgen-melody, and this model is .*tiny") as caught:
        MusicGen.from_pretrained(tiny.folder, adapter=out)
    assert all("\n" not in str(w.message) for w in caught)


def test_a_hub_id_is_downloaded_or_found_in_the_cache(tiny, tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    out = tmp_path / "adapter"
    make_adapter(transformers_model(tiny.folder), out, target_modules=["fc2"])
    asked = []

    def cached(repo_id, allow_patterns=None, **kwargs):
        asked.append((repo_id, allow_patterns))
        return str(out)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", cached)
    local = MusicGen.from_pretrained(tiny.folder, adapter=out)
    hub = MusicGen.from_pretrained(tiny.folder, adapter="someone/musicgen-lora")
    assert asked[0][0] == "someone/musicgen-lora" and "adapter_model.safetensors" in asked[0][1]
    codes = random_codes(4)
    np.testing.assert_array_equal(our_logits(hub, codes), our_logits(local, codes))

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("not cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(CheckpointError, match=r"the adapter someone/other is not in the local Hugging Face cache "
                                              r"and the Hub cannot be reached") as error:
        MusicGen.from_pretrained(tiny.folder, adapter="someone/other")
    one_line(error)


# ---- out: adapters trained here, loaded by transformers + PEFT


def examples(musicgen: MusicGen) -> list[Example]:
    rng = np.random.default_rng(7)
    return [Example(f"clip{i}", rng.integers(0, 2048, (musicgen.num_codebooks, 10)), text,
                    *text_states(musicgen, text)) for i, text in enumerate(TEXTS)]


def test_adapters_trained_here_load_in_peft(tiny, tmp_path):
    """A few steps of LoRA on every target (the embeddings too); PeftModel.from_pretrained(OUT) then gives our
    greedy codes and logits. The layout written before (ours, adapters.safetensors) still loads."""
    from peft import PeftModel

    out = tmp_path / "out"
    out.mkdir()
    musicgen = MusicGen.from_pretrained(tiny.folder, portable=True)
    settings = lora.AdapterConfig(rank=4, alpha=8.0, targets=list(lora.TARGETS) + ["embed_tokens"])
    config = TrainConfig(iters=3, learning_rate=1e-2, warmup=0, log_every=3, cond_dropout=0.0)
    trainer = Trainer(musicgen.model, examples(musicgen), [], out, config, settings, str(tiny.folder))
    trainer.plotting = False
    trainer.run(log=lambda m: None)
    assert {p.name for p in out.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors",
                                               "mlx_adapter.json", "checkpoint"}
    assert not (out / "adapters.safetensors").exists()
    assert json.loads((out / "mlx_adapter.json").read_text())["step"] == 3
    assert lora.recorded_model(out) == str(tiny.folder)

    peft_model = PeftModel.from_pretrained(transformers_model(tiny.folder), str(out)).eval()
    adapted = [n for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and
               ("default" in m.lora_A or "default" in m.lora_embedding_A)]
    assert len(adapted) == len(lora.adapter_weights(musicgen.model)) // 2 == 2 * 4 * 2 + 2 * 2 + 4 + 4 + 1
    ours = assert_matches_peft(tiny, peft_model, out, "trained here, in PEFT")

    legacy = tmp_path / "legacy"  # the layout written before: our config and names
    legacy.mkdir()
    mx.save_safetensors(str(legacy / "adapters.safetensors"), lora.adapter_weights(musicgen.model))
    (legacy / "adapter_config.json").write_text(json.dumps({**vars(settings), "model": str(tiny.folder)}))
    old = MusicGen.from_pretrained(tiny.folder, adapter=legacy)
    codes = random_codes(4)
    assert reference.relative_error(our_logits(old, codes), our_logits(ours, codes)) < 1e-6
    assert lora.recorded_model(legacy) == str(tiny.folder)


def test_a_peft_adapter_trains_further_here(tiny, tmp_path):
    """A PEFT adapter made elsewhere (rsLoRA, per-module ranks and alphas, dropout) as the start of a fine-tune
    here (finetune --resume ADAPTER): it starts from the adapter's weights, keeps its config, trains every one of
    its matrices, and PeftModel.from_pretrained(OUT) then gives our codes."""
    from peft import PeftModel

    source = tmp_path / "source"
    settings = dict(use_rslora=True, lora_dropout=0.1, rank_pattern={"fc1": 2, "lm_heads.3": 3},
                    alpha_pattern={"fc2": 16, "embed_tokens.1": 5})
    make_adapter(transformers_model(tiny.folder), source, seed=2, **settings)
    tensors = mx.load(str(source / "adapter_model.safetensors"))  # saved in half precision, as some are
    mx.save_safetensors(str(source / "adapter_model.safetensors"), {k: v.astype(mx.float16) for k, v in tensors.items()})
    out = tmp_path / "out"
    out.mkdir()
    musicgen = MusicGen.from_pretrained(tiny.folder, portable=True)
    config = TrainConfig(iters=3, learning_rate=1e-2, warmup=0, log_every=3, cond_dropout=0.0)
    trainer = Trainer(musicgen.model, examples(musicgen), [], out, config, lora.AdapterConfig(rank=64),
                               str(tiny.folder), start_from=source)
    trainer.plotting = False
    assert trainer.trainable_count() == sum(v.size for v in tensors.values())
    assert {v.dtype for _, v in tree_flatten(musicgen.model.trainable_parameters())} == {mx.float32}  # the model's
    codes = random_codes(4)
    musicgen.model.eval()
    start = our_logits(musicgen, codes)
    as_loaded = MusicGen.from_pretrained(tiny.folder, adapter=source)
    assert reference.relative_error(start, our_logits(as_loaded, codes)) < 1e-6  # the adapter's own weights
    trainer.run(log=lambda m: None)

    theirs, ours = (json.loads((folder / "adapter_config.json").read_text()) for folder in (source, out))
    assert ours == {**theirs, "base_model_name_or_path": str(tiny.folder)}
    record = json.loads((out / "mlx_adapter.json").read_text())
    assert (record["started_from"], record["step"], record["use_rslora"]) == (str(source), 3, True)
    peft_model = PeftModel.from_pretrained(transformers_model(tiny.folder), str(out)).eval()
    further = assert_matches_peft(tiny, peft_model, out, "PEFT adapter trained further here")
    assert reference.relative_error(our_logits(further, codes), start) > 1e-3  # it trained


def test_report_measured_differences():
    """Prints the parity figures measured above (run with -s)."""
    for case, (relative, absolute) in MEASURED.items():
        print(f"\n{case}: max |logit difference| {absolute:.3g}, relative {relative:.3g}")
