"""The C++ quantized few-row matmul kernel (kernels/cpu_quant_matmul.cc) against the gguf
package's dequantization followed by a float64 numpy product."""

from __future__ import annotations

import functools
import logging

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES
from gguf_blocks import quantize

from jaxllm.kernels import cpu_quant_matmul as qm

GGUF_TYPES = ["Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K"]


def _weights(qtype: str, n: int, k: int, rng: np.random.Generator):
    """(data, scale, dequantized float64 [n, k]) of a random weight, as the kernel takes it."""
    w = rng.standard_normal((n, k)).astype(np.float32)
    if qtype == "int8":
        scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)
        data = np.round(w / scale[:, None]).astype(np.int8)
        return jnp.asarray(data), jnp.asarray(scale), data.astype(np.float64) * scale[:, None]
    data = quantize(w, Q[qtype], rng)
    return jnp.asarray(data), None, gguf.quants.dequantize(data, Q[qtype]).astype(np.float64)


def _check(got, x, w64) -> None:
    """Equal to the float64 product within float32 accumulation error:
    |err| <= 1e-5 (|x| @ |w|^T)."""
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    expected, bound = x64 @ w64.T, np.abs(x64) @ np.abs(w64).T
    got = np.asarray(got)
    assert got.dtype == np.float32 and got.shape == expected.shape
    assert np.all(np.abs(got - expected) <= 1e-5 * bound + 1e-30), np.abs(got - expected).max()


def test_block_sizes_are_gguf_ones():
    for name in GGUF_TYPES:
        assert qm.QTYPES[name] == GGML_QUANT_SIZES[Q[name]]
        byte_shape = gguf.quants.quant_shape_to_byte_shape((3, 512), Q[name])
        assert qm.row_bytes(512, name) == byte_shape[1]


# Rows: 1, 2 and 4-row register groups and their remainders, 16 and 33 (several groups of 4).
# K: several blocks, sliced (K = 1280: 40 32-weight blocks, slices of 32; 5 K-quant blocks,
# slices of 4). N: below one 16-feature group, and over several with a tail.
@pytest.mark.parametrize("qtype", GGUF_TYPES + ["int8"])
@pytest.mark.parametrize("rows,k,n", [(1, 1280, 37), (2, 256, 5), (3, 768, 53), (5, 1280, 21),
                                      (7, 512, 16), (16, 1280, 37), (33, 256, 19)])
def test_matches_dequantized_float64_product(qtype, rows, k, n):
    rng = np.random.default_rng(rows * 1000 + k + n)
    data, scale, w64 = _weights(qtype, n, k, rng)
    x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
    fn = jax.jit(functools.partial(qm.quantized_matmul, qtype=qtype, out_features=n))
    _check(fn(x, data, scale), x, w64)


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K", "int8"])
def test_bfloat16_x_is_widened_exactly(qtype):
    rng = np.random.default_rng(11)
    data, scale, w64 = _weights(qtype, 24, 512, rng)
    x = jnp.asarray(rng.standard_normal((3, 512)), jnp.bfloat16)
    _check(qm.quantized_matmul(x, data, scale, qtype=qtype, out_features=24), x, w64)


def test_real_smollm2_tensors_as_the_file_stores_them():
    """The layout contract on real bytes: GGUF's rows of blocks, straight from the reader."""
    from jaxllm.model_source import default_gguf_path

    reader = gguf.GGUFReader(default_gguf_path())
    tensors = {t.name: t for t in reader.tensors}
    rng = np.random.default_rng(5)
    for name, rows in (("blk.0.ffn_down.weight", 1), ("token_embd.weight", 4)):
        tensor = tensors[name]
        data = np.asarray(tensor.data)[:300]                 # [N, row_bytes]: the first 300 rows
        k = int(tensor.shape[0])
        w64 = gguf.quants.dequantize(data, tensor.tensor_type).astype(np.float64)
        x = jnp.asarray(rng.standard_normal((rows, k)), jnp.float32)
        got = qm.quantized_matmul(x, jnp.asarray(data), None, qtype=tensor.tensor_type.name,
                                  out_features=data.shape[0])
        _check(got, x, w64)


@pytest.mark.parametrize("rows,k,n,qtype,ok", [
    (1, 576, 960, "Q4_1", True), (64, 576, 960, "Q8_0", True), (65, 576, 960, "Q8_0", False),
    (0, 576, 960, "Q4_1", False), (1, 576, 960, "Q4_K", False), (1, 1024, 640, "Q6_K", True),
    (1, 48, 16, "int8", False), (1, 576, 0, "Q4_1", False), (1, 576, 960, "Q2_K", False),
])
def test_supports(rows, k, n, qtype, ok):
    assert qm.supports(rows, k, n, qtype) is ok


def _operands(qtype="Q4_1", rows=2, k=64, n=8):
    data, scale, _ = _weights(qtype, n, k, np.random.default_rng(0))
    return jnp.ones((rows, k), jnp.float32), data, scale


@pytest.mark.parametrize("change,match", [
    (dict(qtype="Q3_K"), "unknown qtype 'Q3_K'"),
    (dict(x=jnp.ones((2, 64), jnp.float16)), "float32 or bfloat16"),
    (dict(x=jnp.ones((2, 2, 64))), r"x must be \[R, K\]"),
    (dict(x=jnp.ones((65, 64))), "1 <= R <= 64"),
    (dict(x=jnp.ones((2, 48))), "multiple of 32"),
    (dict(out_features=9), r"data must be uint8\[9, 40\]"),
    (dict(data=jnp.zeros((8, 40), jnp.int8)), r"data must be uint8\[8, 40\]"),
    (dict(scale=jnp.ones((8,))), "pass scale=None"),
])
def test_bad_operands_raise_before_any_work(change, match):
    x, data, scale = _operands()
    args = dict(x=x, data=data, scale=scale, qtype="Q4_1", out_features=8) | change
    with pytest.raises(ValueError, match=match):
        qm.quantized_matmul(args.pop("x"), args.pop("data"), args.pop("scale"), **args)


@pytest.mark.parametrize("scale,match", [(None, "got None"), (jnp.ones((7,)), r"float32\[8\]"),
                                         (jnp.ones((8,), jnp.bfloat16), r"float32\[8\]")])
def test_int8_needs_a_float32_scale_per_feature(scale, match):
    x, data, _ = _operands("int8")
    with pytest.raises(ValueError, match=match):
        qm.quantized_matmul(x, data, scale, qtype="int8", out_features=8)


def test_is_faster_thresholds():
    assert qm.is_faster(1, "Q4_1") and qm.is_faster(16, "Q8_0") and qm.is_faster(8, "Q6_K")
    assert not qm.is_faster(9, "Q4_K") and not qm.is_faster(17, "int8")
    assert not qm.is_faster(0, "Q4_1") and not qm.is_faster(qm.MAX_ROWS + 1, "Q8_0")
    assert not qm.is_faster(1, "Q2_K")
    assert all(qm.supports(rows, 256, 16, name) for name in qm.QTYPES
               for rows in range(1, 65) if qm.is_faster(rows, name))


def test_without_a_compiler_it_is_unavailable_and_says_so(monkeypatch, caplog):
    # A fresh, unregistered copy of the loader (XLA refuses a second registration of a target).
    monkeypatch.setattr(qm, "_target", functools.cache(qm._target.__wrapped__))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.WARNING):
        assert not qm.is_available()
    assert "no-such-compiler" in caplog.text
    x, data, scale = _operands()
    with pytest.raises(RuntimeError, match="could not be built"):
        qm.quantized_matmul(x, data, scale, qtype="Q4_1", out_features=8)


def test_benchmark_measures_every_implementation(monkeypatch):
    """benchmarks/quant_matmul_cpu.py on a tiny chain: a row per count, every figure there."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "quant_matmul_cpu.py"
    spec = importlib.util.spec_from_file_location("quant_matmul_cpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    monkeypatch.setitem(bench.CASES, "tiny", ([(64, 48), (64, 96), (96, 40)], True))
    result = bench.measure("tiny", "Q4_1", [1, 17], repeats=1)
    assert result["quant_bytes"] == 48 * 40 + 96 * 40 + 40 * 60
    one, many = result["rows"][1], result["rows"][17]
    assert set(one["ms"]) == {"quant", "f32", "xla"} and one["speedup_vs_f32"] > 0
    assert set(many["ms"]) == {"quant", "xla"} and many["speedup_vs_f32"] is None


@pytest.mark.parametrize("qtype", ["Q4_1", "Q6_K"])
def test_a_row_is_bitwise_the_same_whatever_the_other_rows(qtype):
    """Batch invariance: 1, 2 and 4-row register groups and K slices sum in the same order."""
    rng = np.random.default_rng(3)
    data, scale, _ = _weights(qtype, 21, 2560, rng)
    x = jnp.asarray(rng.standard_normal((7, 2560)), jnp.float32)
    fn = jax.jit(functools.partial(qm.quantized_matmul, qtype=qtype, out_features=21))
    together = np.asarray(fn(x, data, scale))
    for i in range(7):
        np.testing.assert_array_equal(np.asarray(fn(x[i:i + 1], data, scale))[0], together[i])
