"""Fine-tuning: the loss against transformers' loss with labels, LoRA gradients against torch autograd on the
same LoRA, learning (a synthetic dataset memorised: greedy generation with the adapters reproduces a training
clip's codes), adapters saved, loaded, fused and resumed, and the CLI's errors."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import fixtures
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import soundfile as sf
import torch
from mlx.utils import tree_flatten

from mlx_musicgen import MusicGen, _linux, cpu, lora, training
from mlx_musicgen.cpu import numpy_training, training as cpu_training
from mlx_musicgen import audio
from mlx_musicgen.cpu.numpy_t5 import NumpyT5
from mlx_musicgen.dataset import encode_clip, load_examples, text_states
from mlx_musicgen.trainer import FusedAdamW, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
LOSS_RTOL = 1e-5
GRAD_RTOL = 1e-4
CAPTIONS = ["jazz trumpet solo", "techno kick house", "folk acoustic guitar"]


def reference_labels(reference, codes: list[np.ndarray]) -> torch.Tensor:
    """transformers' labels (B, T, K): build_delay_pattern_mask + apply_delay_pattern_mask on [start | codes]
    (max_length T + 1 + K, as the reference's training recipe), the start column dropped, -100 padding."""
    decoder = reference.decoder
    K = codes[0].shape[0]
    labels = []
    for clip in codes:
        ids = torch.cat([torch.full((K, 1), 2048), torch.tensor(clip)], dim=1)
        ids, mask = decoder.build_delay_pattern_mask(ids, pad_token_id=2048, max_length=ids.shape[-1] + K)
        labels.append(decoder.apply_delay_pattern_mask(ids, mask)[:, 1:])
    longest = max(label.shape[-1] for label in labels)
    padded = [torch.nn.functional.pad(label, (0, longest - label.shape[-1]), value=-100) for label in labels]
    return torch.stack(padded).transpose(1, 2)


def clips(K: int, lengths=(12, 9), seed=0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 2048, (K, n)) for n in lengths]


def portable(folder, forms: str = "portable") -> MusicGen:
    """The model as finetune.py trains it: the portable modules (the CPU's inference forms are for generation);
    `forms` "cpu": with the training forms that the trainer swaps in on a CPU (cpu.optimize_for_training)."""
    musicgen = MusicGen.from_pretrained(folder, portable=True)
    if forms == "cpu":
        cpu.optimize_for_training(musicgen.model)
    return musicgen


def our_batch(model, texts, codes, chroma=None) -> training.Batch:
    tokens = model.tokenizer(texts, padding=True, return_tensors="np")
    states = model.text_encoder(mx.array(tokens["input_ids"]), mx.array(tokens["attention_mask"]))
    inputs, labels = training.delayed_sequences(codes, 2048, model.audio_channels)
    return training.Batch(mx.array(inputs), mx.array(labels), states, mx.array(tokens["attention_mask"]), chroma)


@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo"])
def test_labels_are_the_references_delay_pattern(checkpoint, request):
    reference = request.getfixturevalue(checkpoint).reference
    K = reference.decoder.num_codebooks
    codes = clips(K)
    expected = reference_labels(reference, codes).transpose(1, 2).numpy()
    _, labels = training.delayed_sequences(codes, 2048, reference.config.decoder.audio_channels)
    np.testing.assert_array_equal(np.where(expected == -100, 2048, expected), labels)


@pytest.mark.parametrize("forms", ["portable", "cpu"])
@pytest.mark.parametrize("checkpoint", ["tiny", "tiny_stereo"])
def test_loss_is_the_references(checkpoint, forms, request):
    """A padded batch of two texts and two clips of different lengths, teacher-forced."""
    ckpt = request.getfixturevalue(checkpoint)
    reference, musicgen = ckpt.reference, portable(ckpt.folder, forms)
    reference.config.decoder.decoder_start_token_id = 2048
    texts = ["80s pop track with bassy drums and synth", "jazz"]
    codes = clips(reference.decoder.num_codebooks)
    inputs = ckpt.processor(text=texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = reference(**inputs, labels=reference_labels(reference, codes)).loss.item()
    ours = training.loss(musicgen.model, our_batch(musicgen, texts, codes)).item()
    assert abs(ours - expected) / expected < LOSS_RTOL
    assert training.loss(musicgen.model, our_batch(musicgen, texts, codes), checkpoint=True).item() == ours


@pytest.mark.parametrize("forms", ["portable", "cpu"])
def test_melody_loss_is_the_references(tiny_melody, forms):
    musicgen = portable(tiny_melody.folder, forms)
    reference = tiny_melody.reference
    reference.config.decoder.decoder_start_token_id = 2048
    texts = ["lofi slow bpm", "epic orchestral strings cinematic"]
    codes = clips(4, (10, 8), seed=1)
    chroma = np.eye(12, dtype=np.float32)[np.random.default_rng(2).integers(0, 12, (2, 9))]
    inputs = tiny_melody.inputs(texts)
    with torch.no_grad():
        expected = reference(**inputs, input_features=torch.from_numpy(chroma),
                             labels=reference_labels(reference, codes)).loss.item()
    ours = training.loss(musicgen.model, our_batch(musicgen, texts, codes, chroma)).item()
    assert abs(ours - expected) / expected < LOSS_RTOL


@pytest.mark.parametrize("forms,compiled", [("portable", False), ("portable", True), ("cpu", False),
                                            ("cpu", True), ("numpy", False)])
def test_lora_gradients_match_torch_autograd(tiny, forms, compiled):
    """Every adapter on (rank 4, alpha 8), B drawn non-zero so that both matrices get gradients; the same
    LoRA built in plain torch around transformers' modules (forward hooks), its gradients by autograd. Ours as
    the trainer computes them (training.compiled_loss_and_grad) and uncompiled, and in numpy (`forms` "numpy":
    cpu.numpy_training, what the trainer takes on a CPU)."""
    if forms == "numpy":
        pytest.importorskip("numba")
    musicgen = portable(tiny.folder, "portable" if forms == "numpy" else forms)
    model = musicgen.model
    config = lora.AdapterConfig(rank=4, alpha=8.0)
    mx.random.seed(0)
    lora.apply_lora(model, config)
    rng = np.random.default_rng(3)
    adapters = {}
    for name, value in lora.adapter_weights(model).items():
        if name.endswith("lora_b"):
            value = mx.array(rng.normal(0, 0.02, value.shape).astype(np.float32))
        adapters[name] = value
    model.load_weights(list(adapters.items()), strict=False)
    texts = ["80s pop track with bassy drums and synth", "jazz"]
    codes = clips(4)
    if forms == "numpy":
        loss_and_grad = numpy_training.loss_and_grad(model)
        assert loss_and_grad is not None, numpy_training.unsupported(model)
    elif compiled:
        loss_and_grad = training.compiled_loss_and_grad(model)
    else:
        loss_and_grad = nn.value_and_grad(model, training.loss)
    loss, grads = loss_and_grad(model, our_batch(musicgen, texts, codes))
    grads = dict(tree_flatten(grads))

    reference = tiny.reference
    reference.config.decoder.decoder_start_token_id = 2048
    params, hooks = {}, []
    for name in {n.rsplit(".", 1)[0] for n in adapters}:
        a = torch.tensor(np.array(adapters[f"{name}.lora_a"]), requires_grad=True)
        b = torch.tensor(np.array(adapters[f"{name}.lora_b"]), requires_grad=True)
        params[name] = (a, b)
        hf_name = name.removesuffix(".linear").replace("decoder.layers.", "decoder.model.decoder.layers.")
        module = reference.get_submodule(hf_name)
        hooks.append(module.register_forward_hook(
            lambda mod, args, out, a=a, b=b: out + config.scale * (args[0] @ a.T) @ b.T))
    try:
        with torch.enable_grad():
            inputs = tiny.processor(text=texts, padding=True, return_tensors="pt")
            expected = reference(**inputs, labels=reference_labels(reference, codes)).loss
            expected.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert abs(loss.item() - expected.item()) / expected.item() < LOSS_RTOL
    assert len(params) == 2 * 4 * 2 + 2 * 2 + 4 + 1  # per layer: 2 attentions x 4, fc1, fc2; heads; projection
    for name, (a, b) in params.items():
        for suffix, tensor in (("lora_a", a), ("lora_b", b)):
            ours, theirs = np.array(grads[f"{name}.{suffix}"]), tensor.grad.numpy()
            error = np.abs(ours - theirs).max() / np.abs(theirs).max()
            assert error < GRAD_RTOL, (name, suffix, error)


@pytest.mark.parametrize("form", ["numpy", "compiled"])
def test_full_fine_tune_gradients_match_torch_autograd(tiny, form):
    """A full fine-tune (the decoder and its text projection train): the gradient of every weight, ours in numpy
    (cpu.numpy_training, what the trainer takes on a CPU) and as MLX's compiled function (elsewhere), against
    autograd's through transformers' model, weight by weight under the converter's names."""
    if form == "numpy":
        pytest.importorskip("numba")
    musicgen = portable(tiny.folder)
    model = musicgen.model
    lora.unfreeze_for_full(model)
    texts, codes = ["80s pop track with bassy drums and synth", "jazz"], clips(4)
    loss_and_grad = numpy_training.loss_and_grad(model) if form == "numpy" else training.compiled_loss_and_grad(model)
    assert loss_and_grad is not None, numpy_training.unsupported(model)
    loss, grads = loss_and_grad(model, our_batch(musicgen, texts, codes))
    grads = dict(tree_flatten(grads))

    reference = tiny.reference
    reference.config.decoder.decoder_start_token_id = 2048
    reference.zero_grad(set_to_none=True)
    try:
        with torch.enable_grad():
            inputs = tiny.processor(text=texts, padding=True, return_tensors="pt")
            expected = reference(**inputs, labels=reference_labels(reference, codes)).loss
            expected.backward()
        theirs = {name: p.grad.numpy().copy() for name, p in reference.named_parameters()
                  if not name.startswith(("text_encoder.", "audio_encoder."))}
    finally:
        reference.zero_grad(set_to_none=True)
    assert abs(loss.item() - expected.item()) / expected.item() < LOSS_RTOL
    hf_names = {name: re.sub(r"^decoder\.(embed_tokens|layers|layer_norm)", r"decoder.model.decoder.\1", name)
                for name in grads}
    assert sorted(hf_names.values()) == sorted(theirs)  # every weight that trains, and nothing else
    for name, hf_name in hf_names.items():
        error = np.abs(np.array(grads[name]) - theirs[hf_name]).max() / np.abs(theirs[hf_name]).max()
        assert error < GRAD_RTOL, (name, error)


def lora_with_b_drawn(model, rank: int = 4, seed: int = 3, **settings) -> None:
    """Adapters on every target, B drawn non-zero (both matrices then get gradients)."""
    mx.random.seed(0)
    lora.apply_lora(model, lora.AdapterConfig(rank=rank, alpha=8.0, **settings))
    rng = np.random.default_rng(seed)
    model.load_weights([(name, mx.array(rng.normal(0, 0.02, value.shape).astype(np.float32)))
                        for name, value in lora.adapter_weights(model).items() if name.endswith("lora_b")],
                       strict=False)


@pytest.mark.parametrize("variant", ["stereo", "unconditioned", "text padding attended", "relu, scaled embeddings",
                                     "no text projection", "checkpoint", "causal blocks", "some targets", "full",
                                     "full, relu, scaled embeddings, checkpoint", "some targets, norms, a bias"])
def test_numpy_gradients_are_the_portable_models(tiny, tiny_stereo, variant, monkeypatch):
    """cpu.numpy_training against nn.value_and_grad of the portable model (itself against torch autograd above) on
    what the test above does not reach: stereo's 8 codebooks, condition dropout (a row with its text masked
    whole), audiocraft's attention to the text's padding, ReLU and scaled embeddings, T5 states at the decoder's
    width, the layers' forward passes run again in the backward pass (grad_checkpoint), causal attention in
    blocks of queries (4 here: the clips are shorter than a block of 128), LoRA on some layers only, a full
    fine-tune (every weight of the decoder and its text projection, with a row unconditioned), and LoRA with some
    norms and the text projection's bias alone trained too."""
    pytest.importorskip("numba")
    if variant == "causal blocks":
        monkeypatch.setattr(numpy_training, "BLOCK", 4)
        assert numpy_training.attention_blocks(13, 13, True) == [(0, 4, 4), (4, 8, 8), (8, 12, 12), (12, 13, 13)]
    musicgen = portable((tiny_stereo if variant == "stereo" else tiny).folder)
    model = musicgen.model
    if variant.startswith("full"):
        lora.unfreeze_for_full(model)
    else:
        lora_with_b_drawn(model, **({"targets": ["q_proj", "fc2"]} if variant.startswith("some targets") else {}))
    if variant == "some targets, norms, a bias":  # the first norm: the first layer's input gradient is needed
        model.decoder.layers[0].self_attn_layer_norm.unfreeze()
        model.decoder.layers[1].final_layer_norm.unfreeze(keys=["bias"])
        model.enc_to_dec_proj.unfreeze(keys=["bias"])
    batch = our_batch(musicgen, ["80s pop track with bassy drums and synth", "jazz"],
                      clips(model.config.decoder.num_codebooks))
    if variant in ("unconditioned", "full"):
        batch.unconditioned = mx.array([0, 1])
    elif variant == "text padding attended":
        model.config.attend_text_padding = True
    if "relu, scaled embeddings" in variant:
        model.decoder.config.activation_function = "relu"
        for layer in model.decoder.layers:
            layer.activation = nn.relu
        model.decoder.embed_scale = 1.5
    elif variant == "no text projection":
        model.config.project_text = False
        del model["enc_to_dec_proj"]  # (models whose T5 is as wide as the decoder have none)
        batch.text_states = mx.array(np.random.default_rng(4).normal(size=batch.text_states.shape[:2] + (
            model.config.decoder.hidden_size,)).astype(np.float32))
    numpy_form = numpy_training.loss_and_grad(model, checkpoint=variant.endswith("checkpoint"))
    assert numpy_form is not None, numpy_training.unsupported(model)
    loss, grads = numpy_form(model, batch)
    expected_loss, expected = nn.value_and_grad(model, training.loss)(model, batch)
    assert abs(loss.item() - expected_loss.item()) / expected_loss.item() < LOSS_RTOL
    expected = dict(tree_flatten(expected))
    assert dict(tree_flatten(grads)).keys() == expected.keys()
    for name, value in tree_flatten(grads):
        theirs = np.array(expected[name])
        assert np.abs(np.array(value) - theirs).max() / np.abs(theirs).max() < GRAD_RTOL, name
    # every kernel was compiled once, before the step (training_kernels.compile_all), for what the step gives it
    assert [len(kernel.signatures) for kernel in numpy_training.training_kernels().KERNELS] == [1] * 7


def test_the_trainer_takes_numpy_where_it_computes_the_same(tiny, tiny_melody, tmp_path, monkeypatch):
    """On a CPU with numba the trainer computes plain LoRA and full fine-tunes in numpy; what numpy_training does
    not compute (LoRA dropout, adapted embeddings, half precision, a quantized decoder, another activation, melody
    models) trains on MLX, as before, and so does everything where numba's kernels do not load."""
    def half(model):
        model.set_dtype(mx.float16)

    def quantized(model):
        nn.quantize(model.decoder, group_size=32, bits=8)

    def gelu_new(model):
        model.decoder.config.activation_function = "gelu_new"

    cases = [(tiny, lora.AdapterConfig(rank=4), None), (tiny, lora.AdapterConfig(full=True), None),
             (tiny, lora.AdapterConfig(rank=4, dropout=0.1), None),
             (tiny, lora.AdapterConfig(rank=4, targets=["fc1", "embed_tokens"]), None),
             (tiny, lora.AdapterConfig(rank=4), half), (tiny, lora.AdapterConfig(rank=4), quantized),
             (tiny, lora.AdapterConfig(rank=4), gelu_new), (tiny_melody, lora.AdapterConfig(rank=4), None)]
    numba_loads = numpy_training.training_kernels() is not None
    on_cpu = mx.default_device() == mx.cpu and not cpu.portable_requested()
    taken = []
    for checkpoint, adapters, change in cases:
        model = portable(checkpoint.folder).model
        if change is not None:
            change(model)
        trainer = Trainer(model, [], [], tmp_path, TrainConfig(), adapters, "x")
        taken.append(isinstance(trainer.loss_and_grad, numpy_training.NumpyTraining))
        assert taken[-1] == (on_cpu and numba_loads and numpy_training.unsupported(model) is None)
    assert taken == [on_cpu and numba_loads] * 2 + [False] * 6
    if on_cpu:  # a LoRA the numpy form would take but for the user's choice: the trainer says why it is slower
        with pytest.warns(UserWarning, match=r"this fine-tune trains on MLX here \(LoRA dropout\)"):
            Trainer(portable(tiny.folder).model, [], [], tmp_path, TrainConfig(),
                             lora.AdapterConfig(rank=4, dropout=0.1), "x")
    monkeypatch.setattr(numpy_training, "training_kernels", lambda: None)
    trainer = Trainer(portable(tiny.folder).model, [], [], tmp_path, TrainConfig(),
                               lora.AdapterConfig(rank=4), "x")
    assert not isinstance(trainer.loss_and_grad, numpy_training.NumpyTraining)


def test_training_kernels_against_float64():
    """The kernels' edge cases against float64: the vectorised exp over float32's range (through a softmax of
    [z, 0]), a text's masked keys (weight exactly 0), a row whose keys are all masked (uniform, as MLX's finite
    mask gives), and the cross-entropy of the last code of the vocabulary."""
    kernels = pytest.importorskip("mlx_musicgen.cpu.training_kernels")
    z = -np.geomspace(1e-6, 87, 4001).astype(np.float32)
    scores = np.stack([z, np.zeros_like(z)], axis=1)[None, None]  # (1, 1, 4001, 2)
    kernels.softmax(scores, 1.0, numpy_training.NO_MASK, False)
    expected = 1 / (1 + np.exp(-z.astype(np.float64)))  # the weight of z against 0
    np.testing.assert_allclose(scores[0, 0, :, 0], expected, rtol=3e-7)
    minimum = np.finfo(np.float32).min
    mask = np.array([[0, 0, minimum], [minimum] * 3], np.float32)
    scores = np.random.default_rng(0).normal(size=(2, 2, 3, 3)).astype(np.float32)
    weights = scores.copy()
    kernels.softmax(weights, 0.5, mask, False)
    assert (weights[0, :, :, 2] == 0).all()
    np.testing.assert_array_equal(weights[1], np.full((2, 3, 3), 1 / 3, np.float32))
    seen = np.exp(0.5 * scores[0, :, :, :2].astype(np.float64))
    np.testing.assert_allclose(weights[0, :, :, :2], seen / seen.sum(-1, keepdims=True), rtol=1e-6)
    logits = np.random.default_rng(1).normal(size=(3, 2048)).astype(np.float32) * 4
    labels, row_weights = np.array([2047, 0, 5]), np.array([0.5, 1.0, 0.0], np.float32)
    losses, grad = np.empty(3, np.float32), logits.copy()
    kernels.cross_entropy(grad, labels, row_weights, losses)
    log_softmax = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    np.testing.assert_allclose(losses, -row_weights * log_softmax[np.arange(3), labels], rtol=1e-5)
    expected = np.exp(log_softmax) - np.eye(2048)[labels]
    np.testing.assert_allclose(grad, row_weights[:, None] * expected, atol=1e-7)


@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_numpy_training_trains_as_mlx_does(studio_data, tmp_path, full):
    """Three optimizer steps of the trainer over micro-batches (grad_accum 2, condition dropout) and a validation,
    the numpy form against MLX's (compiled_loss_and_grad, training.loss), LoRA and a full fine-tune: the same
    losses, and the same trained weights after AdamW and clipping (to 1e-4 of the learning rate; for the full
    fine-tune all but 1 in 10,000 weights, and those to 1e-2: AdamW divides each gradient by its own size, so a
    weight whose gradient is near 0 moves by a rounding's worth differently)."""
    pytest.importorskip("numba")
    musicgen = portable(studio_data / "model")
    examples = load_examples(musicgen, studio_data / "data")
    config = TrainConfig(iters=3, batch_size=2, grad_accum=2, learning_rate=1e-3, cond_dropout=0.5)
    adapters = lora.AdapterConfig(full=True) if full else lora.AdapterConfig(rank=4)
    results = []
    for form in ("numpy", "mlx"):
        model = portable(studio_data / "model").model
        mx.random.seed(0)  # the same A drawn for both
        trainer = Trainer(model, examples, examples[:2], tmp_path / form, config, adapters, "x")
        if form == "mlx":
            trainer.loss_and_grad, trainer.loss_of = training.compiled_loss_and_grad(model), training.loss
        elif not isinstance(trainer.loss_and_grad, numpy_training.NumpyTraining):
            pytest.skip("the trainer computes a fine-tune in numpy on a CPU only")
        losses = [trainer.train_step()[0] for _ in range(config.iters)] + [trainer.validation_loss()]
        results.append((losses, {k: np.array(v) for k, v in lora.adapter_weights(model, full).items()}))
    (numpy_losses, numpy_adapters), (mlx_losses, mlx_adapters) = results
    np.testing.assert_allclose(numpy_losses, mlx_losses, rtol=LOSS_RTOL)
    # AdamW's steps, each up to the learning rate, agree to ~2e-5 of it for LoRA. A full fine-tune's 1.2 million
    # weights hold more whose gradient is near AdamW's eps, where a rounding moves the step most (measured: 11 of
    # them over 1e-4 of it, the largest 4e-4 to 5e-4, by the summation order): all within 1e-2 (a wrong gradient
    # moves a weight by ~0.45 of it), and all but 1 in 10,000 within 1e-4.
    lr = config.learning_rate
    for name, value in numpy_adapters.items():
        np.testing.assert_allclose(value, mlx_adapters[name], rtol=0, atol=(1e-2 if full else 1e-4) * lr,
                                   err_msg=name)
    if full:
        differences = np.concatenate([np.abs(value - mlx_adapters[name]).ravel()
                                      for name, value in numpy_adapters.items()])
        assert np.mean(differences > 1e-4 * lr) < 1e-4


def test_an_interrupted_trace_leaves_the_model_whole(tiny, monkeypatch):
    """Ctrl-C while the compiled loss and gradients are traced (the trainer then saves): the model's weights and
    the random state are real arrays again, the same as before; the next call traces and matches the uncompiled
    function."""
    musicgen = portable(tiny.folder, "cpu")
    model = musicgen.model
    lora.apply_lora(model, lora.AdapterConfig(rank=4, dropout=0.1))
    batch = our_batch(musicgen, ["jazz"], clips(4, lengths=(10,)))
    before = {name: np.array(value) for name, value in tree_flatten(model.parameters())}
    key = np.array(mx.random.state[0])
    loss_and_grad = training.compiled_loss_and_grad(model)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(training, "codebook_loss", interrupted)
        with pytest.raises(KeyboardInterrupt):
            loss_and_grad(model, batch)
    after = dict(tree_flatten(model.parameters()))
    assert after.keys() == before.keys()
    for name, value in after.items():
        np.testing.assert_array_equal(np.array(value), before[name])
    np.testing.assert_array_equal(np.array(mx.random.state[0]), key)
    mx.random.seed(5)
    loss, grads = loss_and_grad(model, batch)
    mx.random.seed(5)
    expected_loss, expected = nn.value_and_grad(model, training.loss)(model, batch)
    # the same dropout masks, drawn from the same key (other masks move the loss by far more); compiled kernels
    # may round differently from eager ones on another CPU
    assert loss.item() == pytest.approx(expected_loss.item(), rel=1e-6)
    for (_, ours), (_, theirs) in zip(tree_flatten(grads), tree_flatten(expected)):
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-7)


def test_dropout_and_grad_checkpoint_are_refused_together(tiny, tmp_path):
    musicgen = portable(tiny.folder)
    config = TrainConfig(grad_checkpoint=True)
    with pytest.raises(ValueError, match="LoRA dropout and --grad-checkpoint do not go together"):
        Trainer(musicgen.model, [], [], tmp_path, config, lora.AdapterConfig(rank=4, dropout=0.1), "x")


def test_cpu_training_forms_compute_the_same_functions():
    """cpu.training's exp, attention and GELU against float64 exp and MLX's own ops, values and gradients."""
    z = np.concatenate([-np.geomspace(1e-8, 100, 20001), [0.0, -np.inf]]).astype(np.float32)
    exact = np.exp(z.astype(np.float64))
    ours = np.array(cpu_training.exp_nonpositive(mx.array(z)))
    normal = exact > np.finfo(np.float32).tiny
    assert np.abs(ours[normal] / exact[normal] - 1).max() < 2e-7
    assert (ours[~normal] <= np.finfo(np.float32).tiny).all() and ours[-1] == 0 and ours[-2] == 1

    rng = np.random.default_rng(0)
    q, k, v = (mx.array(rng.normal(0, 1, (2, 3, n, 8)).astype(np.float32)) for n in (5, 7, 7))
    cotangent = mx.array(rng.normal(0, 1, (2, 3, 5, 8)).astype(np.float32))
    padding = mx.array(rng.random((2, 1, 1, 7)) < 0.7) | (mx.arange(7) == 0)
    for mask in ("causal", None, padding, mx.where(padding, 0.0, -1e9)):
        results = []
        for attend in (mx.fast.scaled_dot_product_attention, cpu_training.attention):
            def attended(q, k, v, attend=attend):
                return attend(q, k, v, scale=0.35, mask=mask)
            results.append([attended(q, k, v), *mx.vjp(attended, [q, k, v], [cotangent])[1]])
        for expected, got in zip(*results):
            np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-5, atol=1e-6)

    x = mx.array(np.linspace(-9, 9, 4001, dtype=np.float32))
    np.testing.assert_allclose(np.array(cpu_training.gelu(x)), np.array(nn.gelu(x)), rtol=0, atol=1e-6)
    np.testing.assert_allclose(np.array(mx.grad(lambda x: cpu_training.gelu(x).sum())(x)),
                               np.array(mx.grad(lambda x: nn.gelu(x).sum())(x)), rtol=0, atol=2e-6)
    for dtype in (mx.float16, mx.bfloat16):  # a half-precision model: computed in float32, rounded once
        half = x.astype(dtype)
        exact = nn.gelu(half.astype(mx.float32))
        ours, grad = cpu_training.gelu(half), mx.grad(lambda x: cpu_training.gelu(x).sum())(half)
        assert ours.dtype == grad.dtype == dtype
        np.testing.assert_allclose(np.array(ours.astype(mx.float32)), np.array(exact.astype(dtype).astype(mx.float32)),
                                   rtol=1e-2, atol=1e-3)
        exact_grad = mx.grad(lambda x: nn.gelu(x).sum())(half.astype(mx.float32))
        np.testing.assert_allclose(np.array(grad.astype(mx.float32)), np.array(exact_grad), rtol=1e-2, atol=1e-3)


def test_fused_adamw_is_mlx_adamw():
    """trainer.FusedAdamW: mlx.optimizers.AdamW's weights and state, step for step, with a schedule and decay."""
    import mlx.optimizers as optim

    rng = np.random.default_rng(0)
    params = {"w": mx.array(rng.normal(0, 1, (7, 5)).astype(np.float32)), "b": [mx.array(np.ones(3, np.float32))]}
    schedule = optim.linear_schedule(1e-2, 1e-3, 5)
    ours, theirs = (kind(learning_rate=schedule, betas=[0.9, 0.95], weight_decay=0.1)
                    for kind in (FusedAdamW, optim.AdamW))
    ours_params, theirs_params = params, params
    for _ in range(4):
        grads = {"w": mx.array(rng.normal(0, 1, (7, 5)).astype(np.float32)),
                 "b": [mx.array(rng.normal(0, 1, 3).astype(np.float32))]}
        ours_params = ours.apply_gradients(grads, ours_params)
        theirs_params = theirs.apply_gradients(grads, theirs_params)
    for (name, a), (_, b) in zip(tree_flatten([ours_params, ours.state]), tree_flatten([theirs_params, theirs.state])):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_clip_and_update_is_clipping_then_adamw(bias_correction, dtype):
    """FusedAdamW.clip_and_update (the trainer's step: the mean of 2 micro-batches, clipped inside AdamW's pass)
    against optim.clip_grad_norm of the mean, then mlx's AdamW: steps clipped and steps not (norms around 2.5),
    in float32 and float16 (whose squares of gradients under ~2e-4 are 0: the last step's norm needs float32's
    sum to be clipped at all). Every weight and state stays finite: in float16 AdamW's eps is 1e-3, as 1e-8 is 0
    there and the last step's v underflows to 0 too."""
    import mlx.optimizers as optim

    rng = np.random.default_rng(1)
    model = nn.Linear(50, 70)
    model.set_dtype(dtype)
    theirs_model = nn.Linear(50, 70)
    theirs_model.update(model.parameters())
    eps = 1e-8 if dtype == mx.float32 else 1e-3
    ours, theirs = (kind(learning_rate=1e-2, betas=[0.9, 0.95], weight_decay=0.1, eps=eps,
                         bias_correction=bias_correction) for kind in (FusedAdamW, optim.AdamW))
    clipped = []
    for size, max_norm in ((0.05, 2.5), (0.12, 2.5), (0.03, 2.5), (0.2, 2.5), (1e-4, 1e-3)):  # norms: size * 30
        grads = {"weight": mx.array(rng.normal(0, size, (70, 50))).astype(dtype),
                 "bias": mx.array(rng.normal(0, size, 70)).astype(dtype)}
        ours.clip_and_update(model, grads, max_norm=max_norm, divisor=2)
        mean, norm = optim.clip_grad_norm({k: g / 2 for k, g in grads.items()}, max_norm)
        theirs.update(theirs_model, mean)
        clipped.append(norm.item() > max_norm)
        mx.eval(model.parameters(), theirs_model.parameters(), ours.state, theirs.state)
        assert ours.gradient_scale is None  # the next plain update is not scaled
    assert clipped == [False, True, False, True, True]
    tolerance = {"rtol": 1e-6, "atol": 1e-7} if dtype == mx.float32 else {"rtol": 2e-3, "atol": 1e-6}
    for (name, a), (_, b) in zip(tree_flatten([model.parameters(), ours.state]),
                                 tree_flatten([theirs_model.parameters(), theirs.state])):
        assert a.dtype == b.dtype, name
        ours_value, theirs_value = np.array(a.astype(mx.float32)), np.array(b.astype(mx.float32))
        assert np.isfinite(ours_value).all() and np.isfinite(theirs_value).all(), name
        np.testing.assert_allclose(ours_value, theirs_value, err_msg=name, **tolerance)
    with pytest.raises(ValueError, match="largest norm must be above 0"):
        ours.clip_and_update(model, grads, max_norm=-1.0)
    with pytest.raises(ValueError, match="max_grad_norm"):
        TrainConfig(max_grad_norm=0.0).check()


# ---- training end to end (a codec at 50 frames/s, as the Hub's: 1 s is 50 frames)


@pytest.fixture(scope="module")
def studio_data(tmp_path_factory):
    """A tiny 50 Hz model and three 1.2 s clips with distinct captions (.txt beside each)."""
    root = tmp_path_factory.mktemp("finetune")
    fixtures.build_checkpoint(root / "model", fixtures.Shape(upsampling_ratios=(8, 5, 4, 4),
                                                             max_position_embeddings=2048))
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(CAPTIONS):
        t = np.arange(int(1.2 * 32000)) / 32000
        clip = 0.3 * np.sin(2 * np.pi * (200 + 150 * i) * t) + 0.05 * rng.standard_normal(t.size)
        sf.write(data / f"clip{i}.wav", clip.astype(np.float32), 32000)
        (data / f"clip{i}.txt").write_text(caption)
    return root


def finetune(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args), "--quiet"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)


@pytest.fixture(scope="module")
def trained(studio_data):
    out = studio_data / "adapters"
    result = finetune("--model", studio_data / "model", "--data", studio_data / "data", "--adapter-path", out,
                      "--iters", 150, "--learning-rate", 1e-2, "--lora-rank", 8, "--batch-size", 3,
                      "--val-fraction", 0, "--log-every", 10)
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.skipif(_linux.LOADED != _linux.MKL, reason="MLX runs on MKL only where MKL is loaded")
def test_finetune_py_trains_on_openblas_where_mkl_runs_its_generic_code(studio_data, tmp_path):
    """Where MKL has no optimised code for the CPU (not Intel's) and OpenBLAS is installed, finetune.py runs itself
    again with OpenBLAS as MLX's BLAS (MKL's verbose mode then reports no product); elsewhere MKL trains."""
    args = ["--model", studio_data / "model", "--data", studio_data / "data", "--adapter-path", tmp_path / "adapters",
            "--iters", 1, "--val-fraction", 0, "--quiet",
            "--lora-dropout", 0.1]  # (LoRA without dropout trains in numpy, on numpy's own BLAS)
    result = subprocess.run([sys.executable, str(ROOT / "finetune.py"), *map(str, args)], capture_output=True,
                            text=True, cwd=ROOT, timeout=600, env={**os.environ, "MKL_VERBOSE": "1"})
    assert result.returncode == 0, result.stderr
    restarted = "running again with OpenBLAS" in result.stderr
    assert restarted == _linux.openblas_trains_faster()
    assert ("SGEMM" in result.stdout) != restarted  # MKL's products before, none after (and MKL is not loaded)
    assert lora.holds_adapters(tmp_path / "adapters")


def test_the_loss_falls_and_the_clips_are_memorised(studio_data, trained):
    metrics = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(10, 151, 10))
    assert metrics[0]["train_loss"] > 3 and metrics[-1]["train_loss"] < 0.05 * metrics[0]["train_loss"]
    assert (trained / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((trained / "mlx_adapter.json").read_text())
    assert (config["rank"], config["alpha"], config["step"], config["model"]) == (8, 16.0, 150,
                                                                                str(studio_data / "model"))
    model = MusicGen.from_pretrained(studio_data / "model", adapter=trained)
    base = MusicGen.from_pretrained(studio_data / "model")
    for example in load_examples(model, studio_data / "data", log=lambda m: None):
        for guidance in (1.0, 3.0):
            codes = model.generate_tokens([example.text], total_frames=60, do_sample=False, guidance_scale=guidance)
            np.testing.assert_array_equal(codes[0], example.codes)
        before = base.generate_tokens([example.text], total_frames=60, do_sample=False)
        assert (before[0] == example.codes).mean() < 0.1


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU forms are the CPU's")
def test_the_cpu_forms_encode_the_data_as_the_portable_ones(studio_data):
    fast, reference = portable(studio_data / "model"), portable(studio_data / "model")
    fast.use_cpu_forms_for_encoding()  # as finetune.py does
    assert isinstance(fast.t5, NumpyT5) and reference.t5 is reference.text_encoder
    assert fast.audio_encoder.encoder is not reference.audio_encoder.encoder
    samples, rate = audio.read_audio(studio_data / "data" / "clip1.wav", "clip")
    (codes, _, dropped), (expected, _, expected_dropped) = (encode_clip(m, samples, rate) for m in (fast, reference))
    assert dropped == expected_dropped and len(codes) == len(expected) > 0
    for window, expected_window in zip(codes, expected):
        np.testing.assert_array_equal(window, expected_window)
    for text in (CAPTIONS[0], ""):
        (states, mask), (expected_states, expected_mask) = (text_states(m, text) for m in (fast, reference))
        np.testing.assert_array_equal(mask, expected_mask)
        np.testing.assert_allclose(states, expected_states, rtol=0, atol=1e-5)


def test_fused_adapters_give_the_adapted_logits(studio_data, trained, tmp_path):
    result = finetune("--fuse", "--adapter-path", trained, "--mlx-path", tmp_path / "fused")
    assert result.returncode == 0, result.stderr
    adapted = portable(studio_data / "model")  # the adapters on, as trained
    lora.load_adapters(adapted.model, trained)
    codes = clips(4, (20, 14), seed=5)
    expected = np.array(training.forward(adapted.model, our_batch(adapted, CAPTIONS[:2], codes)))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_MUSICGEN_PORTABLE", "1")
        merged = MusicGen.from_pretrained(studio_data / "model", adapter=trained)  # merged at load
    for model in (portable(tmp_path / "fused"), merged):
        logits = np.array(training.forward(model.model, our_batch(model, CAPTIONS[:2], codes)))
        assert np.abs(logits - expected).max() / np.abs(expected).max() < 1e-5


def test_a_resumed_run_continues_the_same_curve(studio_data, tmp_path):
    """Six steps straight, against three steps stopped by Ctrl-C (which saves a checkpoint) and --resume: the
    same losses, validation losses included (LoRA dropout on: its draws follow the step too)."""
    from mlx_musicgen.dataset import split

    common = ("--model", studio_data / "model", "--data", studio_data / "data", "--learning-rate", 1e-3,
              "--lora-rank", 4, "--lora-dropout", 0.1, "--log-every", 1, "--val-every", 2, "--val-fraction", 0.34,
              "--iters", 6)
    straight = finetune(*common, "--adapter-path", tmp_path / "straight")
    assert straight.returncode == 0, straight.stderr

    out = tmp_path / "stopped"
    out.mkdir()
    musicgen = portable(studio_data / "model")
    mx.random.seed(0)
    train, val = split(load_examples(musicgen, studio_data / "data", log=lambda m: None), 0.34, 0)
    config = TrainConfig(iters=6, learning_rate=1e-3, log_every=1, val_every=2, val_fraction=0.34)
    trainer = Trainer(musicgen.model, train, val, out, config, lora.AdapterConfig(rank=4, dropout=0.1),
                      str(studio_data / "model"))

    def ctrl_c_after_step_3(step, entry):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer.run(ctrl_c_after_step_3, log=lambda m: None)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 3
    resumed = finetune(*common, "--adapter-path", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr

    def curve(folder):
        return [(m["step"], m["train_loss"], m.get("val_loss")) for m in
                map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())]

    a, b = curve(tmp_path / "straight"), curve(out)
    assert [s for s, _, _ in a] == [s for s, _, _ in b] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([loss for _, loss, _ in b], [loss for _, loss, _ in a], rtol=1e-5)
    assert [v is None for *_, v in a] == [v is None for *_, v in b] == [True, False] * 3
    np.testing.assert_allclose([v for *_, v in b if v is not None], [v for *_, v in a if v is not None],
                               rtol=1e-5)


def test_resume_trains_adapters_made_elsewhere(studio_data, trained, tmp_path):
    """--resume with adapters but no checkpoint (PEFT's two files, as another tool leaves them) trains them in
    place; --resume ADAPTER trains them into another --adapter-path, and a checkpoint of that run resumes on the
    same curve; an empty folder is refused in one line."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(trained / name, elsewhere / name)
    common = ("--model", studio_data / "model", "--data", studio_data / "data", "--learning-rate", 1e-3,
              "--log-every", 1, "--val-fraction", 0)

    def steps(folder):
        return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    def losses(folder):
        return [json.loads(line)["train_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]

    in_place = finetune(*common, "--adapter-path", elsewhere, "--resume", "--iters", 1)
    assert in_place.returncode == 0, in_place.stderr
    assert steps(elsewhere) == [1] and losses(elsewhere)[0] < 0.5  # from the trained weights, not new ones
    assert json.loads((elsewhere / "mlx_adapter.json").read_text())["started_from"] == str(elsewhere)

    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    result = finetune(*common, "--adapter-path", straight, "--resume", trained, "--iters", 3)
    assert result.returncode == 0, result.stderr
    result = finetune(*common, "--adapter-path", stopped, "--resume", trained, "--iters", 2, "--save-every", 1)
    assert result.returncode == 0, result.stderr
    result = finetune(*common, "--adapter-path", stopped, "--resume", "--iters", 3)  # its checkpoint, at step 2
    assert result.returncode == 0, result.stderr
    assert steps(straight) == steps(stopped) == [1, 2, 3]
    assert json.loads((stopped / "mlx_adapter.json").read_text())["started_from"] == str(trained)  # kept
    one_line_error(finetune(*common, "--adapter-path", stopped, "--resume", trained, "--iters", 1),
                   r"stopped holds a checkpoint: --resume \(without ADAPTER\) continues it")
    np.testing.assert_allclose(losses(stopped)[:2], losses(straight)[:2], rtol=1e-5)  # step 3's rate differs
    assert json.loads((trained / "adapter_config.json").read_text())["r"] == 8  # the source is left as it was

    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(finetune(*common, "--adapter-path", empty, "--resume", "--iters", 1),
                   r"empty holds no checkpoint and no adapters to resume: train without --resume first")


def test_full_fine_tuning(studio_data, tmp_path):
    out = tmp_path / "full"
    result = finetune("--model", studio_data / "model", "--data", studio_data / "data", "--adapter-path", out,
                      "--iters", 4, "--full", "--val-fraction", 0, "--log-every", 1, "--grad-checkpoint")
    assert result.returncode == 0, result.stderr
    weights = mx.load(str(out / "adapters.safetensors"))
    assert all(k.startswith(("decoder.", "enc_to_dec_proj.")) for k in weights) and "decoder.layer_norm.weight" in weights
    model = MusicGen.from_pretrained(studio_data / "model", adapter=out)
    assert np.array_equal(np.array(model.decoder.layer_norm.weight), np.array(weights["decoder.layer_norm.weight"]))
    losses = [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0]


def test_a_melody_model_fine_tunes(tiny_melody, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    t = np.arange(40000) / 32000
    sf.write(data / "a.flac", (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 32000)
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "a.flac", "text": "calm"}) + "\n")
    result = finetune("--model", tiny_melody.folder, "--data", data, "--adapter-path", tmp_path / "out",
                      "--iters", 3, "--val-fraction", 0, "--log-every", 1)
    assert result.returncode == 0, result.stderr
    model = MusicGen.from_pretrained(tiny_melody.folder, adapter=tmp_path / "out")
    assert model.generate(["calm"], melody=t.astype(np.float32), max_new_tokens=5).shape[0] == 1


def one_line_error(result, pattern: str) -> None:
    import re

    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, lines[-1]), lines[-1]


def test_bad_data_is_refused_in_one_line(studio_data, tmp_path):
    model = studio_data / "model"

    def run(data: Path, *extra):
        out = tmp_path / f"out-{data.name}"
        result = finetune("--model", model, "--data", data, "--adapter-path", out, "--iters", 2, *extra)
        return result, out

    empty = tmp_path / "empty"
    empty.mkdir()
    result, out = run(empty)
    one_line_error(result, r"empty holds no audio files")
    assert not (out / "adapters.safetensors").exists()

    uncaptioned = tmp_path / "uncaptioned"
    uncaptioned.mkdir()
    shutil.copy(studio_data / "data" / "clip0.wav", uncaptioned / "clip0.wav")
    result, out = run(uncaptioned)
    one_line_error(result, r"clip0.wav has no caption: add clip0.txt, a metadata.jsonl line for it, or give --caption")
    assert not out.exists() or not any(out.iterdir())

    short = tmp_path / "short"
    short.mkdir()
    sf.write(short / "blip.wav", (0.3 * np.sin(np.arange(16000) / 5)).astype(np.float32), 32000)  # 0.5 s
    (short / "notes.wav").write_text("not audio")
    result, out = run(short, "--caption", "blip")
    one_line_error(result, r"no clip in .*short is 1 s or longer \(and readable\): nothing to train on")
    assert "skipped: 1 unreadable file(s), 1 window(s) under 1 s" in result.stderr

    (tmp_path / "out-data").mkdir()
    (tmp_path / "out-data" / "metrics.jsonl").write_text('{"step": 99}\n')  # a killed run's, before any save
    result, out = run(studio_data / "data", "--iters", "1", "--log-every", "1", "--val-fraction", "0")
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    result, _ = run(studio_data / "data", "--lora-targets", "q_proj,attention")
    one_line_error(result, r"LoRA targets must be some of q_proj, .*got q_proj, attention")
    result, _ = run(studio_data / "data", "--lora-rank", "0")
    one_line_error(result, r"the LoRA rank must be a whole number from 1 to 4096, got 0")
    result = finetune("--fuse", "--adapter-path", tmp_path / "nothing", "--mlx-path", tmp_path / "fused")
    one_line_error(result, r"nothing holds no adapters \(adapter_config.json and adapters.safetensors\)")
    assert not (tmp_path / "fused").exists()
    made = subprocess.run([sys.executable, str(ROOT / "generate.py"), "--model", str(model), "--adapter",
                           str(tmp_path / "nothing"), "--output", str(tmp_path / "x.wav")], capture_output=True,
                          text=True, cwd=ROOT)
    one_line_error(made, r"nothing holds no adapters")
    assert not (tmp_path / "x.wav").exists()


def test_the_studio_serves_an_adapted_model(studio_data, trained, tmp_path):
    from studio import Studio

    server = Studio(studio_data / "model", tmp_path / "takes", "--adapter", str(trained))
    try:
        response = server.client.post("/api/jobs", json={"text": CAPTIONS[1], "duration": 1.2, "temperature": 0})
        job = server.wait(response.json()["id"])
        record = server.client.get(f"/api/takes/{job['take']}").json()
        assert record["adapter"] == str(trained)
        take = sf.read(server.output / f"{job['take']}.wav", dtype="float32", always_2d=True)[0].T
    finally:
        server.stop()
    model = MusicGen.from_pretrained(studio_data / "model", adapter=trained)
    expected = model.generate([CAPTIONS[1]], duration=1.2, temperature=0, seed=record["seed"])
    np.testing.assert_allclose(take, expected[0], rtol=0, atol=1e-6)
