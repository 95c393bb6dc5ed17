"""The C++ few-row matmul kernel (kernels/cpu_matmul.cc) against numpy, and its routing."""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels import cpu_matmul
from jaxllm.models import layers

NN = (((1,), (0,)), ((), ()))   # x [R, D] @ w [D, F]
NT = (((1,), (1,)), ((), ()))   # x [R, D] @ w [F, D]^T


def _operands(rows: int, d: int, f: int, transposed: bool, dtype, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, d), np.float32)
    w = rng.standard_normal((f, d) if transposed else (d, f), np.float32)
    return jnp.asarray(x, dtype), jnp.asarray(w, dtype)


def _expected(x, w, transposed: bool) -> np.ndarray:
    """float64 product of the operands as given (bf16 values widened exactly)."""
    x64, w64 = (np.asarray(a.astype(jnp.float32), np.float64) for a in (x, w))
    return x64 @ (w64.T if transposed else w64)


# Rows 1..16 (the kernel's groups of 4 and every remainder after a full group, NT's 1 / 2 /
# 4-row blocks); D with a short last 16-row pass (70) and split into pieces for the threads with
# a short pass in each (200: pieces of 100 on 2 threads), F with a tail past its 64-column
# register blocks (80); NT's F not a multiple of any block (37) and D over several vectors.
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 6, 7, 14, 16])
@pytest.mark.parametrize("transposed,d,f", [(False, 70, 80), (False, 200, 80),
                                            (False, 576, 1536), (True, 64, 37),
                                            (True, 576, 1000)],
                         ids=["nn-tails", "nn-pieces", "nn-smollm2", "nt-tails", "nt-wide"])
def test_float32_matches_float64_numpy(rows, transposed, d, f):
    x, w = _operands(rows, d, f, transposed, jnp.float32, seed=rows)
    got = jax.jit(functools.partial(cpu_matmul.matmul, transposed=transposed))(x, w)
    assert got.shape == (rows, f) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), _expected(x, w, transposed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows", [1, 2, 3, 6])
@pytest.mark.parametrize("transposed,d,f", [(False, 128, 80), (True, 96, 37)], ids=["nn", "nt"])
def test_bfloat16_operands_accumulate_in_float32(rows, transposed, d, f):
    x, w = _operands(rows, d, f, transposed, jnp.bfloat16, seed=7 + rows)
    wide = cpu_matmul.matmul(x, w, transposed=transposed, out_dtype=jnp.float32)
    assert wide.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(wide), _expected(x, w, transposed), rtol=1e-5, atol=1e-4)
    narrow = cpu_matmul.matmul(x, w, transposed=transposed)   # x's dtype: bf16
    assert narrow.dtype == jnp.bfloat16
    # Rounded once, to nearest even, from the same float32 sums (as XLA converts).
    np.testing.assert_array_equal(np.asarray(narrow), np.asarray(wide.astype(jnp.bfloat16)))


@pytest.mark.parametrize("x_dtype,w_dtype", [(jnp.float32, jnp.bfloat16),
                                             (jnp.bfloat16, jnp.float32)])
@pytest.mark.parametrize("transposed", [False, True], ids=["nn", "nt"])
def test_mixed_operand_dtypes(x_dtype, w_dtype, transposed):
    x, _ = _operands(2, 64, 32, transposed, x_dtype, seed=3)
    _, w = _operands(2, 64, 32, transposed, w_dtype, seed=3)
    got = cpu_matmul.matmul(x, w, transposed=transposed, out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(got), _expected(x, w, transposed), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("x_shape,w_shape,transposed,why", [
    ((17, 64), (64, 32), False, "17 rows"),            # over MAX_ROWS
    ((0, 64), (64, 32), False, "no rows"),
    ((2, 64), (64, 24), False, "F not a multiple of 16"),
    ((2, 24), (32, 24), True, "D not a multiple of 16"),
    ((2, 64), (48, 32), False, "mismatched D"),
    ((2, 2, 64), (64, 32), False, "3-D x"),
])
def test_unsupported_operands_raise_before_any_work(x_shape, w_shape, transposed, why):
    x, w = jnp.zeros(x_shape, jnp.float32), jnp.zeros(w_shape, jnp.float32)
    assert not cpu_matmul.supports(x, w, transposed, jnp.float32), why
    with pytest.raises(ValueError, match="cpu matmul: unsupported operands"):
        cpu_matmul.matmul(x, w, transposed=transposed)


def test_float16_is_unsupported():
    x, w = jnp.zeros((2, 64), jnp.float16), jnp.zeros((64, 32), jnp.float16)
    with pytest.raises(ValueError, match="float16"):
        cpu_matmul.matmul(x, w)


@pytest.mark.parametrize("rows,dtype,columns,transposed,expected", [
    (1, jnp.float32, 1536, False, True), (14, jnp.float32, 1536, False, True),
    (16, jnp.float32, 1536, False, False), (4, jnp.bfloat16, 1536, False, True),
    (5, jnp.bfloat16, 1536, False, False), (0, jnp.float32, 1536, False, False),
    # NN's partial sums [rows, columns] must stay cache-sized; NT keeps none.
    (14, jnp.float32, 32000, False, False), (14, jnp.float32, 49152, True, True),
])
def test_is_faster_thresholds(rows, dtype, columns, transposed, expected):
    x = jax.ShapeDtypeStruct((rows, 64), dtype)
    w = jax.ShapeDtypeStruct((columns, 64) if transposed else (64, columns), dtype)
    assert cpu_matmul.is_faster(x, w, transposed) is expected


def _custom_call_targets(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


@pytest.mark.parametrize("rows,uses_kernel", [(1, True), (14, True), (64, False)])
@pytest.mark.parametrize("dims,transposed", [(NN, False), (NT, True)], ids=["dense", "tied-head"])
def test_model_dot_general_routes_few_rows_to_the_kernel(rows, uses_kernel, dims, transposed):
    x, w = _operands(rows, 64, 48, transposed, jnp.float32, seed=rows)
    fn = functools.partial(layers.dot_general, dimension_numbers=dims)
    text = _custom_call_targets(fn, x, w)
    assert ("jaxllm_matmul_cpu" in text) is uses_kernel
    np.testing.assert_allclose(np.asarray(jax.jit(fn)(x, w)), _expected(x, w, transposed),
                               rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("rows,uses_kernel", [(4, True), (5, False)])
def test_model_dot_general_routes_bfloat16_and_keeps_its_output_dtype(rows, uses_kernel):
    x, w = _operands(rows, 64, 48, False, jnp.bfloat16, seed=rows)
    for preferred, dtype in ((None, jnp.bfloat16), (jnp.float32, jnp.float32)):
        fn = functools.partial(layers.dot_general, dimension_numbers=NN,
                               preferred_element_type=preferred)
        assert ("jaxllm_matmul_cpu" in _custom_call_targets(fn, x, w)) is uses_kernel
        got = jax.jit(fn)(x, w)
        assert got.dtype == dtype
        np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), _expected(x, w, False),
                                   rtol=1e-2, atol=1e-1)


def test_model_dot_general_output_dtype_follows_the_operands():
    """Mixed operands give lax.dot_general's result type, kernel or not."""
    x, _ = _operands(2, 64, 48, False, jnp.bfloat16)
    _, w = _operands(2, 64, 48, False, jnp.float32)
    fn = functools.partial(layers.dot_general, dimension_numbers=NN)
    assert jax.eval_shape(fn, x, w).dtype == jax.eval_shape(
        functools.partial(jax.lax.dot_general, dimension_numbers=NN), x, w).dtype == jnp.float32


def test_model_dot_general_keeps_batched_or_odd_shapes_on_xla():
    x, w = _operands(2, 64, 24, False, jnp.float32)   # F = 24: not a multiple of 16
    assert "jaxllm_matmul_cpu" not in _custom_call_targets(
        functools.partial(layers.dot_general, dimension_numbers=NN), x, w)
    batched = (((2,), (1,)), ((0,), (0,)))            # a batched contraction: never the kernel
    a, b = jnp.ones((2, 3, 16)), jnp.ones((2, 16, 32))
    assert "jaxllm_matmul_cpu" not in _custom_call_targets(
        functools.partial(layers.dot_general, dimension_numbers=batched), a, b)


def test_without_a_compiler_the_model_falls_back_to_xla(monkeypatch, caplog):
    # A fresh, unregistered copy of the loader (XLA refuses a second registration of a target).
    monkeypatch.setattr(cpu_matmul, "_target", functools.cache(cpu_matmul._target.__wrapped__))
    monkeypatch.setenv("CXX", "no-such-compiler")
    x, w = _operands(1, 64, 48, False, jnp.float32)
    fn = functools.partial(layers.dot_general, dimension_numbers=NN)
    with caplog.at_level(logging.WARNING):
        text = _custom_call_targets(fn, x, w)
        assert not cpu_matmul.is_available()
    assert "jaxllm_matmul_cpu" not in text and "no-such-compiler" in caplog.text
    with pytest.raises(RuntimeError, match="could not be built"):
        cpu_matmul.matmul(x, w)
