"""The C++ integer-dot kernel (kernels/cpu_int_dot_matmul.cc) and its interleaved weight layout
(jaxllm/quantization/interleaved.py): the layout is an exact byte permutation, and the kernel
equals the float64 product of its own int16-rounded x with the gguf package's dequantized
weights, within float32 accumulation error; against the unrounded x it is off by x's rounding
only (~1e-5 of the product's magnitude)."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_blocks import quantize

from jaxllm.kernels import cpu_int_dot_matmul as idot
from jaxllm.quantization import (QuantizedWeight, dequantize, quantized_matmul,
                                 reference_quantized_matmul, use_int_dot)
from jaxllm.quantization.interleaved import FIELDS, deinterleave, interleave, interleaved_rows

QTYPES = list(FIELDS)

pytestmark = pytest.mark.skipif(not idot.is_available(),
                                reason="the integer-dot kernel needs AVX-512 VNNI; this CPU lacks it")


def _weights(qtype: str, n: int, k: int, rng: np.random.Generator):
    """(plain data, scale, dequantized float64 [n, k]) of a random weight."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qtype == "int8":
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        data = np.round(w / scale[:, None]).astype(np.int8)
        return data, scale, data.astype(np.float64) * scale[:, None]
    data = quantize(w, Q[qtype], rng)
    return data, None, gguf.quants.dequantize(data, Q[qtype]).astype(np.float64)


def _int16_x(x: np.ndarray) -> np.ndarray:
    """x rounded as the kernel rounds it: per block of 32, dx = max|x| / 32767 and x ~ dx q."""
    rows, k = x.shape
    blocks = x.reshape(rows, k // 32, 32).astype(np.float32)
    d = np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(32767)
    inv = np.where(d > 0, np.float32(1) / np.where(d > 0, d, 1), 0).astype(np.float32)
    return (np.rint(blocks * inv) * d).reshape(rows, k).astype(np.float64)


@pytest.mark.parametrize("qtype", QTYPES)
def test_interleave_is_an_exact_byte_permutation(qtype):
    rng = np.random.default_rng(1)
    width = 5 * (2 * FIELDS[qtype].headers + FIELDS[qtype].payload)
    data = rng.integers(0, 256, (3, 32, width), dtype=np.uint8)
    data = data.view(np.int8) if qtype == "int8" else data
    packed = interleave(data, qtype)
    assert packed.shape == data.shape and packed.dtype == data.dtype
    assert not np.array_equal(packed, data)
    assert sorted(packed.ravel().tolist()) == sorted(data.ravel().tolist())
    np.testing.assert_array_equal(deinterleave(packed, qtype), data)
    np.testing.assert_array_equal(np.asarray(deinterleave(jnp.asarray(packed), qtype)), data)
    rows = np.array([0, 17, 31, 5, 17])
    np.testing.assert_array_equal(
        np.asarray(interleaved_rows(jnp.asarray(packed[1]), qtype, jnp.asarray(rows))), data[1][rows])


# Rows: every register group size (1..8 rows) and several groups with a remainder; N: one 16-feature
# group and several; K: one block and many.
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("rows,k,n", [(1, 1280, 48), (2, 32, 16), (3, 576, 32), (4, 64, 48),
                                      (6, 96, 32), (7, 64, 16), (8, 96, 64),
                                      (13, 1536, 16), (64, 64, 32)])
def test_matches_float64_product_of_the_rounded_x(qtype, rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    data, scale, w64 = _weights(qtype, n, k, rng)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    x[0, :32] = 0.0                                   # an all-zero block: dx = 0
    got = np.asarray(idot.quantized_matmul(jnp.asarray(x), jnp.asarray(interleave(data, qtype)),
                                           None if scale is None else jnp.asarray(scale),
                                           qtype=qtype, out_features=n))
    xr = _int16_x(x)
    bound = np.abs(xr) @ np.abs(w64).T
    assert got.dtype == np.float32 and got.shape == (rows, n)
    assert np.all(np.abs(got - xr @ w64.T) <= 1e-5 * bound + 1e-30)
    # x's rounding to 16 bits: at most half a step of 32767 per block, relative to the block.
    assert np.all(np.abs(got - x.astype(np.float64) @ w64.T) <= 1e-4 * (np.abs(x) @ np.abs(w64).T))


@pytest.mark.parametrize("qtype", ["Q4_1", "int8"])
def test_a_row_is_bitwise_the_same_whatever_the_other_rows(qtype):
    rng = np.random.default_rng(7)
    data, scale, _ = _weights(qtype, 48, 576, rng)
    packed, scale = jnp.asarray(interleave(data, qtype)), None if scale is None else jnp.asarray(scale)
    x = jnp.asarray(rng.standard_normal((11, 576)), jnp.float32)
    alone = idot.quantized_matmul(x[3:4], packed, scale, qtype=qtype, out_features=48)
    batch = idot.quantized_matmul(x, packed, scale, qtype=qtype, out_features=48)
    np.testing.assert_array_equal(np.asarray(alone[0]), np.asarray(batch[3]))


@pytest.mark.parametrize("change,match", [
    (dict(rows=4097), "unsupported x"), (dict(k=48), "unsupported x"), (dict(n=24), "unsupported x"),
    (dict(width=19), "data must be uint8"), (dict(scale=True), "a float32 scale"),
])
def test_bad_operands_raise_before_any_work(change, match):
    rows, k, n = change.get("rows", 2), change.get("k", 64), change.get("n", 32)
    data = jnp.zeros((n, k // 32 * change.get("width", 20)), jnp.uint8)
    scale = jnp.ones((n,), jnp.float32) if change.get("scale") else None
    with pytest.raises(ValueError, match=match):
        idot.quantized_matmul(jnp.zeros((rows, k)), data, scale, qtype="Q4_1", out_features=n)


def test_use_int_dot_moves_cpu_weights_and_keeps_the_product():
    rng = np.random.default_rng(3)
    data, _, w64 = _weights("Q4_1", 48, 64, rng)
    odd, _, _ = _weights("Q4_1", 40, 64, rng)              # N not a multiple of 16: stays
    params = {"a": QuantizedWeight(data, None, "Q4_1", (48, 64), "cpu"),
              "b": QuantizedWeight(odd, None, "Q4_1", (40, 64), "cpu"),
              "c": QuantizedWeight(data, None, "Q4_1", (48, 64), "reference")}
    moved = use_int_dot(params)
    assert [moved[n].implementation for n in "abc"] == ["cpu_int_dot", "cpu", "reference"]
    a = moved["a"]
    np.testing.assert_array_equal(np.asarray(dequantize(a)), np.asarray(dequantize(params["a"])))
    rows = jnp.asarray([47, 0, 16])
    np.testing.assert_array_equal(np.asarray(dequantize(a, rows)), np.asarray(dequantize(params["a"], rows)))
    for fn in (quantized_matmul, reference_quantized_matmul):   # the kernel; the jnp reference
        x = rng.standard_normal((40, 64)).astype(np.float32)
        got = np.asarray(jax.jit(fn)(jnp.asarray(x), a))
        np.testing.assert_allclose(got, x @ w64.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w64.T).max())


@pytest.mark.parametrize("implementation", ["cpu_int_dot", "cpu", "reference"])
def test_gradient_through_a_quantized_weight_is_the_dequantized_transpose(implementation):
    """LoRA training over a quantized base: d(x @ w.T)/dx = dy @ w whatever kernel ran forward
    (the FFI kernels have no derivative of their own); the packed weight gets no gradient."""
    rng = np.random.default_rng(4)
    data, _, w64 = _weights("Q4_1", 48, 64, rng)
    w = use_int_dot(QuantizedWeight(data, None, "Q4_1", (48, 64), "cpu"))
    w = w if implementation == "cpu_int_dot" else QuantizedWeight(data, None, "Q4_1", (48, 64),
                                                                  implementation)
    assert w.implementation == implementation
    x = jnp.asarray(rng.standard_normal((24, 64)), jnp.float32)
    dy = rng.standard_normal((24, 48)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda x: jnp.sum(quantized_matmul(x, w) * dy)))(x)
    np.testing.assert_allclose(np.asarray(grad), dy @ w64, rtol=1e-4, atol=1e-4 * np.abs(dy @ w64).max())
