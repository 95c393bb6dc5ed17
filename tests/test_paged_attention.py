"""The reference ragged paged attention against plain dense causal attention, cache included.

Every case also runs with sliding windows shorter than some rows' context and new tokens
(``WINDOWS``), against dense attention masked the way transformers masks it.

Each case builds sequences with ``context_len`` tokens already in the cache (written there by
the test, at slots of random non-contiguous blocks) and ``num_new`` tokens in this step, lays
them out the way the model runner does (flat tokens, padding tokens with row -1 writing into
block 0, padding rows with all-zero block tables), and checks:
  * every real token's output equals dense causal attention over its whole sequence;
  * the cache holds the new K/V at their slots, and nothing else changed outside block 0.
"""

from __future__ import annotations

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kernels.paged_attention.reference import paged_attention, write_kv

NUM_LAYERS = 2

# (context_len, num_new) per row.
SCENARIOS = {
    "decode_only": [(5, 1), (12, 1), (1, 1), (16, 1)],
    "prefill_only": [(0, 7), (0, 3), (0, 1), (0, 9)],
    "chunk_with_context": [(8, 5), (3, 6), (4, 4)],
    "mixed": [(9, 1), (0, 6), (4, 3), (17, 1), (0, 1)],
}
# Every scenario is padded to the same shapes, so each grid point compiles once (~1.2 s on CPU).
NUM_TOKENS, NUM_ROWS, MAX_CONTEXT = 24, 8, 17
# Sliding windows: None (full attention), 1 (only itself), 4 (shorter than most contexts and
# than the 9-token prefill), 0 (a traced "no window" layer under a scan).
WINDOWS = [None, 1, 4, 0]

# (block_size, num_heads, num_kv_heads, head_dim): every pair of block size, head layout
# (GQA ratio 1, 2, 3) and head dim appears at least once.
GRID = [
    (4, 4, 4, 16), (4, 4, 2, 32), (4, 6, 2, 16),
    (8, 4, 4, 32), (8, 4, 2, 16), (8, 6, 2, 32),
    (16, 4, 4, 16), (16, 4, 2, 32), (16, 6, 2, 32),
]


def padded_sizes(block_size: int) -> dict:
    """Block-table width and pool size for ``block_size``, shared by every scenario."""
    num_blocks = 1 + max(sum(-(-(c + n) // block_size) for c, n in rows) for rows in SCENARIOS.values())
    return dict(table_width=-(-MAX_CONTEXT // block_size) + 1, num_blocks=num_blocks + 5)


def dense_causal_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float,
                           query_offset: int, window: int | None = None) -> np.ndarray:
    """q: [Q, N, H] at positions query_offset.., k/v: [C, K, H] at positions 0..; float64.
    With a window W > 0, query position p sees keys p - W < key <= p (transformers' mask)."""
    num_q, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    k = np.repeat(k, group, axis=1)                                   # query head n -> kv head n // G
    v = np.repeat(v, group, axis=1)
    scores = np.einsum("qnh,cnh->nqc", q, k) * scale
    key_pos, query_pos = np.arange(k.shape[0])[None, :], (query_offset + np.arange(num_q))[:, None]
    causal = key_pos <= query_pos
    if window:
        causal &= key_pos > query_pos - window
    scores = np.where(causal[None], scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("nqc,cnh->qnh", probs, v)


def build_case(rng, rows, block_size, num_heads, num_kv_heads, head_dim, *,
               num_tokens, num_rows, table_width, num_blocks):
    num_blocks_per_row = [-(-(ctx + new) // block_size) for ctx, new in rows]
    assert 1 + sum(num_blocks_per_row) <= num_blocks
    free = rng.permutation(np.arange(1, num_blocks))                 # shuffled, never block 0
    block_ids, start = [], 0
    for n in num_blocks_per_row:
        block_ids.append(free[start:start + n])
        start += n
    shape = (NUM_LAYERS, num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = rng.normal(size=shape).astype(np.float32)              # garbage everywhere
    v_cache = rng.normal(size=shape).astype(np.float32)

    seq_k = [rng.normal(size=(ctx + new, num_kv_heads, head_dim)).astype(np.float32) for ctx, new in rows]
    seq_v = [rng.normal(size=(ctx + new, num_kv_heads, head_dim)).astype(np.float32) for ctx, new in rows]
    seq_q = [rng.normal(size=(new, num_heads, head_dim)).astype(np.float32) for _, new in rows]

    def slot(row, pos):
        return block_ids[row][pos // block_size] * block_size + pos % block_size

    layer = int(rng.integers(NUM_LAYERS))                            # the other layer must stay put
    for row, (ctx, _) in enumerate(rows):                             # the cached context
        for pos in range(ctx):
            block, offset = divmod(slot(row, pos), block_size)
            k_cache[layer, block, offset] = seq_k[row][pos]
            v_cache[layer, block, offset] = seq_v[row][pos]

    positions, slots, token_rows = [], [], []
    for row, (ctx, new) in enumerate(rows):
        positions += range(ctx, ctx + new)
        slots += [slot(row, p) for p in range(ctx, ctx + new)]
        token_rows += [row] * new
    num_real = len(positions)
    num_pad_tokens = num_tokens - num_real
    positions += [0] * num_pad_tokens
    slots += [i % block_size for i in range(num_pad_tokens)]          # padding writes to block 0
    token_rows += [-1] * num_pad_tokens
    block_tables = np.zeros((num_rows, table_width), np.int32)
    for row, (ctx, _) in enumerate(rows):
        n = -(-ctx // block_size)
        block_tables[row, :n] = block_ids[row][:n]
    context_lens = np.zeros(num_rows, np.int32)
    context_lens[:len(rows)] = [ctx for ctx, _ in rows]
    ends = np.cumsum([new for _, new in rows]) - 1
    logits_indices = np.zeros(num_rows, np.int32)
    logits_indices[:len(rows)] = ends

    def new_part(arrays, shape_tail):
        real = np.concatenate([a[ctx:] for a, (ctx, _) in zip(arrays, rows)])
        pad = rng.normal(size=(num_pad_tokens, *shape_tail)).astype(np.float32) * 10
        return np.concatenate([real, pad])

    q = np.concatenate([np.concatenate(seq_q),
                        rng.normal(size=(num_pad_tokens, num_heads, head_dim)).astype(np.float32)])
    metadata = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32), slot_mapping=jnp.asarray(slots, jnp.int32),
        token_rows=jnp.asarray(token_rows, jnp.int32), block_tables=jnp.asarray(block_tables),
        context_lens=jnp.asarray(context_lens))
    return dict(q=q, k=new_part(seq_k, (num_kv_heads, head_dim)),
                v=new_part(seq_v, (num_kv_heads, head_dim)), k_cache=k_cache, v_cache=v_cache,
                metadata=metadata, layer=layer, num_real=num_real, slots=np.asarray(slots[:num_real]),
                seq_q=seq_q, seq_k=seq_k, seq_v=seq_v)


def check_case(case, rows, scale, out, k_cache, v_cache, window=None):
    out = np.asarray(out)
    expected = np.concatenate([
        dense_causal_attention(case["seq_q"][row].astype(np.float64), case["seq_k"][row].astype(np.float64),
                               case["seq_v"][row].astype(np.float64), scale, query_offset=ctx,
                               window=window)
        for row, (ctx, _) in enumerate(rows)])
    np.testing.assert_allclose(out[:case["num_real"]], expected, atol=1e-5, rtol=1e-5)
    assert not np.isnan(out).any()

    layer, slots = case["layer"], case["slots"]
    for name, new_cache, old_cache, new in (("k", k_cache, case["k_cache"], case["k"]),
                                            ("v", v_cache, case["v_cache"], case["v"])):
        new_cache = np.asarray(new_cache)
        want = old_cache.copy()
        flat = want.reshape(NUM_LAYERS, -1, *want.shape[3:])
        flat[layer, slots] = new[:case["num_real"]]
        # Blocks other than 0 in this layer: old contents plus exactly the new K/V.
        np.testing.assert_array_equal(new_cache[layer, 1:], want[layer, 1:], err_msg=f"{name}_cache")
        # Every other layer is untouched, block 0 included.
        others = [other for other in range(NUM_LAYERS) if other != layer]
        np.testing.assert_array_equal(new_cache[others], old_cache[others], err_msg=f"{name}_cache")


_paged_attention_jit = jax.jit(paged_attention, static_argnames="scale")


def call_windowed(fn, case, scale, window):
    """fn(...) on a case under jit with ``layer`` traced, and the window static (None) or
    traced (an int32 scalar, as under a scan over layers of different kinds)."""
    if window is None:
        return jax.jit(lambda *a: fn(*a, scale=scale))(
            case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"], case["layer"],
            case["metadata"])
    return jax.jit(lambda *a, w: fn(*a, scale=scale, sliding_window=w))(
        case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"], case["layer"],
        case["metadata"], w=jnp.int32(window))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim", GRID)
def test_paged_attention_matches_dense_causal_attention(block_size, num_heads, num_kv_heads,
                                                        head_dim, scenario):
    key = repr((block_size, num_heads, num_kv_heads, head_dim, scenario)).encode()
    rng = np.random.default_rng(zlib.crc32(key))
    rows = SCENARIOS[scenario]
    case = build_case(rng, rows, block_size, num_heads, num_kv_heads, head_dim,
                      num_tokens=NUM_TOKENS, num_rows=NUM_ROWS, **padded_sizes(block_size))
    scale = 0.7 * head_dim ** -0.5                                    # not the default: it must be used
    # Under jit, as in the step: ``layer`` is traced.
    out, k_cache, v_cache = _paged_attention_jit(
        case["q"], case["k"], case["v"], case["k_cache"], case["v_cache"], case["layer"],
        case["metadata"], scale=scale)
    assert out.shape == case["q"].shape and out.dtype == jnp.float32
    check_case(case, rows, scale, out, k_cache, v_cache)


@pytest.mark.parametrize("window", WINDOWS[1:])
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_paged_attention_sliding_window_matches_dense_masked_attention(scenario, window):
    """Windowed decode, prefill and mixed steps: keys older than the window are masked in the
    cached context and among the step's own tokens alike (window 0 = full attention)."""
    block_size, num_heads, num_kv_heads, head_dim = 4, 6, 2, 16
    rng = np.random.default_rng(zlib.crc32(repr((scenario, window)).encode()))
    rows = SCENARIOS[scenario]
    case = build_case(rng, rows, block_size, num_heads, num_kv_heads, head_dim,
                      num_tokens=NUM_TOKENS, num_rows=NUM_ROWS, **padded_sizes(block_size))
    scale = 0.7 * head_dim ** -0.5
    out, k_cache, v_cache = call_windowed(paged_attention, case, scale, window)
    check_case(case, rows, scale, out, k_cache, v_cache, window=window)


def test_write_kv_writes_one_layer_at_the_given_slots():
    cache = jnp.zeros((2, 3, 2, 1, 1))                                # L=2, B=3, Z=2, K=1, H=1
    new = jnp.array([[[1.0]], [[2.0]], [[3.0]]])                      # [T=3, K, H]
    out = np.asarray(write_kv(cache, new, 1, jnp.array([5, 2, 3])))
    expected = np.zeros((2, 3, 2, 1, 1))
    expected[1, 2, 1] = 1.0                                           # slot 5 = block 2, offset 1
    expected[1, 1, 0] = 2.0                                           # slot 2 = block 1, offset 0
    expected[1, 1, 1] = 3.0
    np.testing.assert_array_equal(out, expected)
