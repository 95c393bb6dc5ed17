"""Ragged paged attention as a Pallas kernel for NVIDIA GPUs (Triton lowering).

Shape legend: T tokens, N query heads, K kv heads, G = N // K, H head dim, L layers,
B blocks in the pool, Z block size, S rows, P blocks per row. Kernel tiles: Q query tokens per
tile, M = Q * G' query rows per tile (G' = G padded to a power of two), C context keys per chunk,
E in-step keys per chunk, X context splits.

Same signature and semantics as ``reference.paged_attention``: one flat step mixes decodes and
prefill chunks; each token attends, in one softmax, to
  * its row's cached context (positions < context_lens[row]), read block by block through the
    row's block table, and
  * the tokens of this step in its own row up to itself, read straight from ``k`` and ``v``
    (the block tables cover only the cached context, as the model runner builds them).

Layout of the work (the organisation of vLLM's Triton "unified attention", written for Pallas):
  1. The new K/V go into the cache with the reference ``write_kv`` (an XLA scatter; the cache is
     donated, so it updates in place). The kernel never reads those slots back.
  2. The tokens of each row are cut into tiles of Q consecutive tokens (a row's tokens are
     contiguous in the step and in position order, which is how the model runner lays them
     out). A tile and one kv head make a program: its M = Q * G' query rows (the tile's tokens
     times the G query heads sharing that kv head) are one [M, H] matrix, so every K/V chunk is
     loaded once per tile and used by all M rows in one matmul. Decode rows get one tile each;
     a prefill chunk of 512 tokens gets 512 / Q. Tile metadata (row, first token, number of
     tokens) is computed in XLA before the kernel, over the static bound on the tile count.
  3. Per program, an online softmax in float32 (base 2, the scale folded in) runs first over the
     context chunks of C keys (C / Z blocks gathered by block id), masked past the context
     length, then over the in-step keys of the row in chunks of E, masked causally by token
     index.
  4. When there are too few programs to fill the GPU (small decode batches), the context chunks
     are split X ways along a third grid axis; each split writes its normalised partial output
     with its running max and sum, and XLA merges the splits by log-sum-exp.

Sliding windows (``metadata``): the window W reaches the kernel as an operand, so a traced
per-layer window under ``lax.scan`` runs one compiled kernel for every layer. A token's position
is its row's context length plus its index among the row's tokens (the model runner's layout),
so its window starts at key position max(0, p - W + 1). A program starts its context loop at
the chunk holding its first token's window start, the smallest of the tile's (a decode on 4k
context with a 512 window reads at most 9 chunks of 64, not 64), shares the chunks from there
to the end of the context among the X splits, and likewise starts the in-step loop at that
token's window start; keys before each query row's own window start are masked in the chunks
it reads. A split left with no chunk writes a zero sum with a max of -1e30, which gets zero
weight in the merge (the last split always holds the token itself, so no token's total is
zero). A static window also caps X (fewer chunks to share); a traced one cannot. A static None
or int <= 0 compiles the kernel without any of this; a traced value <= 0 turns it off at run
time.

The minimum Triton matmul is 16 x 16 x 16: M, C and E are at least 16, and G' * Q >= 16 by
choosing Q. Padded tokens (row -1) belong to no tile; their output is set to zero.

Quantized caches (``quantized_kv``: int8 or float8_e4m3fn values, a float32 scale per token and
kv head): a context chunk's values and its C scales are loaded together and dequantized into q's
dtype before the two matmuls; this step's keys reach the kernel already as the cache stores
them. Checked in interpret mode only; not timed on a GPU yet.

Measured on one H200 (jax 0.11.2, bf16, N=32, K=8, H=128, Z=16; per call, 8 dependent calls in
one jit, write_kv included), kernel vs reference: decode 64 rows at ~2k context 0.33 vs 0.58 ms;
256 rows at ~1k 0.58 vs 1.26 ms; 1 row at 4k 0.041 vs 0.076 ms; a 512-token fresh prefill
0.085 vs 0.18 ms; a 512-token chunk on 3k context 0.23 vs 3.96 ms. Decode reads the cache at
about 1.6 TB/s, 60% of an XLA reduction over the same bytes: the headroom left is there.
Windowed steps are checked in interpret mode only; their GPU timings are not measured yet
(``benchmarks/gpu_benchmark.py``'s decode sweep has a window-512 case for that).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV, stored
from jaxllm.kernels.paged_attention.reference import write_kv

SUPPORTED_BLOCK_SIZES = (8, 16, 32, 64)
SUPPORTED_HEAD_DIMS = (64, 128, 256)

_MASKED = -1e30           # finite: a row with nothing to attend to yet gives no NaN
_LOG2E = math.log2(math.e)
_MIN_DOT = 16             # smallest Triton matmul dimension
_MAX_ROWS_PER_TILE = 64   # M for prefill tiles: K/V reuse vs registers
_TARGET_PROGRAMS = 256    # about two waves of an H100/H200's 132 SMs; below it, split the context
_MAX_SPLITS = 16


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: int | jax.Array, metadata: AttentionMetadata,
                    *, scale: float, sliding_window: int | jax.Array | None = None,
                    interpret: bool = False, block_q: int | None = None,
                    block_kv: int | None = None, num_splits: int | None = None,
                    num_warps: int = 4, num_stages: int = 2,
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of a ragged batch over a paged KV cache; writes the new K/V.

    Args:
        q: [T, N, H] queries of this step's tokens (rotary already applied).
        k, v: [T, K, H] keys and values of this step's tokens.
        k_cache, v_cache: [L, B, Z, K, H] the whole cache: float arrays or ``QuantizedKV``.
        layer: which layer's cache to read and write.
        metadata: the step's token layout; each row's tokens are contiguous and in position order.
        sliding_window: this layer's window (``metadata``); None or <= 0: full attention.
        scale: softmax scale, usually head_dim ** -0.5.
        interpret: run in Pallas interpret mode (CPU tests).
        block_q: Q, query tokens per tile (power of two); default from the step's shape.
        block_kv: C, context keys per chunk (power of two, a multiple of Z); default 64.
        num_splits: X, context splits (power of two); default from the number of programs.
        num_warps, num_stages: Triton's launch parameters (tuning knobs).

    Returns:
        (out [T, N, H] in q's dtype, updated k_cache, updated v_cache).

    Raises:
        ValueError: for a block size or head dim the kernel does not support.
    """
    _, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[2], k_cache.shape[3]
    if block_size not in SUPPORTED_BLOCK_SIZES:
        raise ValueError(f"pallas_gpu attention: unsupported block size {block_size}; "
                         f"supported: {SUPPORTED_BLOCK_SIZES}")
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise ValueError(f"pallas_gpu attention: unsupported head dim {head_dim}; "
                         f"supported: {SUPPORTED_HEAD_DIMS}")
    if num_heads % num_kv_heads:
        raise ValueError(f"pallas_gpu attention: {num_heads} query heads are not a multiple of "
                         f"{num_kv_heads} kv heads")
    k_cache = write_kv(k_cache, k, layer, metadata.slot_mapping)
    v_cache = write_kv(v_cache, v, layer, metadata.slot_mapping)
    k, v = stored(k, k_cache), stored(v, v_cache)
    out = ragged_attention(q, k, v, k_cache, v_cache, layer, metadata, scale=scale,
                           sliding_window=sliding_window, interpret=interpret, block_q=block_q,
                           block_kv=block_kv, num_splits=num_splits, num_warps=num_warps,
                           num_stages=num_stages)
    return out, k_cache, v_cache


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _choose_blocks(num_tokens: int, num_rows: int, group_padded: int, num_kv_heads: int,
                   max_context: int, block_size: int, block_q: int | None,
                   block_kv: int | None, num_splits: int | None,
                   static_window: int | None = None) -> tuple[int, int, int, int]:
    """Static tile sizes (Q, C, E, X) from the step's bucketed shapes.

    ``static_window``: a window known at trace time, which bounds the context chunks a decode
    tile reads (a traced window does not: the splits are then sized for the whole context).
    """
    if block_q is None:
        # Tokens per row on average: ~1 in decode buckets (small tiles waste less), large for
        # prefill chunks (bigger tiles read each K/V chunk for more queries).
        tokens_per_row = _pow2_at_least(-(-num_tokens // num_rows))
        max_q = max(1, _MAX_ROWS_PER_TILE // group_padded)
        block_q = min(max_q, max(tokens_per_row, _MIN_DOT // group_padded, 1))
    block_q = max(block_q, -(-_MIN_DOT // group_padded))
    block_kv = max(block_kv or 64, block_size, _MIN_DOT)
    block_new = max(_MIN_DOT, min(64, _pow2_at_least(num_tokens)))
    if num_splits is None:
        num_programs = _num_tiles(num_tokens, num_rows, block_q) * num_kv_heads
        num_chunks = -(-max_context // block_kv)
        if static_window:
            # Keys p - W + 1 .. p - 1 of the context, starting anywhere in a chunk.
            num_chunks = min(num_chunks, -(-(static_window - 1) // block_kv) + 1)
        num_splits = 1
        while (num_splits < _MAX_SPLITS and num_programs * num_splits < _TARGET_PROGRAMS
               and num_splits * 2 <= num_chunks):
            num_splits *= 2
    for name, value in (("block_q", block_q), ("block_kv", block_kv), ("num_splits", num_splits)):
        if value & (value - 1):
            raise ValueError(f"pallas_gpu attention: {name}={value} is not a power of two")
    return block_q, block_kv, block_new, num_splits


def _num_tiles(num_tokens: int, num_rows: int, block_q: int) -> int:
    # Row r needs ceil(n_r / Q) <= n_r / Q + 1 tiles, and every tile holds a token.
    return max(1, min(num_tokens, -(-num_tokens // block_q) + num_rows))


def _plan_tiles(metadata: AttentionMetadata, num_tiles: int, block_q: int) -> dict[str, jax.Array]:
    """Cuts each row's tokens into tiles of Q; returns [num_tiles] int32 arrays per field.

    Tiles past the last real one get zero tokens and zero context, so their programs do nothing.
    """
    num_tokens = metadata.token_rows.shape[0]
    num_rows = metadata.context_lens.shape[0]
    rows = jnp.where(metadata.token_rows >= 0, metadata.token_rows, num_rows)    # padding: dropped
    token_ids = jnp.arange(num_tokens, dtype=jnp.int32)
    q_lens = jnp.zeros(num_rows, jnp.int32).at[rows].add(1, mode="drop")        # [S]
    q_starts = jnp.full(num_rows, num_tokens, jnp.int32).at[rows].min(token_ids, mode="drop")
    tiles_per_row = -(-q_lens // block_q)
    tile_ends = jnp.cumsum(tiles_per_row)                                     # [S]
    tile_ids = jnp.arange(num_tiles, dtype=jnp.int32)
    # One fused comparison of every tile with every row: the default binary search is a while
    # loop, a few kernel launches per halving on a GPU, for at most a few hundred rows.
    tile_row = jnp.searchsorted(tile_ends, tile_ids, side="right",
                                method="compare_all").astype(jnp.int32)
    is_real = tile_row < num_rows
    row = jnp.minimum(tile_row, num_rows - 1)
    index_in_row = tile_ids - (tile_ends[row] - tiles_per_row[row])
    row_start = jnp.where(is_real, q_starts[row], 0)
    num_queries = jnp.clip(q_lens[row] - index_in_row * block_q, 0, block_q)
    return {
        "row": row,
        "row_start": row_start,                                               # row's first token
        "start": row_start + jnp.where(is_real, index_in_row * block_q, 0),   # tile's first token
        "num_queries": jnp.where(is_real, num_queries, 0),
        "context_len": jnp.where(is_real, metadata.context_lens[row], 0),
    }


def ragged_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                     v_cache: jax.Array, layer: int | jax.Array, metadata: AttentionMetadata, *,
                     scale: float, sliding_window: int | jax.Array | None = None,
                     interpret: bool = False, block_q: int | None = None,
                     block_kv: int | None = None, num_splits: int | None = None,
                     num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """The attention of ``paged_attention`` over a cache that already holds the context.

    Takes the arguments of ``paged_attention``. Returns out [T, N, H] in q's dtype; zero for
    padded tokens.
    """
    num_tokens, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[2], k_cache.shape[3]
    num_rows, blocks_per_row = metadata.block_tables.shape
    group = num_heads // num_kv_heads
    group_padded = _pow2_at_least(group)
    if isinstance(sliding_window, int) and sliding_window <= 0:
        sliding_window = None                                 # static full attention
    windowed = sliding_window is not None
    static_window = sliding_window if isinstance(sliding_window, int) else None
    block_q, block_kv, block_new, num_splits = _choose_blocks(
        num_tokens, num_rows, group_padded, num_kv_heads, blocks_per_row * block_size,
        block_size, block_q, block_kv, num_splits, static_window)
    num_tiles = _num_tiles(num_tokens, num_rows, block_q)
    tiles = _plan_tiles(metadata, num_tiles, block_q)

    # Pad so every fixed-size load stays in bounds: tokens by a tile (or key chunk) past the
    # end, query heads to G', block tables to whole chunks (extra entries point at block 0).
    q = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    q = jnp.pad(q, ((0, block_q), (0, 0), (0, group_padded - group), (0, 0)))  # [T+Q, K, G', H]
    k = jnp.pad(k, ((0, block_new), (0, 0), (0, 0)))                           # [T+E, K, H]
    v = jnp.pad(v, ((0, block_new), (0, 0), (0, 0)))
    blocks_per_chunk = block_kv // block_size
    block_tables = jnp.pad(metadata.block_tables, ((0, 0), (0, -blocks_per_row % blocks_per_chunk)))
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    window = jnp.asarray(sliding_window if windowed else 0, jnp.int32).reshape(1)
    quantized = isinstance(k_cache, QuantizedKV)
    caches = ((k_cache.values, v_cache.values, k_cache.scales, v_cache.scales) if quantized
              else (k_cache, v_cache))

    padded_tokens = num_tokens + block_q
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(_attention_kernel, scale_log2=scale * _LOG2E, block_q=block_q,
                               block_kv=block_kv, block_new=block_new, windowed=windowed,
                               quantized=quantized)
    out, row_max, row_sum = pl.pallas_call(
        kernel,
        grid=(num_tiles, num_kv_heads, num_splits),
        out_shape=(
            jax.ShapeDtypeStruct((num_splits, padded_tokens, num_kv_heads, group_padded, head_dim),
                                 out_dtype),
            jax.ShapeDtypeStruct((num_splits, padded_tokens, num_kv_heads, group_padded),
                                 jnp.float32),
            jax.ShapeDtypeStruct((num_splits, padded_tokens, num_kv_heads, group_padded),
                                 jnp.float32),
        ),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",
    )(layer, window, tiles["row"], tiles["row_start"], tiles["start"], tiles["num_queries"],
      tiles["context_len"], block_tables, q, k, v, *caches)

    if num_splits > 1:
        # Merge the splits: each holds softmax(its keys) @ V with its max (base 2) and sum.
        weight = row_sum * jnp.exp2(row_max - row_max.max(axis=0))             # [X, T+Q, K, G']
        total = weight.sum(axis=0)
        out = (out * weight[..., None]).sum(axis=0) / jnp.where(total > 0, total, 1)[..., None]
    else:
        out = out[0]
    out = out[:num_tokens, :, :group].reshape(num_tokens, num_heads, head_dim)
    # Padded tokens were never written (uninitialised memory): zero them.
    return jnp.where(metadata.token_rows[:, None, None] >= 0, out, 0).astype(q.dtype)


def _attention_kernel(layer_ref, window_ref, row_ref, row_start_ref, start_ref, num_queries_ref,
                      context_len_ref, block_tables_ref, q_ref, k_ref, v_ref, k_cache_ref,
                      v_cache_ref, *refs, scale_log2: float, block_q: int, block_kv: int,
                      block_new: int, windowed: bool, quantized: bool):
    """One program: tile ``program_id(0)``, kv head ``program_id(1)``, split ``program_id(2)``.

    Refs: layer [1]; window [1] (read only when ``windowed``; <= 0: full attention); tile
    fields [num_tiles]; block_tables [S, P']; q [T+Q, K, G', H];
    k, v [T+E, K, H]; k_cache, v_cache [L, B, Z, K, H]; with ``quantized`` then k_scales,
    v_scales [L, B, Z, K]; out [X, T+Q, K, G', H]; row_max, row_sum [X, T+Q, K, G'].
    """
    k_scale_ref, v_scale_ref = refs[:2] if quantized else (None, None)
    out_ref, row_max_ref, row_sum_ref = refs[-3:]
    tile, head, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    num_splits = pl.num_programs(2)
    layer = layer_ref[0]
    row, row_start = row_ref[tile], row_start_ref[tile]
    start, num_queries = start_ref[tile], num_queries_ref[tile]
    context_len = context_len_ref[tile]
    _, _, group_padded, head_dim = q_ref.shape
    block_size = k_cache_ref.shape[2]
    blocks_per_chunk = block_kv // block_size
    num_rows_m = block_q * group_padded                                       # M

    q = q_ref[pl.ds(start, block_q), head, :, :].reshape(num_rows_m, head_dim)  # [M, H]
    # Query row i of the tile is token start + i // G' (tokens major, heads minor).
    q_token = start + lax.broadcasted_iota(jnp.int32, (num_rows_m, 1), 0) // group_padded
    if windowed:
        # The first key position each query row sees, and the tile's smallest: its first token's.
        window = window_ref[0]

        def window_start(token):
            position = context_len + token - row_start
            return jnp.where(window > 0, jnp.maximum(position - window + 1, 0), 0)
        q_window_start = window_start(q_token)                                # [M, 1]
        tile_window_start = window_start(start)

    def attend(carry, keys, values, mask):
        """One online-softmax step over a chunk: keys, values [E or C, H], mask [M or 1, ...]."""
        row_max, row_sum, acc = carry
        scores = lax.dot_general(q, keys.astype(q.dtype), (((1,), (1,)), ((), ())),
                                 precision=lax.Precision.HIGHEST,
                                 preferred_element_type=jnp.float32) * scale_log2  # [M, C]
        scores = jnp.where(mask, scores, _MASKED)
        new_max = jnp.maximum(row_max, scores.max(axis=1, keepdims=True))     # [M, 1]
        probs = jnp.where(mask, jnp.exp2(scores - new_max), 0.0)
        correction = jnp.exp2(row_max - new_max)
        row_sum = row_sum * correction + probs.sum(axis=1, keepdims=True)
        acc = acc * correction + lax.dot_general(
            probs.astype(values.dtype), values, (((1,), (0,)), ((), ())),
            precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)  # [M, H]
        return new_max, row_sum, acc

    # 1. This split's share of the cached context, C keys (C / Z blocks) at a time.
    def context_chunk(chunk, carry):
        block_ids = block_tables_ref[row, pl.ds(chunk * blocks_per_chunk, blocks_per_chunk)]
        keys = k_cache_ref[layer, block_ids, :, head, :].reshape(block_kv, head_dim)
        values = v_cache_ref[layer, block_ids, :, head, :].reshape(block_kv, head_dim)
        if quantized:
            def dequantize(chunk, scale_ref):
                scales = scale_ref[layer, block_ids, :, head].reshape(block_kv, 1)
                return (chunk.astype(jnp.float32) * scales).astype(q.dtype)
            keys, values = dequantize(keys, k_scale_ref), dequantize(values, v_scale_ref)
        key_pos = chunk * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        mask = key_pos < context_len
        if windowed:
            mask &= key_pos >= q_window_start                                 # [M, C]
        return attend(carry, keys, values, mask)

    num_chunks = pl.cdiv(context_len, block_kv)
    first_chunk = 0
    if windowed:
        # Chunks wholly before every query row's window are never read; the splits share the rest.
        first_chunk = jnp.minimum(tile_window_start // block_kv, num_chunks)
    per_split = pl.cdiv(num_chunks - first_chunk, num_splits)
    first = first_chunk + split * per_split
    last = jnp.minimum(num_chunks, first + per_split)
    carry = (jnp.full((num_rows_m, 1), _MASKED, jnp.float32),
             jnp.zeros((num_rows_m, 1), jnp.float32),
             jnp.zeros((num_rows_m, head_dim), jnp.float32))
    carry = lax.fori_loop(first, jnp.maximum(first, last), context_chunk, carry)

    # 2. The row's tokens of this step up to the tile's last query (by the last split only).
    def new_chunk(chunk, carry):
        key_start = row_start + chunk * block_new
        keys = k_ref[pl.ds(key_start, block_new), head, :]                    # [E, H]
        values = v_ref[pl.ds(key_start, block_new), head, :]
        key_token = key_start + lax.broadcasted_iota(jnp.int32, (1, block_new), 1)
        mask = key_token <= q_token
        if windowed:
            # The key's position is context_len + key_token - row_start.
            mask &= key_token - row_start >= q_window_start - context_len     # [M, E]
        return attend(carry, keys, values, mask)

    end = start + num_queries
    num_new_chunks = jnp.where(split == num_splits - 1, pl.cdiv(end - row_start, block_new), 0)
    first_new = 0
    if windowed:
        first_new = jnp.minimum(jnp.maximum(tile_window_start - context_len, 0) // block_new,
                                num_new_chunks)
    row_max, row_sum, acc = lax.fori_loop(first_new, num_new_chunks, new_chunk, carry)

    out = acc / jnp.where(row_sum > 0, row_sum, 1.0)
    valid = q_token < end                                                     # [M, 1]
    shape = (block_q, group_padded)
    plgpu.store(out_ref.at[split, pl.ds(start, block_q), head, :, :],
                out.reshape(*shape, head_dim).astype(out_ref.dtype),
                mask=jnp.broadcast_to(valid.reshape(*shape, 1), (*shape, head_dim)))
    plgpu.store(row_max_ref.at[split, pl.ds(start, block_q), head, :], row_max.reshape(shape),
                mask=valid.reshape(shape))
    plgpu.store(row_sum_ref.at[split, pl.ds(start, block_q), head, :], row_sum.reshape(shape),
                mask=valid.reshape(shape))
