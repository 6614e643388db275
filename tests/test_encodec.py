"""EnCodec parity with transformers' EncodecModel, on the tiny random MusicGen of the fixtures: every parity test runs
on the portable model and on its CPU form (optimize_encodec)."""

import dataclasses
import warnings

import fixtures
import mlx.core as mx
import numpy as np
import pytest
import torch
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from mlx_musicgen.cpu import encodec as cpu_encodec
from mlx_musicgen.cpu.encodec import NumpyLSTM, optimize_encodec
from mlx_musicgen.encodec import EncodecConfig, EncodecModel


@pytest.fixture(scope="module")
def reference():
    """transformers' EncodecModel of the tiny MusicGen, with random LSTM biases (they start at zero)."""
    torch.set_num_threads(2)
    model = fixtures.build_model(fixtures.Shape()).audio_encoder
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lstm.bias" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def state_dict(reference) -> dict[str, mx.array]:
    return {k: mx.array(v.numpy()) for k, v in reference.state_dict().items()}


def load(reference, variant: str) -> EncodecModel:
    """Our EncodecModel with the reference's weights; "cpu": then optimize_encodec'd."""
    model = EncodecModel(EncodecConfig.from_dict(reference.config.to_dict()))
    model.load_weights(list(EncodecModel.sanitize(state_dict(reference)).items()), strict=True)
    if variant == "cpu":
        optimize_encodec(model)
    return model


@pytest.fixture(scope="module", params=["portable", "cpu"])
def variant(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(reference, variant):
    return load(reference, variant)


def relative_error(actual, expected) -> float:
    return float(np.abs(np.asarray(actual) - expected).max() / np.abs(expected).max())


def random_audio(batch: int, samples: int) -> np.ndarray:
    return (np.random.default_rng(0).standard_normal((batch, 1, samples)) * 0.1).astype(np.float32)


def test_elu_matches_torch(model):
    """Within 3e-7 of torch's ELU, relative error 1e-6 near 0, -1 far out: nn.ELU, and the CPU's polynomial expm1."""
    elu = model.decoder.layers[2]
    tiny = np.geomspace(1e-30, 1e-2, 1001)
    xs = np.concatenate([np.linspace(-40, 8, 480_001), tiny, -tiny, [0.0, -1e4, -1e30]]).astype(np.float32)
    expected = torch.nn.functional.elu(torch.from_numpy(xs).double()).numpy()
    actual = np.array(elu(mx.array(xs)))
    np.testing.assert_allclose(actual, expected, atol=3e-7, rtol=1e-6)
    assert np.isnan(np.array(elu(mx.array([np.nan])))).all()


@pytest.mark.parametrize("scale", [8, 100])
@pytest.mark.parametrize("form", ["portable", "cpu"])
def test_lstm_matches_torch_with_saturated_gates(form, scale):
    """Large inputs drive the gates to 0 and 1 (at scale 100, exp(-z) overflows for some): nn.LSTM, and the
    CPU's, whose recurrence runs in numpy, from a given state. The truth is torch's LSTM in float64 (its float32
    sigmoid and tanh take a CPU's vector path, which differs between CPUs)."""
    torch.manual_seed(0)
    reference = torch.nn.LSTM(16, 16, batch_first=True)
    x = torch.randn(2, 30, 16) * scale
    h0, c0 = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    with torch.no_grad():
        expected, (h, c) = reference.double()(x.double(), (h0.double(), c0.double()))
        reference.float()
    weights = {name: mx.array(value.detach().numpy()) for name, value in reference.named_parameters()}
    layer = nn.LSTM(16, 16)
    layer.Wx, layer.Wh = weights["weight_ih_l0"], weights["weight_hh_l0"]
    layer.bias = weights["bias_ih_l0"] + weights["bias_hh_l0"]
    if form == "cpu":
        layer = NumpyLSTM(layer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow is expected, not reported
        hidden, cell = layer(mx.array(x.numpy()), mx.array(h0[0].numpy()), mx.array(c0[0].numpy()))
    # Measured: 6.3e-7 (both forms) at scale 8; at 100, 1.5e-6, the float32 input's own rounding (both forms).
    atol = 1e-6 if scale == 8 else 3e-6
    np.testing.assert_allclose(np.array(hidden), expected.numpy(), atol=atol)
    np.testing.assert_allclose(np.array(cell[:, -1]), c[0].numpy(), atol=atol)


def test_config_arithmetic_matches_reference(reference):
    config = EncodecConfig.from_dict(reference.config.to_dict())
    assert config.hop_length == reference.config.hop_length
    assert config.frame_rate == reference.config.frame_rate
    assert config.num_quantizers == reference.config.num_quantizers == 4


def test_decode_matches_reference(reference, model):
    # 120 frames: several chunks of the upsampling layers, so the seams are checked too.
    codes = np.random.default_rng(0).integers(0, 2048, (2, 4, 120))
    with torch.no_grad():
        expected = reference.decode(torch.from_numpy(codes)[None], [None])[0].numpy()
    audio = model.decode(mx.array(codes))
    assert audio.dtype == mx.float32
    assert audio.shape == expected.shape == (2, 1, 120 * 32)
    assert relative_error(audio, expected) < 1e-4


def test_encode_matches_reference(reference, model):
    audio = random_audio(2, 3001)  # not a multiple of the hop (32)
    with torch.no_grad():
        expected = reference.encode(torch.from_numpy(audio))[0][0].numpy()
    codes = model.encode(mx.array(audio))
    assert codes.dtype == mx.int32
    assert codes.shape == expected.shape == (2, 4, 94)
    np.testing.assert_array_equal(np.array(codes), expected)
    np.testing.assert_array_equal(np.array(model.encode(mx.array(audio), num_codebooks=2)), expected[:, :2])


def test_round_trip_matches_reference(reference, model):
    audio = random_audio(1, 2500)
    with torch.no_grad():
        codes = reference.encode(torch.from_numpy(audio))[0]
        expected = reference.decode(codes, [None])[0].numpy()
    assert relative_error(model.decode(model.encode(mx.array(audio))), expected) < 1e-4


def test_lstm_state_carries_across_calls(model):
    lstm = model.decoder.lstm
    x = mx.random.normal((2, 10, lstm.lstm[0].Wh.shape[1]))
    whole, _ = lstm(x)
    first, state = lstm(x[:, :4])
    second, _ = lstm(x[:, 4:], state)
    assert relative_error(mx.concatenate([first, second], axis=1), np.array(whole)) < 1e-6


def test_conv_shortcut_matches_reference(variant):
    from transformers import EncodecModel as ReferenceModel

    config = fixtures.musicgen_config(fixtures.Shape()).audio_encoder
    config.use_conv_shortcut = True
    torch.manual_seed(0)
    reference = ReferenceModel(config).eval()
    model = load(reference, variant)
    audio = random_audio(1, 1000)
    with torch.no_grad():
        codes = reference.encode(torch.from_numpy(audio))[0]
        expected = reference.decode(codes, [None])[0].numpy()
    np.testing.assert_array_equal(np.array(model.encode(mx.array(audio))), codes[0].numpy())
    assert relative_error(model.decode(mx.array(codes[0].numpy())), expected) < 1e-4


@pytest.mark.parametrize("ratios", [(4, 4, 2), (3, 5, 2)])
def test_cpu_chunks_give_the_same_result_as_the_portable_model(ratios):
    shape = dataclasses.replace(fixtures.Shape(), upsampling_ratios=ratios)
    config = EncodecConfig.from_dict(fixtures.musicgen_config(shape).audio_encoder.to_dict())
    model = EncodecModel(config)
    mx.random.seed(0)
    params = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.5 / v.shape[-1] ** 0.5) for k, v in params]))
    audio = mx.random.normal((1, 13 * config.hop_length + 5, 1))
    embeddings = mx.random.normal((1, 11, config.hidden_size))
    whole_encoded, whole_decoded = model.encoder(audio), model.decoder(embeddings)
    mx.eval(whole_encoded, whole_decoded)
    optimize_encodec(model)
    for chunk_frames in (1, 2, 3, 1000):
        model.encoder.chunk_frames = model.decoder.chunk_frames = chunk_frames
        assert relative_error(model.encoder(audio), whole_encoded) < 1e-5
        assert relative_error(model.decoder(embeddings), whole_decoded) < 1e-5


def test_the_cpu_forms_products_are_numpys_in_float32_and_mlxs_otherwise():
    """cpu.encodec.matmul: x @ W.T + b by numpy's BLAS for float32 (the same numbers as MLX's, to float32's rounding),
    by MLX for other dtypes (numpy has no fast half-precision product)."""
    mx.random.seed(0)
    x, weight, bias = mx.random.normal((2, 9, 48))[:, 1:8], mx.random.normal((8, 3, 48)), mx.random.normal((24,))
    weight = weight.reshape(24, 48)  # as conv1d's weights are: views of (out, kernel, in)
    for args, expected in (((x, weight, bias), mx.addmm(bias, x, weight.T)), ((x, weight), x @ weight.T)):
        y = cpu_encodec.matmul(*args)
        assert y.shape == (2, 7, 24) and y.dtype == mx.float32
        assert relative_error(y, expected) < 1e-6
    assert cpu_encodec.matmul(x[:, :0], weight, bias).shape == (2, 0, 24)
    half = [a.astype(mx.float16) for a in (x, weight, bias)]
    y = cpu_encodec.matmul(*half)
    assert y.dtype == mx.float16 and relative_error(y.astype(mx.float32), mx.addmm(bias, x, weight.T)) < 1e-2


def test_saved_parameters_are_the_portable_layout(reference):
    """Converted folders are device-neutral: a transposed conv's weight is nn.ConvTranspose1d's (out, kernel, in)."""
    portable = dict(tree_flatten(load(reference, "portable").parameters()))
    in_channels, out_channels, kernel = reference.decoder.layers[3].conv.weight.shape
    assert portable["decoder.layers.3.conv.weight"].shape == (out_channels, kernel, in_channels)


def test_both_weight_norm_spellings_sanitize_alike(reference):
    new = state_dict(reference)
    old = {
        k.replace(".parametrizations.weight.original0", ".weight_g").replace(
            ".parametrizations.weight.original1", ".weight_v"
        ): v
        for k, v in new.items()
    }
    assert any(k.endswith(".weight_g") for k in old)
    new, old = EncodecModel.sanitize(new), EncodecModel.sanitize(old)
    assert new.keys() == old.keys()
    for key in new:
        np.testing.assert_array_equal(np.array(new[key]), np.array(old[key]))
    assert not any("inited" in k or "cluster_size" in k or "embed_avg" in k for k in new)


def test_unknown_key_passes_through_and_fails_strict_loading(reference):
    model = load(reference, "portable")
    weights = state_dict(reference)
    weights["decoder.layers.0.conv.surprise"] = mx.zeros((3,))
    sanitized = EncodecModel.sanitize(weights)
    assert "decoder.layers.0.conv.surprise" in sanitized
    with pytest.raises(ValueError):
        model.load_weights(list(sanitized.items()), strict=True)


@pytest.mark.parametrize(
    "setting",
    [{"use_causal_conv": True}, {"normalize": True}, {"chunk_length_s": 1.0}, {"norm_type": "time_group_norm"}],
)
def test_unsupported_settings_are_refused(setting):
    config = EncodecConfig(**{"use_causal_conv": False, **setting})
    with pytest.raises(ValueError, match=next(iter(setting))):
        EncodecModel(config)
