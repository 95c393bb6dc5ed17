"""Quantized KV caches: 8-bit values with a float32 scale per token and kv head.

Shape legend: L layers, B blocks in the pool, Z block size, K kv heads, H head dim, T tokens.

A quantized cache is a ``QuantizedKV(values [L, B, Z, K, H] int8 or float8_e4m3fn,
scales [L, B, Z, K] float32)`` in place of a float ``[L, B, Z, K, H]`` array, so that every
attention implementation keeps its signature: ``k_cache`` and ``v_cache`` are either. Element
(l, b, z, k, h) stands for ``values[l, b, z, k, h] * scales[l, b, z, k]``.

Why a scale per token and kv head (and not per block and kv head, as some engines do): a token's
K/V are written once, when it is computed, and never change after. With one scale per token
the write is a plain scatter at ``slot_mapping`` of values and scales, the same as for a float
cache; a per-block scale would grow as the block fills, and every token already in it would
have to be re-quantized to the new scale (or clipped to the old one). Per token, the scale also
follows each token's own range (keys of some positions are much larger than others'), so one
outlier spoils one token's resolution, not a whole block's. The cost is 4 bytes per token and
kv head: 6% on top of 64 bytes of int8 at head dim 64 (SmolLM2), 3% at 128.

Symmetric quantization: ``scale = max|x| / Q`` with Q = 127 (int8) or 448 (float8_e4m3fn's
largest finite value); values are ``x / scale`` rounded to nearest (int8: to the nearest
integer; fp8: to the nearest e4m3 number, 3 mantissa bits) and clipped to [-Q, Q] (an fp8
cast past 448 would give NaN). An all-zero row gets scale 0 and values 0.

Attention reads the keys and values of this step's own tokens as the cache holds them too
(``stored``): a token's result then does not depend on whether a key was written by an earlier
step or by this one, so chunked prefill, prefix-cache hits and batching give the same numbers,
as a float cache does.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# kv_cache_dtype name -> (storage dtype, largest magnitude Q a value may take)
QUANTIZED_DTYPES: dict[str, tuple[jnp.dtype, float]] = {
    "int8": (jnp.dtype(jnp.int8), 127.0),
    "fp8": (jnp.dtype(jnp.float8_e4m3fn), 448.0),
}
_MAX_BY_DTYPE = {dtype: q_max for dtype, q_max in QUANTIZED_DTYPES.values()}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedKV:
    values: jax.Array  # [..., K, H] int8 or float8_e4m3fn
    scales: jax.Array  # [..., K] float32

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape


def is_quantized(cache: jax.Array | QuantizedKV) -> bool:
    return isinstance(cache, QuantizedKV)


def quantize(x: jax.Array, dtype: jnp.dtype) -> QuantizedKV:
    """x [..., H] (float) -> QuantizedKV(values [..., H] in ``dtype``, scales [...] float32)."""
    q_max = _MAX_BY_DTYPE[jnp.dtype(dtype)]
    x = x.astype(jnp.float32)
    amax = jnp.abs(x).max(axis=-1)
    scales = amax / q_max
    inverse = jnp.where(amax > 0, q_max / jnp.where(amax > 0, amax, 1.0), 0.0)
    values = jnp.clip(x * inverse[..., None], -q_max, q_max)
    if jnp.issubdtype(dtype, jnp.integer):
        values = jnp.round(values)
    return QuantizedKV(values.astype(dtype), scales)


def dequantize(cache: QuantizedKV, dtype: jnp.dtype = jnp.float32) -> jax.Array:
    """values * scales, computed in float32, returned in ``dtype``: [..., H]."""
    return (cache.values.astype(jnp.float32) * cache.scales[..., None]).astype(dtype)


def stored(new: jax.Array, cache: jax.Array | QuantizedKV) -> jax.Array:
    """``new`` [T, K, H] as ``cache`` holds it, in new's dtype: quantized and back for a
    quantized cache, unchanged for a float one (in-step keys are read at the input's precision,
    as before)."""
    if not is_quantized(cache):
        return new
    return dequantize(quantize(new, cache.dtype), new.dtype)


def allocate(shape: tuple[int, ...], dtype: str,
             sharding: jax.sharding.Sharding | None = None,
             scale_sharding: jax.sharding.Sharding | None = None) -> jax.Array | QuantizedKV:
    """A zero cache of ``shape`` [L, B, Z, K, H]: a float array, or for a ``QUANTIZED_DTYPES``
    name a QuantizedKV with float32 scales [L, B, Z, K] (laid out as ``scale_sharding``)."""
    if dtype not in QUANTIZED_DTYPES:
        return jnp.zeros(shape, dtype, device=sharding)
    storage, _ = QUANTIZED_DTYPES[dtype]
    return QuantizedKV(jnp.zeros(shape, storage, device=sharding),
                       jnp.zeros(shape[:-1], jnp.float32, device=scale_sharding))


def check_supported(kv_cache_dtype: str, attention: str, device: jax.Device) -> None:
    """Raises ValueError, naming the problem, when a quantized ``kv_cache_dtype`` ("int8",
    "fp8") cannot run on ``device`` with the attention implementation ``attention``: the
    device cannot convert the dtype, or (fp8) the Triton kernel needs compute capability 8.9+
    (Ada, Hopper) for float8_e4m3fn."""
    if kv_cache_dtype not in QUANTIZED_DTYPES:
        return
    capability = getattr(device, "compute_capability", None)
    if (kv_cache_dtype == "fp8" and attention == "pallas_gpu" and capability is not None
            and tuple(map(int, str(capability).split(".")[:2])) < (8, 9)):
        raise ValueError(f"kv_cache_dtype='fp8' with the pallas_gpu attention needs an NVIDIA "
                         f"GPU of compute capability 8.9 or later (float8_e4m3fn in Triton); "
                         f"{device} has {capability}: use kv_cache_dtype='int8'")
    storage, _ = QUANTIZED_DTYPES[kv_cache_dtype]
    try:
        jax.jit(lambda x: x.astype(storage).astype(jnp.float32))(
            jax.device_put(jnp.ones(2, jnp.float32), device)).block_until_ready()
    except Exception as error:   # the backend's own error type differs per platform
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: {device.platform} device {device} "
                         f"cannot convert {storage.name}: {error}") from error
