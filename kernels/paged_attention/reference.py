"""Ragged paged attention in pure JAX: the oracle for kernels, and the CPU implementation.

Shape legend: T tokens, N query heads, K kv heads, G = N // K, H head dim, L layers,
B blocks in the pool, Z block size, S rows, P blocks per row, C = P * Z context positions.

One step holds any mix of decodes and prefill chunks in a flat token layout. Each token attends
to two parts of its own sequence, combined in one softmax:
  * the context already in the cache (positions < context_lens[row]), gathered by block table;
  * the tokens of this step (same row, position <= its own), straight from k and v.
Splitting it this way keeps a fresh prefill from gathering its own tokens back out of the cache:
the gather costs T * C, and C only covers what was cached before the step. A sliding window
(``metadata.window_starts``) masks both parts further: keys before p - W + 1 are dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.kernels.paged_attention.metadata import AttentionMetadata, window_starts
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV, dequantize, quantize, stored

_MASKED = -1e30  # finite, so a row with nothing to attend to gives no NaN


def write_kv(cache: jax.Array | QuantizedKV, new: jax.Array, layer: int | jax.Array,
             slot_mapping: jax.Array) -> jax.Array | QuantizedKV:
    """Writes new[T, K, H] into cache[L, B, Z, K, H] at layer ``layer`` and the given slots;
    into a quantized cache (``quantized_kv``) as values and scales.

    Indexes (block, offset) directly instead of reshaping to [L, B * Z, K, H]: on XLA:CPU the
    reshape around the scatter defeats in-place update and copies the whole cache every layer.
    """
    block_size = cache.shape[2]
    index = (layer, slot_mapping // block_size, slot_mapping % block_size)
    if isinstance(cache, QuantizedKV):
        new = quantize(new, cache.dtype)
        return QuantizedKV(cache.values.at[index].set(new.values),
                           cache.scales.at[index].set(new.scales))
    return cache.at[index].set(new.astype(cache.dtype))


def _gather_context(cache: jax.Array | QuantizedKV, layer: int | jax.Array, blocks: jax.Array,
                    dtype: jnp.dtype) -> jax.Array:
    """cache[layer, blocks] for blocks [T, P]: [T, P * Z, K, H], dequantized into ``dtype``
    from a quantized cache, else in the cache dtype."""
    num_tokens = blocks.shape[0]
    if isinstance(cache, QuantizedKV):
        gathered = dequantize(QuantizedKV(cache.values[layer, blocks], cache.scales[layer, blocks]),
                              dtype)
    else:
        gathered = cache[layer, blocks]
    return gathered.reshape(num_tokens, -1, *gathered.shape[-2:])


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: int | jax.Array, metadata: AttentionMetadata,
                    *, scale: float, sliding_window: int | jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of a ragged batch over a paged KV cache; writes the new K/V.

    Args:
        q: [T, N, H] queries of this step's tokens (rotary already applied).
        k, v: [T, K, H] keys and values of this step's tokens.
        k_cache, v_cache: [L, B, Z, K, H] the whole cache: float arrays, or ``QuantizedKV``
            (``quantized_kv``), whose keys and values, this step's included, are read
            dequantized.
        layer: which layer's cache to read and write.
        metadata: the step's token layout.
        scale: softmax scale, usually head_dim ** -0.5.
        sliding_window: this layer's window W (see ``metadata``); None or <= 0: full attention.

    Returns:
        (out [T, N, H] in q's dtype, updated k_cache, updated v_cache).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    group = num_heads // num_kv_heads
    k_cache = write_kv(k_cache, k, layer, metadata.slot_mapping)
    v_cache = write_kv(v_cache, v, layer, metadata.slot_mapping)
    k, v = stored(k, k_cache), stored(v, v_cache)

    rows = metadata.token_rows
    blocks = metadata.block_tables[rows]                                     # [T, P]
    k_ctx = _gather_context(k_cache, layer, blocks, q.dtype)                 # [T, C, K, H]
    v_ctx = _gather_context(v_cache, layer, blocks, v.dtype)
    ctx_len = k_ctx.shape[1]
    ctx_mask = jnp.arange(ctx_len)[None, :] < metadata.context_lens[rows][:, None]   # [T, C]
    pos = metadata.positions
    new_mask = (rows[:, None] == rows[None, :]) & (pos[None, :] <= pos[:, None])  # [T, T]
    if sliding_window is not None:
        start = window_starts(pos, sliding_window)[:, None]                          # [T, 1]
        ctx_mask &= jnp.arange(ctx_len)[None, :] >= start
        new_mask &= pos[None, :] >= start

    f32 = jnp.float32
    # Each part is laid out with its batch dims leading so XLA runs plain batched matmuls:
    # context as [T, K, ...] (per token), this step's tokens as [K, T * G, ...] (per kv head).
    # The two softmax parts are merged through their row maxima and sums (log-sum-exp).
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim)                       # [T, K, G, H]
    k_ctx = k_ctx.transpose(0, 2, 1, 3)                                              # [T, K, C, H]
    v_ctx = v_ctx.transpose(0, 2, 1, 3)
    s_ctx = jnp.einsum("tkgh,tkch->tkgc", qg, k_ctx, preferred_element_type=f32) * scale
    s_ctx = jnp.where(ctx_mask[:, None, None, :], s_ctx, _MASKED)                   # [T, K, G, C]

    q_heads = qg.transpose(1, 0, 2, 3).reshape(num_kv_heads, num_tokens * group, head_dim)
    k_heads, v_heads = k.transpose(1, 0, 2), v.transpose(1, 0, 2)                    # [K, T, H]
    s_new = jnp.einsum("kqh,ksh->kqs", q_heads, k_heads, preferred_element_type=f32) * scale
    s_new = s_new.reshape(num_kv_heads, num_tokens, group, num_tokens)
    s_new = jnp.where(new_mask[None, :, None, :], s_new, _MASKED)                   # [K, T, G, T]

    m_ctx = s_ctx.max(axis=-1)                                                       # [T, K, G]
    m_new = s_new.max(axis=-1).transpose(1, 0, 2)                                    # [T, K, G]
    m = jnp.maximum(m_ctx, m_new)
    p_ctx = jnp.exp(s_ctx - m[..., None])
    p_new = jnp.exp(s_new - m.transpose(1, 0, 2)[..., None])
    denom = p_ctx.sum(axis=-1) + p_new.sum(axis=-1).transpose(1, 0, 2)              # [T, K, G]
    o_ctx = jnp.einsum("tkgc,tkch->tkgh", p_ctx.astype(v.dtype), v_ctx, preferred_element_type=f32)
    o_new = jnp.einsum("kqs,ksh->kqh", p_new.reshape(num_kv_heads, -1, num_tokens).astype(v.dtype),
                       v_heads, preferred_element_type=f32)
    o_new = o_new.reshape(num_kv_heads, num_tokens, group, head_dim).transpose(1, 0, 2, 3)
    out = (o_ctx + o_new) / denom[..., None]                                         # [T, K, G, H]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype), k_cache, v_cache
