"""Decoder parity with transformers' MusicgenForCausalLM: teacher-forced logits, the KV cache, guided logits."""

import math
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
import torch

from mlx_musicgen import MusicGen
from mlx_musicgen.cpu.decoder import CompiledDecoderLayer, SplitDecoderLayer, optimize_decoder
from mlx_musicgen.cpu import numpy_decoder
from mlx_musicgen.cpu.numpy_decoder import NumpyCache, NumpyDecoder
from mlx_musicgen.decoder import DecoderLayer, text_mask_matters
from mlx_musicgen.sampling import apply_guidance

ATOL = 1e-4  # float32 logits
LAYERS = {"portable": DecoderLayer, "compiled": CompiledDecoderLayer, "split": SplitDecoderLayer}


@pytest.fixture(scope="module", params=list(LAYERS))
def model(tiny, request):
    """Metal and CUDA run the portable layers; a CPU runs compiled layers (MKL) or layers split in two halves
    on two streams (OpenBLAS). All must match the reference, whichever BLAS this machine loaded."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLX_MUSICGEN_PORTABLE", "1")
        loaded = MusicGen.from_pretrained(tiny.folder)
    if request.param != "portable":
        optimize_decoder(loaded.decoder, split=request.param == "split")
    assert all(type(layer) is LAYERS[request.param] for layer in loaded.decoder.layers)
    return loaded


def random_inputs(seed=0, batch=2, frames=9, text_len=5):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2049, size=(batch, 4, frames)).astype(np.int64)  # 2048 is the pad/start id
    states = rng.standard_normal((batch, text_len, 64)).astype(np.float32)
    mask = np.ones((batch, text_len), dtype=np.int64)
    mask[1, 3:] = 0  # a padded row
    states = (states * mask[..., None]).astype(np.float32)
    return codes, states, mask


def reference_logits(tiny, codes, states, mask):
    B, K, T = codes.shape
    out = tiny.reference.decoder(
        input_ids=torch.from_numpy(codes).reshape(B * K, T),
        encoder_hidden_states=torch.from_numpy(states),
        encoder_attention_mask=torch.from_numpy(mask),
    )
    return out.logits.reshape(B, K, T, -1).numpy()


def our_logits(model, codes, states, mask, cache=None):
    decoder = model.decoder
    return decoder(mx.array(codes), decoder.text_context(mx.array(states), mx.array(mask)), cache)


def test_teacher_forced_logits_match(model, tiny):
    codes, states, mask = random_inputs()
    expected = reference_logits(tiny, codes, states, mask)
    actual = np.array(our_logits(model, codes, states, mask))
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def test_kv_cache_step_by_step_matches_full_sequence(model, tiny):
    codes, states, mask = random_inputs(seed=1, frames=8)
    expected = reference_logits(tiny, codes, states, mask)
    cache = model.decoder.make_cache(batch=2, max_length=8)
    prefix = np.array(our_logits(model, codes[:, :, :3], states, mask, cache))  # a prefill of 3, then steps of 1
    steps = [np.array(our_logits(model, codes[:, :, t : t + 1], states, mask, cache)) for t in range(3, 8)]
    actual = np.concatenate([prefix, *steps], axis=2)
    np.testing.assert_allclose(actual, expected, atol=ATOL, rtol=0)


def test_fully_masked_text_gives_no_cross_attention(model, tiny):
    """The unconditional half of guidance: zero states and an empty mask contribute nothing (and no NaN)."""
    codes, states, mask = random_inputs(seed=2)
    zero_states, zero_mask = np.zeros_like(states), np.zeros_like(mask)
    actual = np.array(our_logits(model, codes, zero_states, zero_mask))
    assert np.isfinite(actual).all()
    np.testing.assert_allclose(actual, reference_logits(tiny, codes, zero_states, zero_mask), atol=ATOL, rtol=0)


@pytest.mark.parametrize("text_len, folded", [(5, True), (40, False)])
def test_both_cross_attention_forms_match(model, tiny, text_len, folded):
    """Guidance's layout (a row with text, then one without): short text folds the query and output projections
    into the text's keys and values (1 row x 2 heads x 5 <= 64 wide), long text keeps them (80 > 64)."""
    codes, states, mask = random_inputs(seed=3, text_len=text_len)
    mask[1], states[1] = 0, 0
    text = model.decoder.text_context(mx.array(states), mx.array(mask))
    if isinstance(model.decoder.layers[0], CompiledDecoderLayer):  # the compiled layers (the others always project)
        assert text.text[0].folded == folded
    actual = np.array(model.decoder(mx.array(codes), text))
    np.testing.assert_allclose(actual, reference_logits(tiny, codes, states, mask), atol=ATOL, rtol=0)


def test_text_mask_matters_only_where_it_changes_attention():
    states = mx.array(np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32))
    zero_second = states * mx.array([[[1.0]], [[0.0]]])
    assert not text_mask_matters(states, mx.ones((2, 3)))  # all text: the mask adds 0
    assert not text_mask_matters(zero_second, mx.array([[1, 1, 1], [0, 0, 0]]))  # guidance's layout
    assert text_mask_matters(states, mx.array([[1, 1, 1], [0, 0, 0]]))  # no text, but states that are not 0
    assert text_mask_matters(zero_second, mx.array([[1, 1, 0], [0, 0, 0]]))  # a padded row


@pytest.mark.parametrize("padded", [False, True])
def test_cross_attention_without_a_needless_mask_matches(model, tiny, padded):
    """Generation attends to the text without its mask where that changes nothing (guidance's layout, no
    padding): the same logits as the reference's and as with the mask; a padded row keeps it."""
    codes, states, mask = random_inputs(seed=4)
    mask[0] = 1
    mask[1], states[1] = (1, 0, 0, 0, 0) if padded else 0, 0
    if padded:  # a row of one token: the mask keeps its query from the other positions' keys (0 here)
        states[1, 0] = 1.0
    decoder = model.decoder
    skipped = decoder.text_context(mx.array(states), mx.array(mask), skip_needless_mask=True)
    assert all(text.masked == padded for text in skipped.text)
    actual = np.array(decoder(mx.array(codes), skipped))
    np.testing.assert_allclose(actual, reference_logits(tiny, codes, states, mask), atol=ATOL, rtol=0)
    with_mask = np.array(decoder(mx.array(codes), decoder.text_context(mx.array(states), mx.array(mask))))
    np.testing.assert_allclose(actual, with_mask, atol=1e-6, rtol=0)


def test_guided_logits_match_reference_scores(model, tiny):
    """Greedy generation in the reference records the guided scores of every step; ours agree, step by step."""
    texts = ["80s pop track with bassy drums and synth", "lofi"]
    inputs = tiny.processor(text=texts, padding=True, return_tensors="pt")
    steps = 6
    out = tiny.reference.generate(
        **inputs, do_sample=False, guidance_scale=3.0, max_new_tokens=steps,
        return_dict_in_generate=True, output_scores=True,
    )
    expected = torch.stack(out.scores, dim=1).reshape(2, 4, steps, -1).numpy()  # (B, K, steps, V)

    # Feed the same delayed sequence (the reference's greedy choices, with the delay pattern applied).
    states, mask = model.conditioning(texts, 2, guided=True)
    text = model.decoder.text_context(states, mask)
    chosen = expected.argmax(-1)
    from mlx_musicgen import delay

    start = np.full((2, 4, 1), 2048, dtype=np.int32)
    pattern = delay.delay_pattern(start, steps + 1, 2048, 1)
    sequence = np.where(pattern[:, :, 1:] == delay.UNSET, chosen, pattern[:, :, 1:])
    inputs_ours = np.concatenate([start, sequence[:, :, :-1]], axis=2)
    doubled = mx.array(np.concatenate([inputs_ours, inputs_ours]))
    logits = apply_guidance(model.decoder(doubled, text), 3.0)
    np.testing.assert_allclose(np.array(logits), expected, atol=ATOL, rtol=0)


def test_gelu_matches_the_exact_gelu():
    """The CPU's GELU computes erf with a rational approximation: within 3e-6 of the exact (erf) GELU everywhere.
    The truth is torch's GELU in float64: its float32 one takes a CPU's vector path, which differs between CPUs."""
    from mlx_musicgen.cpu.decoder import gelu

    xs = np.linspace(-12, 12, 240_001, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(xs).double()).numpy()
    np.testing.assert_allclose(np.array(gelu(mx.array(xs))), expected, atol=3e-6, rtol=0)


@pytest.mark.parametrize("width", [1024, 1536, 2048])  # musicgen-small, -medium, -large
def test_position_table_is_the_references_to_float32_rounding(width):
    """Our table over 2048 positions against the truth of transformers' get_embedding: its formula with float32
    where its arithmetic rounds (the exponents i * -ln(10000) / (half - 1), the frequencies, the angles
    p * frequency: IEEE products, the same on every machine) and float64 for exp, cos and sin. Every frequency
    and entry is within one float32 step of that truth. The reference's own float32 exp, cos and sin depend on
    the CPU's vector path (its exp is a step off for under 1% of frequencies on one machine, 3% on another), so
    its table is held only to what its frequencies' steps move the angles, plus one step of cos/sin. (MLX's
    float32 exp is a step off for most frequencies, which moves angles near position 1300 by up to 1e-4.)"""
    from transformers.models.musicgen.modeling_musicgen import MusicgenSinusoidalPositionalEmbedding as Reference

    from mlx_musicgen.decoder import position_frequencies, sinusoids

    length, half = 2048, width // 2
    ours = sinusoids(length, width)
    reference = Reference.get_embedding(length, width).numpy()
    assert ours.dtype == np.float32 and ours.shape == reference.shape

    exponents = torch.arange(half).float() * -(math.log(10000) / (half - 1))  # float32, as the reference's
    true_frequencies = torch.exp(exponents.double())
    frequencies = position_frequencies(width)
    assert (np.abs(frequencies - true_frequencies.numpy()) <= np.spacing(frequencies)).all()
    positions = torch.arange(length).float()[:, None]
    angles = positions * true_frequencies.float()[None, :]  # a float32 product, as the reference's
    truth = torch.cat([torch.cos(angles.double()), torch.sin(angles.double())], dim=1).numpy()
    assert (np.abs(ours - truth) <= np.spacing(np.abs(truth).astype(np.float32))).all()  # one float32 step

    reference_frequencies = torch.exp(exponents)  # the reference's float32 exp: faithful on every path
    assert (np.abs(reference_frequencies.numpy() - true_frequencies.numpy()) <= np.spacing(frequencies)).all()
    moved = (positions * reference_frequencies[None, :] - angles).abs().numpy()  # float32 angles, both
    np.testing.assert_array_less(np.abs(ours - reference), np.concatenate([moved] * 2, axis=1) + 2**-23)


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
@pytest.mark.parametrize("inputs, outputs", [(64, 48), (130, 7), (5, 3)])
def test_numba_products_match_numpy(rows, inputs, outputs):
    """cpu.kernels' products, both layouts, on every thread and on one: float64 numpy's within float32's rounding
    of the sums; rows taken from a wider array (not contiguous), inputs not a multiple of the threads or of the
    kernel's four rows a pass."""
    numba = pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    rng = np.random.default_rng(inputs)
    x = rng.standard_normal((rows, inputs + 3), dtype=np.float32)[:, 3:]
    weight = rng.standard_normal((outputs, inputs), dtype=np.float32)
    expected = x.astype(np.float64) @ weight.T.astype(np.float64)
    tolerance = 1e-6 * np.abs(x).astype(np.float64) @ np.abs(weight).T.astype(np.float64)
    before = numba.get_num_threads()
    for count in (before, 1):
        with kernels.threads(count):
            assert numba.get_num_threads() == count
            for actual in (kernels.times_weight(x, weight), kernels.times_weight_t(x, np.ascontiguousarray(weight.T))):
                assert actual.shape == expected.shape and actual.dtype == np.float32
                assert (np.abs(actual - expected) <= tolerance).all()
        assert numba.get_num_threads() == before
    with pytest.raises(ValueError, match="does not fit a weight"):
        kernels.times_weight(x, weight[:, 1:])


@pytest.mark.parametrize("length", [1, 37, 300])
@pytest.mark.parametrize("masked", [False, True])
def test_numba_attention_matches_numpy(length, masked):
    """cpu.kernels._attend (decoder_layer's), 2 rows by 3 heads over the first `length` of 320 cached positions (the rest NaN, never
    read), with no mask (the KV cache's) or an additive one (a text's: float32's min on padding), on every thread
    and on one: float64 softmax attention's output, within float32's rounding (1e-6 of the largest value: the
    output is a weighted mean of values)."""
    numba = pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    rng = np.random.default_rng(length)
    q = rng.standard_normal((2, 3, 8), dtype=np.float32)
    keys, values = (np.full((2, 3, 320, 8), np.nan, np.float32) for _ in range(2))
    keys[:, :, :length], values[:, :, :length] = (rng.standard_normal((2, 3, length, 8)) for _ in range(2))
    mask = np.zeros((2, length if masked else 0), np.float32)
    if masked:
        mask[0, length // 2:] = np.finfo(np.float32).min
    scores = np.einsum("bhpd,bhd->bhp", keys[:, :, :length].astype(np.float64), q)
    scores += mask[:, None] if masked else 0
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhp,bhpd->bhd", weights / weights.sum(-1, keepdims=True), values[:, :, :length])
    for count in (numba.get_num_threads(), 1):
        actual = np.empty_like(q)
        with kernels.threads(count):
            kernels._attend(q, keys, values, length, mask, actual)
        np.testing.assert_allclose(actual, expected, atol=1e-6 * np.abs(values[:, :, :length]).max(), rtol=0)


def test_numba_small_ops_match_float64():
    """cpu.kernels' GELU, layer norm and folded cross-attention (the ops between a step's products) against float64
    numpy: the exact erf GELU within 2e-6 (the rational erf's own error is 1.2e-6 or less), the others within
    float32's rounding."""
    pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 300), dtype=np.float32) * 3
    exact = x * (1 + np.vectorize(math.erf)(x.astype(np.float64) / math.sqrt(2))) / 2
    np.testing.assert_allclose(kernels.gelu(x), exact, atol=2e-6, rtol=0)

    weight, bias = rng.standard_normal((2, 300), dtype=np.float32)
    x[1] = x[1, 0] + np.float32(0.001) * (np.arange(300) % 2)  # variance 2.5e-7: the eps (1e-5) decides it
    wide = x.astype(np.float64)
    normed = (wide - wide.mean(-1, keepdims=True)) / np.sqrt(wide.var(-1, keepdims=True) + 1e-5) * weight + bias
    np.testing.assert_allclose(kernels.layer_norm(x, weight, bias), normed, atol=1e-5, rtol=0)

    heads, positions, width = 3, 5, 300  # keys and values folded: (rows, heads * positions, width), 1 row of 2
    h = rng.standard_normal((2, width), dtype=np.float32)
    keys, values = (rng.standard_normal((1, heads * positions, width), dtype=np.float32) / 10 for _ in range(2))
    mask = np.zeros((2, positions), np.float32)
    mask[0, -2:] = np.finfo(np.float32).min  # the text's last two positions are padding, as decoder masks them
    scores = (keys[0].astype(np.float64) @ h[0]).reshape(heads, positions) + mask[0]
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.zeros((2, width))
    expected[0] = (weights / weights.sum(-1, keepdims=True)).reshape(-1) @ values[0]
    np.testing.assert_allclose(kernels._folded_cross_attention(h, keys, values, mask, heads), expected, atol=1e-6,
                               rtol=0)
    with pytest.raises(ValueError, match="a norm of"):
        kernels.layer_norm(x, weight[:-1], bias[:-1])


@pytest.mark.parametrize("activation", ["gelu", "relu"])
@pytest.mark.parametrize("text_len, folded", [(5, True), (40, False)])
def test_numba_decoder_layer_matches_the_numpy_layer(tiny, activation, text_len, folded):
    """cpu.kernels.decoder_layer, a whole layer in one call, against the same layer op by op in numpy (the form
    test_numpy_steps_match_reference holds to the reference), each text form and activation, at position 5 of a
    cache whose later positions are NaN (never read): the same output within float32's rounding and the same
    keys and values written. Shapes that do not fit are refused."""
    kernels = numpy_decoder.numba_kernels()
    if kernels is None:
        pytest.skip("numba is not installed here, or runs on its own work queue")
    loaded = MusicGen.from_pretrained(tiny.folder, portable=True)
    optimize_decoder(loaded.decoder, split=False)
    layer = loaded.decoder.layers[1]
    layer.activation = activation
    _, states, mask = random_inputs(seed=6, batch=2, text_len=text_len)
    mask[1], states[1] = 0, 0  # guidance's layout
    text = loaded.decoder.text_context(mx.array(states), mx.array(mask)).text[1]
    assert text.folded == folded
    numpy_layer = numpy_decoder.NumpyLayer(layer)
    x = np.random.default_rng(1).standard_normal((2, layer.fc1.weight_t.shape[0]), dtype=np.float32)
    outputs, caches = [], []
    for weights in (numpy_layer.kernel_weights, None):
        cache = NumpyCache(2, numpy_layer.heads, x.shape[1] // numpy_layer.heads, 9)
        cache.keys[:] = cache.values[:] = np.nan
        cache.keys[:, :, :5], cache.values[:, :, :5] = np.random.default_rng(2).standard_normal((2, 2, 1, 5, 1))
        cache.offset, cache.text = 5, numpy_decoder.NumpyText.of(text)
        cache.kernel_text = numpy_decoder.text_for_kernels(kernels, cache.text, 2)
        numpy_layer.kernel_weights = weights
        outputs.append(numpy_layer(x, cache))
        caches.append(cache)
    np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-5)
    for name in ("keys", "values"):
        np.testing.assert_allclose(getattr(caches[0], name)[:, :, :6], getattr(caches[1], name)[:, :, :6], atol=1e-6)
    weights, cache = numpy_layer.weights_for(kernels), caches[0]
    with pytest.raises(ValueError, match="does not fit a cache"):
        kernels.decoder_layer(x, 9, cache.keys, cache.values, cache.kernel_text, weights)
    with pytest.raises(ValueError, match="does not fit x"):
        kernels.decoder_layer(x[:1], 5, cache.keys[:1], cache.values[:1], cache.kernel_text, weights)
    without_text = numpy_decoder.text_for_kernels(kernels, None, 2)  # a Melody layer's: this layer has cross-attention
    with pytest.raises(ValueError, match="does not fit x .* with cross-attention"):
        kernels.decoder_layer(x, 5, cache.keys, cache.values, without_text, weights)
    numpy_layer.fc2.array = numpy_layer.fc2.array.copy()
    numpy_layer.fc2.array.flags.writeable = False  # another signature: the layer runs op by op instead
    assert numpy_layer.weights_for(kernels) is None


def test_numba_thread_teams_follow_the_users_count(monkeypatch):
    """The teams the numpy step's products choose from (every core, one less, one); only NUMBA_NUM_THREADS's
    count where the user set it."""
    numba = pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    monkeypatch.delenv("NUMBA_NUM_THREADS", raising=False)
    assert kernels.thread_counts(1) == [1]
    assert kernels.thread_counts(2) == sorted({min(2, numba.config.NUMBA_NUM_THREADS), 1}, reverse=True)
    monkeypatch.setenv("NUMBA_NUM_THREADS", str(numba.config.NUMBA_NUM_THREADS))
    assert kernels.thread_counts(2) == [numba.config.NUMBA_NUM_THREADS]


def test_numba_is_optional_and_imported_late():
    """`import mlx_musicgen` does not import numba (the first NumpyDecoder does); without numba (a Mac: the `cpu`
    extra brings it on Linux only), the numpy step's products and attention are numpy's and BLAS's, on OpenBLAS's
    teams."""
    code = ("import sys; import mlx_musicgen; assert 'numba' not in sys.modules; sys.modules['numba'] = None; "
            "from mlx_musicgen.cpu import numpy_decoder, threads; "
            "print(numpy_decoder.numba_kernels() is None, "
            "getattr(numpy_decoder.product_teams(), 'sizes', 0) == getattr(threads.numpy_blas_teams(), 'sizes', 0))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.split() == ["True", "True"], result.stderr


def test_numba_on_its_own_work_queue_leaves_the_products_to_blas():
    """On numba's work queue (no TBB or OpenMP) a step's products lose to BLAS's (docs/performance.md): the numpy
    step does not take numba's kernels there."""
    pytest.importorskip("numba")
    code = "from mlx_musicgen.cpu import numpy_decoder; print(numpy_decoder.numba_kernels())"
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "None", result.stderr


def test_numba_that_cannot_load_its_kernels_says_so_and_leaves_them_to_blas(monkeypatch):
    """numba's own errors (no cache directory it can write, a threading layer it cannot load) are said once and
    the numpy step runs without the kernels, instead of failing the model's load."""
    pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    def cannot_cache():
        raise RuntimeError("cannot cache function '_product': no locator available")

    monkeypatch.setattr(kernels, "fast_threading_layer", cannot_cache)
    numpy_decoder.numba_kernels.cache_clear()
    try:
        with pytest.warns(UserWarning, match="numba's kernels .* could not be loaded .*no locator available"):
            assert numpy_decoder.numba_kernels() is None
    finally:
        numpy_decoder.numba_kernels.cache_clear()


@pytest.mark.parametrize("text_len, folded", [(5, True), (40, False)])
@pytest.mark.parametrize("batch", [1, 2])
@pytest.mark.parametrize("products", ["numba", "blas", "blas in 1 KB blocks"])
def test_numpy_steps_match_reference(tiny, text_len, folded, batch, products, monkeypatch):
    """The numpy step (cpu.numpy_decoder) over a prefill of 3 then steps of 1, each text form, 1 or 2 rows, its
    products by numba's kernels (cpu.kernels) or by BLAS's matrix-vector products, in one block a weight or
    several (1 KB: 4 rows of 64 inputs): the reference's teacher-forced logits."""
    if products == "numba" and numpy_decoder.numba_kernels() is None:
        pytest.skip("numba is not installed here, or runs on its own work queue")
    if products != "numba":
        monkeypatch.setattr(numpy_decoder, "numba_kernels", lambda: None)
    if products == "blas in 1 KB blocks":
        monkeypatch.setattr(numpy_decoder, "CHUNK_BYTES", 1024)
    loaded = MusicGen.from_pretrained(tiny.folder, portable=True)
    optimize_decoder(loaded.decoder, split=False)
    lm = NumpyDecoder(loaded.decoder)
    assert all((layer.kernel_weights is None) == (products != "numba") for layer in lm.layers)
    if products == "blas in 1 KB blocks":
        assert len(lm.layers[0].fc1.blocks) > 1 and len(lm.layers[0].q.blocks) == 16  # q: 4 rows of 64 a block
    codes, states, mask = random_inputs(seed=4, batch=2, frames=8, text_len=text_len)
    mask[1], states[1] = 0, 0  # guidance's layout
    codes, states, mask = codes[:batch], states[:batch], mask[:batch]
    context = loaded.decoder.text_context(mx.array(states), mx.array(mask))
    assert context.text[0].folded == folded
    cache = lm.make_cache(batch, 8)
    assert all(isinstance(c, NumpyCache) for c in cache)
    logits = [lm(mx.array(codes[:, :, :3]), context, cache)]
    logits += [lm(mx.array(codes[:, :, t : t + 1]), context, cache) for t in range(3, 8)]
    actual = np.concatenate([np.array(x) for x in logits], axis=2)
    np.testing.assert_allclose(actual, reference_logits(tiny, codes, states, mask), atol=ATOL, rtol=0)
    if products == "numba":  # the kernels' first calls (fast_threading_layer) compiled what the steps call
        kernels = numpy_decoder.numba_kernels()
        entries = [kernels._linear, kernels._layer_norm, kernels._decoder_layer]  # called from Python: the others inside
        assert [len(function.signatures) for function in entries] == [1] * len(entries)
