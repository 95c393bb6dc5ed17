"""The Pallas GPU attention kernel, run in interpret mode on CPU, against the reference.

Cases come from ``test_paged_attention.build_case``: cached context at slots of shuffled,
non-contiguous blocks, flat ragged tokens, padding tokens (row -1, writing into block 0) and
padding rows. One mixed step holds decodes (one of them on a context of exactly two blocks), a
prefill chunk on top of existing context and a fresh prefill. Each check asserts the output of
every real token, finite output for padding tokens, and both updated caches.

Sliding windows are checked against dense masked attention (``test_paged_attention.check_case``)
with the window traced, as under a scan over layers of different kinds (one compilation runs
every window of a test), and static. A long-context case poisons with NaN every cached chunk
that lies wholly before the window of all its row's tokens: reading one at all (even masked,
as 0 * NaN) would show in the output, so the test proves those chunks are skipped.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllm.kernels import default_attention, get_attention
from jaxllm.kernels.paged_attention import pallas_gpu, reference
from test_paged_attention import SCENARIOS, WINDOWS, build_case, check_case, padded_sizes

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
    return case, (*args, case["layer"], case["metadata"])


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


WINDOW_SCALE = 0.7 * HEAD_DIM ** -0.5
# Context chunks of two blocks, so the scenarios' contexts (up to 17) span two chunks and a
# window of 1 or 4 skips the first one.
WINDOW_TILING = {"block_kv": 16}


def _windowed_case(rows, *, num_tokens=NUM_TOKENS, num_rows=NUM_ROWS, **sizes):
    rng = np.random.default_rng(zlib.crc32(repr(("window", rows)).encode()))
    return build_case(rng, rows, 8, 8, 2, HEAD_DIM, num_tokens=num_tokens, num_rows=num_rows,
                      **(sizes or padded_sizes(8)))


def _case_args(case):
    return (case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"], case["layer"],
            case["metadata"])


def check_traced_windows(rows, case, windows, **tiling):
    """One compilation with the window traced, run and checked at each of ``windows``."""
    kernel = jax.jit(lambda *a, w: pallas_gpu.paged_attention(
        *a, scale=WINDOW_SCALE, sliding_window=w, interpret=True, **tiling))
    for window in windows:
        out, k_cache, v_cache = kernel(*_case_args(case), w=jnp.int32(window))
        check_case(case, rows, WINDOW_SCALE, out, k_cache, v_cache, window=window)


def check_static_window(rows, case, window, **tiling):
    kernel = jax.jit(lambda *a: pallas_gpu.paged_attention(
        *a, scale=WINDOW_SCALE, sliding_window=window, interpret=True, **tiling))
    out, k_cache, v_cache = kernel(*_case_args(case))
    check_case(case, rows, WINDOW_SCALE, out, k_cache, v_cache, window=window)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_pallas_sliding_window_matches_dense_masked_attention(scenario):
    """Windows 1 (only itself), 4 (shorter than most contexts and the 9-token prefill) and 0
    (a full-attention layer under the same scan), traced."""
    rows = SCENARIOS[scenario]
    check_traced_windows(rows, _windowed_case(rows), WINDOWS[1:], **WINDOW_TILING)


def test_pallas_static_window_matches_dense_masked_attention():
    rows = SCENARIOS["mixed"]
    check_static_window(rows, _windowed_case(rows), 4, **WINDOW_TILING)


def test_pallas_static_window_of_zero_is_the_full_attention_kernel():
    """A static window <= 0 traces exactly what None does: no window operand read, no masks."""
    case = _windowed_case(SCENARIOS["mixed"])

    def trace(window):
        return str(jax.make_jaxpr(lambda *a: pallas_gpu.paged_attention(
            *a, scale=WINDOW_SCALE, sliding_window=window, interpret=True))(*_case_args(case)))
    assert trace(0) == trace(-3) == trace(None)
    assert trace(0) != trace(4)


@pytest.mark.parametrize("rows", [DECODE_ONLY, MIXED], ids=["decode_only", "mixed"])
def test_pallas_sliding_window_with_context_splits(rows):
    """Four splits of two chunks (contexts up to 30): a window of 4 leaves the decodes one chunk
    (splits 1-3 empty), a window of 1 one fully masked chunk; the merge must give them no weight
    and no NaN. Window 0 shares the splits as without a window."""
    case = _windowed_case(rows, table_width=-(-MAX_CONTEXT // 8) + 1,
                          num_blocks=1 + sum(-(-(ctx + new) // 8) for ctx, new in rows) + 3)
    check_traced_windows(rows, case, (4, 1, 0), num_splits=4, block_kv=16)


# Long contexts under a window of 24: a decode on 230 tokens, a 6-token chunk on 200, a decode
# on 97, and a 100-token fresh prefill, whose last tile (tokens 96-99; tiles of 16) also skips
# the first in-step chunk of 64 keys (checked for its output only: earlier tiles read those keys).
LONG_ROWS = [(230, 1), (200, 6), (97, 1), (0, 100)]
LONG_WINDOW = 24


def _long_case():
    case = _windowed_case(LONG_ROWS, num_tokens=128, num_rows=4, table_width=-(-230 // 8) + 1,
                          num_blocks=1 + sum(-(-(ctx + new) // 8) for ctx, new in LONG_ROWS) + 3)
    # NaN in every 64-key chunk (so every 16-key one too) before the window of all of a row's
    # tokens: its first token's window start.
    tables = np.asarray(case["metadata"].block_tables)
    for row, (ctx, _) in enumerate(LONG_ROWS):
        for pos in range(max(ctx - LONG_WINDOW + 1, 0) // 64 * 64):
            block = tables[row, pos // 8]
            for cache in (case["k_cache"], case["v_cache"]):
                cache[case["layer"], block, pos % 8] = np.nan
    return case


def test_pallas_sliding_window_skips_chunks_before_the_window_on_long_contexts():
    case = _long_case()
    assert np.isnan(case["v_cache"]).sum() > 0
    check_traced_windows(LONG_ROWS, case, (LONG_WINDOW,), num_splits=4, block_kv=16)
    check_static_window(LONG_ROWS, case, LONG_WINDOW)


@pytest.mark.parametrize("window", [None, 4, "traced"])
def test_pallas_kernel_lowers_to_triton_for_cuda(window):
    """Lowering for CUDA needs no GPU (JAX then targets the oldest compute capability Triton
    supports) and runs the Triton lowering rule of every op in the kernel, which interpret mode
    never does: an op without one fails here, not first on a GPU machine."""
    case = _windowed_case(SCENARIOS["mixed"])
    args = [jnp.asarray(case[name], jnp.bfloat16) for name in ("q", "k", "v", "k_cache", "v_cache")]
    args = (*args, case["layer"], case["metadata"])
    tiling = {"num_splits": 4, "block_kv": 16}
    if window == "traced":
        traced = jax.jit(lambda *a, w: pallas_gpu.paged_attention(
            *a, scale=0.1, sliding_window=w, **tiling)).trace(*args, w=jnp.int32(4))
    else:
        traced = jax.jit(lambda *a: pallas_gpu.paged_attention(
            *a, scale=0.1, sliding_window=window, **tiling)).trace(*args)
    assert "__gpu$xla.gpu.triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("block_size, head_dim", [(4, 64), (8, 48)])
def test_pallas_attention_rejects_unsupported_shapes(block_size, head_dim):
    q = jnp.zeros((4, 2, head_dim))
    k = jnp.zeros((4, 1, head_dim))
    cache = jnp.zeros((1, 3, block_size, 1, head_dim))
    inputs = build_case(np.random.default_rng(0), [(0, 1)], 8, 2, 1, 16, num_tokens=4,
                        num_rows=1, table_width=1, num_blocks=3)["metadata"]
    with pytest.raises(ValueError, match=f"unsupported {'block size' if head_dim == 64 else 'head dim'}"):
        pallas_gpu.paged_attention(q, k, k, cache, cache, 0, inputs, scale=1.0, interpret=True)


def test_attention_registry_and_platform_default():
    assert get_attention("pallas_gpu") is pallas_gpu.paged_attention
    assert get_attention("reference") is reference.paged_attention
    assert default_attention("gpu") == default_attention("cuda") == "pallas_gpu"
    assert default_attention("tpu") == "reference"                 # CPU: test_cpu_attention
    with pytest.raises(ValueError, match="unknown attention implementation"):
        get_attention("nope")
