"""Quantized weights: jnp dequantization against the gguf package, quantized_matmul against a
float matmul of the dequantized weight, int8 quantization, exact re-encodings between types."""

from __future__ import annotations

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf_blocks import quantize

from jaxllm.quantization import (QuantizedWeight, dequantize, embedding_lookup, quantize_int8,
                                 quantized_matmul)
from jaxllm.quantization.ggml import GGML_TYPES, dequantize_rows
from jaxllm.quantization.gguf_params import _common_type, _stacked, _to_type

REQUIRED = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K")


def _packed(qtype: str, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return quantize(rng.normal(size=(n, k)).astype(np.float32), Q[qtype], rng)


def _in_features(qtype: str, blocks: int) -> int:
    return GGML_TYPES[qtype][0] * blocks


def test_every_required_type_is_supported():
    assert set(REQUIRED) <= set(GGML_TYPES)


@pytest.mark.parametrize("qtype", sorted(GGML_TYPES))
def test_dequantize_equals_gguf_package_bit_for_bit(qtype):
    data = _packed(qtype, 7, _in_features(qtype, 3))
    expected = gguf.quants.dequantize(data, Q[qtype])
    got = np.asarray(jax.jit(dequantize_rows, static_argnums=1)(jnp.asarray(data), qtype))
    assert got.dtype == np.float32 and got.shape == expected.shape
    np.testing.assert_array_equal(got.view(np.uint32), expected.view(np.uint32))
    # Leading axes (a stacked layer axis) dequantize row by row the same.
    stacked = np.stack([data, data[::-1]])
    np.testing.assert_array_equal(np.asarray(dequantize_rows(jnp.asarray(stacked), qtype))[1],
                                  expected[::-1])


def _weights(n: int, blocks: int) -> list[QuantizedWeight]:
    out = []
    for qtype in sorted(GGML_TYPES):
        k = _in_features(qtype, blocks)
        out.append(QuantizedWeight(jnp.asarray(_packed(qtype, n, k, seed=n)), None, qtype, (n, k)))
    w = np.random.default_rng(n).normal(size=(n, 96)).astype(np.float32)
    out.append(jax.tree_util.tree_map(jnp.asarray, quantize_int8(w)))
    return out


@pytest.mark.parametrize("rows", [1, 7, 33, 64])
def test_quantized_matmul_equals_float_matmul_of_dequantized_weight(rows):
    matmul = jax.jit(quantized_matmul)
    for w in _weights(n=17 if rows % 2 else 24, blocks=3):
        x = np.random.default_rng(rows).normal(size=(rows, w.in_features)).astype(np.float32)
        expected = x.astype(np.float64) @ np.asarray(dequantize(w), np.float64).T
        got = np.asarray(matmul(jnp.asarray(x), w))
        assert got.shape == (rows, w.out_features) and got.dtype == np.float32
        scale = np.abs(expected).max()
        np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * scale, err_msg=w.qtype)


def test_quantized_matmul_refuses_mismatched_operands():
    w = _weights(n=8, blocks=1)[0]
    with pytest.raises(ValueError, match="quantized_matmul takes x"):
        quantized_matmul(jnp.ones((2, w.in_features + 1)), w)


def test_embedding_lookup_dequantizes_only_the_gathered_rows():
    data = _packed("Q4_K", 11, 256)
    table = QuantizedWeight(jnp.asarray(data), None, "Q4_K", (11, 256))
    ids = jnp.asarray([3, 0, 10, 3])
    got = np.asarray(embedding_lookup(table, ids, jnp.float32))
    np.testing.assert_array_equal(got, gguf.quants.dequantize(data, Q.Q4_K)[[3, 0, 10, 3]])


def test_quantize_int8_is_symmetric_per_output_channel():
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 5, 40)).astype(np.float32) * rng.uniform(0.1, 10, (2, 5, 1))
    w[0, 2] = 0.0   # a zero row gets scale 0, not a division by zero
    q = quantize_int8(w)
    assert q.data.dtype == np.int8 and q.scale.shape == (2, 5) and q.shape == (5, 40)
    np.testing.assert_allclose(q.scale, np.abs(w).max(-1) / 127, rtol=1e-6)
    assert np.abs(q.data).max() == 127 and not q.data[0, 2].any()
    error = np.abs(np.asarray(dequantize(q)) - w)
    assert (error <= q.scale[..., None] / 2 * 1.0001).all()


def test_quantized_weight_checks_its_layout():
    with pytest.raises(ValueError, match="unknown quantized type 'Q7_0'"):
        QuantizedWeight(np.zeros((2, 18), np.uint8), None, "Q7_0", (2, 32))
    with pytest.raises(ValueError, match=r"must be \[\.\.\., 2, 18\]"):
        QuantizedWeight(np.zeros((2, 20), np.uint8), None, "Q4_0", (2, 32))
    with pytest.raises(ValueError, match="whole blocks of 256"):
        QuantizedWeight(np.zeros((2, 20), np.uint8), None, "Q4_K", (2, 100))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q5_0"])
def test_q4_0_and_q5_0_re_encode_as_q8_0_exactly(qtype):
    data = _packed(qtype, 5, 96)
    assert _common_type([qtype, "Q8_0"]) == "Q8_0" and _common_type(["Q4_K", "Q6_K"]) is None
    as_q8 = _to_type(data, qtype, "Q8_0")
    np.testing.assert_array_equal(gguf.quants.dequantize(as_q8, Q.Q8_0),
                                  gguf.quants.dequantize(data, Q[qtype]))


def test_stacking_layers_of_types_without_a_common_one_falls_back_to_float():
    parts = [QuantizedWeight(_packed(t, 4, 256), None, t, (4, 256)) for t in ("Q4_K", "Q6_K")]
    stacked = _stacked(("layers", "mlp", "down_proj", "kernel"), parts, np.float32)
    assert isinstance(stacked, np.ndarray) and stacked.shape == (2, 256, 4)
    np.testing.assert_array_equal(stacked[1].T, gguf.quants.dequantize(parts[1].data, Q.Q6_K))
    mixed = [QuantizedWeight(_packed(t, 4, 64), None, t, (4, 64)) for t in ("Q5_0", "Q8_0")]
    packed = _stacked(("layers", "self_attn", "qkv_proj", "kernel"), mixed, np.float32)
    assert packed.qtype == "Q8_0" and packed.data.shape == (2, 4, 68)


@pytest.mark.parametrize("qtype, n", [("Q4_0", 1536), ("int8", 2048), ("Q8_0", 1031)])
def test_quantized_matmul_of_tall_weights_in_row_tiles(qtype, n):
    """Weights over 1024 rows are dequantized a tile of rows at a time (1536 -> 768, 2048 ->
    1024; a prime 1031 whole): the same product."""
    rng = np.random.default_rng(n)
    w = rng.normal(size=(n, 64)).astype(np.float32)
    weight = (quantize_int8(w) if qtype == "int8"
              else QuantizedWeight(quantize(w, Q[qtype], rng), None, qtype, (n, 64)))
    weight = jax.tree_util.tree_map(jnp.asarray, weight)
    x = rng.normal(size=(3, 64)).astype(np.float32)
    expected = x.astype(np.float64) @ np.asarray(dequantize(weight), np.float64).T
    got = np.asarray(jax.jit(quantized_matmul)(jnp.asarray(x), weight))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-6 * np.abs(expected).max())
