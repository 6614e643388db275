"""The MLX T5 encoder, and its numpy form (the CPU's, cpu.numpy_t5), against transformers' T5EncoderModel, on
random weights."""

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from transformers.models.t5.modeling_t5 import T5Attention as ReferenceAttention

import fixtures
from mlx_musicgen import MusicGen, cpu
from mlx_musicgen.cpu.numpy_t5 import NumpyT5
from mlx_musicgen.t5 import T5Config, T5Encoder, relative_position_bucket

torch.set_num_threads(2)

TEXTS = ["80s pop track with bassy drums and synth", "jazz trumpet"]  # different lengths: the second is padded
ATOL = 1e-4


def load_encoder(config: dict, weights: dict[str, mx.array]) -> T5Encoder:
    encoder = T5Encoder(T5Config.from_dict(config))
    encoder.load_weights(list(T5Encoder.sanitize(weights).items()), strict=True)
    return encoder


def mlx_weights(module: torch.nn.Module) -> dict[str, mx.array]:
    # state_dict keeps the tied `encoder.embed_tokens.weight`, so sanitize's handling of it is exercised too.
    return {k: mx.array(v.numpy()) for k, v in module.state_dict().items()}


def reference(encoder: torch.nn.Module, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        out = encoder(input_ids=torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    return out.last_hidden_state.numpy()


FORMS = {"mlx": lambda encoder: encoder, "numpy": NumpyT5}


@pytest.fixture(params=list(FORMS))
def form(request):
    """T5Encoder itself, or its numpy form on views of its weights."""
    return FORMS[request.param]


def ours(encoder, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
    out = encoder(mx.array(input_ids), mx.array(attention_mask))
    assert out.dtype == mx.float32
    return np.array(out)


def random_batch(vocab_size: int, length: int, real_lengths: list[int], seed: int = 0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(3, vocab_size, size=(len(real_lengths), length))
    attention_mask = (np.arange(length)[None, :] < np.array(real_lengths)[:, None]).astype(np.int64)
    return input_ids * attention_mask, attention_mask  # padded with 0, as the tokenizer does


def assert_close(actual: np.ndarray, expected: np.ndarray, attention_mask: np.ndarray, atol: float = ATOL):
    real = attention_mask.astype(bool)
    np.testing.assert_allclose(actual[real], expected[real], rtol=0, atol=atol)
    # The mask hides padded keys only, so padded positions have well-defined outputs in the reference too.
    np.testing.assert_allclose(actual, expected, rtol=0, atol=atol)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("t5_checkpoint")
    model, processor = fixtures.build_checkpoint(folder, fixtures.Shape())
    return folder, model, processor


@pytest.fixture(scope="module")
def tokens(checkpoint):
    _, _, processor = checkpoint
    batch = processor.tokenizer(TEXTS, padding=True, return_tensors="np")
    assert batch["attention_mask"].min() == 0, "the batch should contain padding"
    return batch["input_ids"].astype(np.int64), batch["attention_mask"].astype(np.int64)


@pytest.fixture(scope="module")
def checkpoint_weights(checkpoint) -> tuple[dict, dict[str, mx.array]]:
    folder, _, _ = checkpoint
    config = json.loads((folder / "config.json").read_text())["text_encoder"]
    prefix = "text_encoder."
    tensors = mx.load(str(folder / "model.safetensors"))
    return config, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


@pytest.mark.parametrize("num_buckets,max_distance", [(32, 128), (64, 256), (16, 20)])
def test_relative_position_bucket(num_buckets, max_distance):
    relative_position = np.arange(-600, 601)
    expected = ReferenceAttention._relative_position_bucket(
        torch.from_numpy(relative_position), bidirectional=True, num_buckets=num_buckets, max_distance=max_distance
    )
    actual = relative_position_bucket(mx.array(relative_position), num_buckets, max_distance)
    np.testing.assert_array_equal(np.array(actual), expected.numpy())


def test_checkpoint_matches_reference(checkpoint, checkpoint_weights, tokens, form):
    _, model, _ = checkpoint
    encoder = form(load_encoder(*checkpoint_weights))
    assert_close(ours(encoder, *tokens), reference(model.text_encoder, *tokens), tokens[1])


def test_wider_model_matches_reference(form):
    shape = fixtures.Shape(text_hidden=64, text_heads=4, text_layers=3)
    text_encoder = fixtures.build_model(shape, seed=1).text_encoder
    encoder = form(load_encoder(text_encoder.config.to_dict(), mlx_weights(text_encoder)))
    # Longer than max_distance (128), so every bucket, exact, logarithmic and clipped, is used.
    input_ids, attention_mask = random_batch(shape.text_vocab, 160, [160, 97, 5])
    actual = ours(encoder, input_ids, attention_mask)
    assert_close(actual, reference(text_encoder, input_ids, attention_mask), attention_mask)
    # Without a mask every position is attended to, as with a mask of ones.
    full = np.ones_like(attention_mask)
    np.testing.assert_allclose(np.array(encoder(mx.array(input_ids))), ours(encoder, input_ids, full), atol=1e-6)


def test_gated_gelu_matches_reference(form):
    config = transformers.T5Config(
        vocab_size=100, d_model=40, d_kv=12, d_ff=72, num_layers=2, num_heads=5,
        relative_attention_num_buckets=16, relative_attention_max_distance=32, feed_forward_proj="gated-gelu",
    )
    torch.manual_seed(0)
    text_encoder = transformers.T5EncoderModel(config).eval()
    encoder = form(load_encoder(config.to_dict(), mlx_weights(text_encoder)))
    input_ids, attention_mask = random_batch(config.vocab_size, 48, [48, 20])
    assert_close(ours(encoder, input_ids, attention_mask), reference(text_encoder, input_ids, attention_mask),
                 attention_mask)


@pytest.mark.parametrize("dtype,atol", [(mx.float16, 5e-3), (mx.bfloat16, 5e-2)])
def test_half_precision_weights(checkpoint, checkpoint_weights, tokens, dtype, atol):
    _, model, _ = checkpoint
    config, weights = checkpoint_weights
    encoder = load_encoder(config, {k: v.astype(dtype) for k, v in weights.items()})
    # ours() checks the result is float32; the error is the weights' rounding, not the arithmetic's.
    assert_close(ours(encoder, *tokens), reference(model.text_encoder, *tokens), tokens[1], atol=atol)


def test_fully_masked_rows(checkpoint, checkpoint_weights, tokens, form):
    # Every key masked: scores all sit at the same large negative, giving a uniform softmax rather than NaN.
    _, model, _ = checkpoint
    input_ids, attention_mask = tokens
    masked = np.zeros_like(attention_mask)
    actual = ours(form(load_encoder(*checkpoint_weights)), input_ids, masked)
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, reference(model.text_encoder, input_ids, masked), rtol=0, atol=ATOL)


def test_numpy_form_follows_new_weights_and_leaves_half_precision_to_mlx(checkpoint, checkpoint_weights, tokens):
    _, model, _ = checkpoint
    config, weights = checkpoint_weights
    encoder = load_encoder(config, {k: v * 0.5 for k, v in weights.items()})
    numpy_form = cpu.text_encoder_for_cpu(encoder)
    assert isinstance(numpy_form, NumpyT5)
    halved = ours(numpy_form, *tokens)
    encoder.load_weights(list(T5Encoder.sanitize(weights).items()), strict=True)  # the checkpoint's, after
    assert_close(ours(numpy_form, *tokens), reference(model.text_encoder, *tokens), tokens[1])
    assert np.abs(halved - ours(numpy_form, *tokens)).max() > 1e-2
    encoder.set_dtype(mx.float16)  # T5's activations overflow half precision: the MLX encoder runs, in float32
    assert_close(ours(numpy_form, *tokens), reference(model.text_encoder, *tokens), tokens[1], atol=5e-3)
    assert numpy_form.held is None, "the old weights' views are dropped, not kept alive"
    assert cpu.text_encoder_for_cpu(encoder) is encoder
    with pytest.raises(ValueError, match="float32"):
        NumpyT5(encoder)
    encoder.set_dtype(mx.float32)  # views again
    assert_close(ours(numpy_form, *tokens), reference(model.text_encoder, *tokens), tokens[1], atol=5e-3)
    assert numpy_form.held is not None


@pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU forms are the CPU's")
def test_front_end_encodes_texts_in_numpy_on_a_cpu(checkpoint):
    folder, _, _ = checkpoint
    fast, portable = (MusicGen.from_pretrained(folder, portable=p) for p in (False, True))
    assert isinstance(fast.t5, NumpyT5) and portable.t5 is portable.model.text_encoder
    (states, mask), (expected, expected_mask) = fast.encode_text(TEXTS), portable.encode_text(TEXTS)
    np.testing.assert_array_equal(np.array(mask), np.array(expected_mask))
    np.testing.assert_allclose(np.array(states), np.array(expected), rtol=0, atol=1e-5)


def test_tied_embedding_copy():
    shared, tied = mx.zeros((2, 3)), mx.ones((2, 3))
    both = T5Encoder.sanitize({"shared.weight": shared, "encoder.embed_tokens.weight": tied})
    assert list(both) == ["embed_tokens.weight"] and both["embed_tokens.weight"] is shared
    only_tied = T5Encoder.sanitize({"encoder.embed_tokens.weight": tied})
    assert list(only_tied) == ["embed_tokens.weight"] and only_tied["embed_tokens.weight"] is tied


def test_unknown_key_fails_strict_loading(checkpoint_weights):
    config, weights = checkpoint_weights
    unknown = "encoder.block.0.layer.0.SelfAttention.unknown.weight"
    sanitized = T5Encoder.sanitize({**weights, unknown: mx.zeros((1,))})
    assert unknown in sanitized
    with pytest.raises(ValueError, match="unknown"):
        T5Encoder(T5Config.from_dict(config)).load_weights(list(sanitized.items()), strict=True)


def test_unsupported_feed_forward():
    with pytest.raises(ValueError, match="gated-silu"):
        T5Encoder(T5Config.from_dict({"feed_forward_proj": "gated-silu"}))
