"""The Pallas GPU attention kernel, run in interpret mode on CPU, against the reference.

Cases come from ``test_paged_attention.build_case``: cached context at slots of shuffled,
non-contiguous blocks, flat ragged tokens, padding tokens (row -1, writing into block 0) and
padding rows. One mixed step holds decodes (one of them on a context of exactly two blocks), a
prefill chunk on top of existing context and a fresh prefill. Each check asserts the output of
every real token, finite output for padding tokens, and both updated caches.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllm.kernels import default_attention, get_attention
from jaxllm.kernels.paged_attention import pallas_gpu, reference
from test_paged_attention import build_case

# (context_len, num_new) per row.
MIXED = [(13, 1), (30, 1), (16, 1), (21, 7), (0, 9)]
DECODE_ONLY = [(30, 1), (7, 1), (0, 1), (24, 1)]
NUM_TOKENS, NUM_ROWS, MAX_CONTEXT, HEAD_DIM = 24, 8, 30, 64

# (block_size, num_heads, num_kv_heads, dtype): every pair of block size, GQA ratio (1, 2, 4)
# and dtype appears once.
GRID = [
    (8, 4, 4, jnp.float32), (8, 4, 2, jnp.bfloat16), (8, 8, 2, jnp.float32),
    (16, 4, 4, jnp.bfloat16), (16, 4, 2, jnp.float32), (16, 8, 2, jnp.bfloat16),
]
TOLERANCE = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def make_case(rows, block_size, num_heads, num_kv_heads, dtype):
    key = repr((rows, block_size, num_heads, num_kv_heads, jnp.dtype(dtype).name)).encode()
    rng = np.random.default_rng(zlib.crc32(key))
    num_blocks = 1 + sum(-(-(ctx + new) // block_size) for ctx, new in rows) + 3
    case = build_case(rng, rows, block_size, num_heads, num_kv_heads, HEAD_DIM,
                      num_tokens=NUM_TOKENS, num_rows=NUM_ROWS,
                      table_width=-(-MAX_CONTEXT // block_size) + 1, num_blocks=num_blocks)
    args = [jnp.asarray(case[name], dtype) for name in ("q", "k", "v", "k_cache", "v_cache")]
    return case, (*args, case["layer"], case["inputs"])


@jax.jit
def _reference(q, k, v, k_cache, v_cache, layer, inputs):
    return reference.paged_attention(q, k, v, k_cache, v_cache, layer, inputs, scale=0.1)


def check_against_reference(rows, block_size, num_heads, num_kv_heads, dtype, **tiling):
    case, args = make_case(rows, block_size, num_heads, num_kv_heads, dtype)
    # Under jit, as in the step: ``layer`` is traced.
    kernel = jax.jit(lambda *a: pallas_gpu.paged_attention(*a, scale=0.1, interpret=True, **tiling))
    out, k_cache, v_cache = kernel(*args)
    want_out, want_k_cache, want_v_cache = _reference(*args)

    assert out.shape == args[0].shape and out.dtype == dtype
    out = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out).all()                                     # padding tokens included
    num_real, tol = case["num_real"], TOLERANCE[dtype]
    np.testing.assert_allclose(out[:num_real], np.asarray(want_out.astype(jnp.float32))[:num_real],
                               atol=tol, rtol=tol)
    np.testing.assert_array_equal(np.asarray(k_cache), np.asarray(want_k_cache))
    np.testing.assert_array_equal(np.asarray(v_cache), np.asarray(want_v_cache))


@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, dtype", GRID)
def test_pallas_attention_matches_reference_on_mixed_step(block_size, num_heads, num_kv_heads,
                                                          dtype):
    check_against_reference(MIXED, block_size, num_heads, num_kv_heads, dtype)


@pytest.mark.parametrize("rows, tiling", [
    # Context split 4 ways, two blocks per context chunk.
    (MIXED, {"num_splits": 4, "block_kv": 16}),
    # Prefill rows cut into several tiles; a split with no context chunks at all.
    (MIXED, {"block_q": 8, "block_kv": 32, "num_splits": 2}),
    (DECODE_ONLY, {"num_splits": 2, "block_kv": 16}),
], ids=["splits4", "tiles_and_empty_split", "decode_only"])
def test_pallas_attention_matches_reference_with_forced_tiling(rows, tiling):
    check_against_reference(rows, 8, 8, 2, jnp.float32, **tiling)


@pytest.mark.parametrize("block_size, head_dim", [(4, 64), (8, 48)])
def test_pallas_attention_rejects_unsupported_shapes(block_size, head_dim):
    q = jnp.zeros((4, 2, head_dim))
    k = jnp.zeros((4, 1, head_dim))
    cache = jnp.zeros((1, 3, block_size, 1, head_dim))
    inputs = build_case(np.random.default_rng(0), [(0, 1)], 8, 2, 1, 16, num_tokens=4,
                        num_rows=1, table_width=1, num_blocks=3)["inputs"]
    with pytest.raises(ValueError, match=f"unsupported {'block size' if head_dim == 64 else 'head dim'}"):
        pallas_gpu.paged_attention(q, k, k, cache, cache, 0, inputs, scale=1.0, interpret=True)


def test_attention_registry_and_platform_default():
    assert get_attention("pallas_gpu") is pallas_gpu.paged_attention
    assert get_attention("reference") is reference.paged_attention
    assert default_attention("gpu") == default_attention("cuda") == "pallas_gpu"
    assert default_attention("tpu") == "reference"                 # CPU: test_cpu_attention
    with pytest.raises(ValueError, match="unknown attention implementation"):
        get_attention("nope")
