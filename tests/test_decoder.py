"""Decoder parity with transformers' MusicgenForCausalLM: teacher-forced logits, the KV cache, guided logits."""

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
from mlx_musicgen.decoder import DecoderLayer

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


@pytest.mark.parametrize("rows", [1, 2, 3])
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


@pytest.mark.parametrize("length", [1, 37, 300])
def test_numba_attention_matches_numpy(length):
    """cpu.kernels.attend, 2 rows by 3 heads over the first `length` of 320 cached positions (the rest left
    unwritten): float64 softmax attention's output within 1e-6."""
    pytest.importorskip("numba")
    from mlx_musicgen.cpu import kernels

    rng = np.random.default_rng(length)
    q = rng.standard_normal((2, 3, 8), dtype=np.float32)
    keys, values = (np.full((2, 3, 320, 8), np.nan, np.float32) for _ in range(2))
    keys[:, :, :length], values[:, :, :length] = (rng.standard_normal((2, 3, length, 8)) for _ in range(2))
    scores = np.einsum("bhpd,bhd->bhp", keys[:, :, :length].astype(np.float64), q)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    expected = np.einsum("bhp,bhpd->bhd", weights / weights.sum(-1, keepdims=True), values[:, :, :length])
    np.testing.assert_allclose(kernels.attend(q, keys, values, length), expected, atol=1e-6, rtol=0)


def test_numba_on_its_own_work_queue_leaves_the_products_to_blas():
    """On numba's work queue (no TBB or OpenMP) a step's products lose to BLAS's (docs/performance.md): the numpy
    step does not take numba's kernels there."""
    pytest.importorskip("numba")
    code = "from mlx_musicgen.cpu import numpy_decoder; print(numpy_decoder.numba_kernels())"
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "None", result.stderr


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
    assert (lm.layers[0].fc1.kernels is None) == (products != "numba")
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
