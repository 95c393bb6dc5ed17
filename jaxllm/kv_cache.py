"""The paged KV cache pytree: allocated once, donated to every step, updated in place."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    k: jax.Array  # [L, num_blocks, block_size, K, H]
    v: jax.Array  # [L, num_blocks, block_size, K, H]


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: str,
                      sharding: jax.sharding.Sharding | None = None) -> KVCache:
    """Zeros on the default device, or laid out as ``sharding`` (split over kv heads under
    tensor parallelism: each device allocates only its part)."""
    shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
             config.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype, device=sharding), v=jnp.zeros(shape, dtype, device=sharding))
