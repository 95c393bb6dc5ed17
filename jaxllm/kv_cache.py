"""The paged KV cache pytree: allocated once, donated to every step, updated in place."""

from __future__ import annotations

import dataclasses

import jax
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig
from jaxllm.kernels.paged_attention import quantized_kv
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """k, v: [L, num_blocks, block_size, K, H] in the model dtype, or, with a quantized
    ``kv_cache_dtype``, ``QuantizedKV`` (8-bit values of that shape, float32 scales
    [L, num_blocks, block_size, K]); see ``jaxllm.kernels.paged_attention.quantized_kv``."""

    k: jax.Array | QuantizedKV
    v: jax.Array | QuantizedKV


def allocate_kv_cache(config: ModelConfig, num_blocks: int, block_size: int, dtype: str,
                      sharding: jax.sharding.Sharding | jax.Device | None = None) -> KVCache:
    """Zeros on the default device, or laid out as ``sharding`` (split over kv heads under
    tensor parallelism: each device allocates only its part). ``dtype``: "float32",
    "bfloat16", or a quantized cache dtype ("int8", "fp8")."""
    shape = (config.num_hidden_layers, num_blocks, block_size, config.num_key_value_heads,
             config.head_dim)
    scale_sharding = sharding
    if isinstance(sharding, NamedSharding):     # the scales drop the head-dim axis
        scale_sharding = NamedSharding(sharding.mesh, PartitionSpec(*sharding.spec[:-1]))

    def allocate() -> jax.Array | QuantizedKV:
        return quantized_kv.allocate(shape, dtype, sharding, scale_sharding)

    return KVCache(k=allocate(), v=allocate())
