"""Ragged paged attention for XLA:CPU: a C++ kernel (``cpu_attention.cc``) called through the XLA FFI.

Shape legend: T tokens, N query heads, K kv heads, H head dim, L layers, B blocks in the pool,
Z block size, S rows, P blocks per row.

Same signature and semantics as ``reference.paged_attention``, sliding windows included. One
custom call writes the new K/V into both caches at ``layer`` (a traced scalar under
``lax.scan``, passed as an operand, as is the window: layers of different kinds share one scan),
in place: its cache outputs alias its cache inputs, and the cache is donated to the step, so XLA
copies nothing. (Left to XLA, the write was a scatter per cache and layer plus the index
arithmetic around it: ~1.5 ms of a 64-row SmolLM2 decode step.) It then reads both caches and
writes the output. Why a hand-written kernel: on XLA:CPU every formulation of the reference's
gather + einsum read K/V at ~2 GB/s, so attention took ~720 of ~880 ms of a SmolLM2-135M decode
step of 64 rows x 512 context; the kernel reads them at 6-18 GB/s, 4-7x faster (its layout is
described at the top of the .cc file). With a window it reads only the keys the window leaves
(whole chunks before it skipped), so a windowed layer costs O(window) per token, not O(context).
Its threads are XLA's own intra-op pool, passed to the handler, rather than OpenMP's: no second
pool competing with XLA's for the cores, no libgomp to load; ``num_threads`` caps them at the
cores this process may use.

The kernel is compiled on first use for this machine and cached (``jaxllm.kernels.cpu_build``).
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxllm.kernels import cpu_build
from jaxllm.kernels.paged_attention import reference
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV, dequantize, quantize

logger = logging.getLogger(__name__)

_SOURCE = Path(__file__).with_name("cpu_attention.cc")
_TARGET = "jaxllm_paged_attention_cpu"
_QUANTIZED_TARGET = "jaxllm_quantized_paged_attention_cpu"
_HEAD_DIM_MULTIPLE = 16  # the kernel's vector width in floats


@functools.cache
def _target() -> str | None:
    """Builds or finds the kernel and registers it with XLA, once per process.

    Returns the custom-call target name, or None (the reason logged once) when it cannot be
    built or loaded.
    """
    registered = cpu_build.register(
        _SOURCE, {"JaxllmPagedAttention": _TARGET,
                  "JaxllmQuantizedPagedAttention": _QUANTIZED_TARGET}, "CPU attention kernel")
    return _TARGET if registered else None


def is_available() -> bool:
    """Whether the kernel builds and loads here (compiles it on the first call); never raises."""
    return _target() is not None


@functools.cache
def _warn_head_dim(head_dim: int) -> None:
    logger.warning("head dim %d is not a multiple of %d: the CPU attention kernel falls back to "
                   "the reference", head_dim, _HEAD_DIM_MULTIPLE)


def paged_attention(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: jax.Array,
                    v_cache: jax.Array, layer: int | jax.Array, metadata: AttentionMetadata,
                    *, scale: float, sliding_window: int | jax.Array | None = None
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Causal attention of a ragged batch over a paged KV cache; writes the new K/V.

    Head dims that are not a multiple of 16 (the kernel's vector width) go to the reference,
    so that the CPU default works for every model. Sliding windows run in the kernel.

    Args:
        q: [T, N, H] queries of this step's tokens (rotary already applied); float32 or
            bfloat16.
        k, v: [T, K, H] keys and values of this step's tokens (read in q's dtype).
        k_cache, v_cache: [L, B, Z, K, H] the whole cache, float32 or bfloat16, or a
            ``QuantizedKV`` (int8 or float8_e4m3fn values, float32 scales [L, B, Z, K]): the
            kernel dequantizes K/V rows as it loads them; the new tokens are quantized here,
            and read as stored (``quantized_kv.stored``) in q's dtype.
        layer: which layer's cache to read and write (an int, or an int32 scalar under scan).
        metadata: the step's token layout; a row's tokens are contiguous and in position order.
        scale: softmax scale, usually head_dim ** -0.5.
        sliding_window: this layer's window (``metadata``): None, an int or a traced int32
            scalar; None or <= 0: full attention.

    Returns:
        (out [T, N, H] in q's dtype, updated k_cache, updated v_cache).

    Raises:
        RuntimeError: the kernel cannot be built here (see ``is_available``).
    """
    if q.shape[-1] % _HEAD_DIM_MULTIPLE:
        _warn_head_dim(q.shape[-1])
        return reference.paged_attention(q, k, v, k_cache, v_cache, layer, metadata, scale=scale,
                                         sliding_window=sliding_window)
    target = _target()
    if target is None:
        raise RuntimeError("the CPU attention kernel could not be built; see the log")
    if isinstance(k_cache, QuantizedKV):
        return _quantized_call(q, k, v, k_cache, v_cache, layer, metadata, scale=scale,
                               sliding_window=sliding_window)
    result = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
              jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    call = jax.ffi.ffi_call(target, result, input_output_aliases={3: 1, 4: 2})
    out, k_cache, v_cache = call(
        q, k.astype(q.dtype), v.astype(q.dtype), k_cache, v_cache, jnp.asarray(layer, jnp.int32),
        jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32),
        metadata.token_rows, metadata.positions, metadata.block_tables, metadata.context_lens,
        metadata.slot_mapping, k.astype(k_cache.dtype), v.astype(v_cache.dtype),
        scale=np.float32(scale), num_threads=np.int32(cpu_build.num_threads()))
    return out, k_cache, v_cache


def _quantized_call(q: jax.Array, k: jax.Array, v: jax.Array, k_cache: QuantizedKV,
                    v_cache: QuantizedKV, layer: int | jax.Array, metadata: AttentionMetadata,
                    *, scale: float, sliding_window: int | jax.Array | None
                    ) -> tuple[jax.Array, QuantizedKV, QuantizedKV]:
    """``paged_attention`` on a quantized cache: values and scales both updated in place."""
    k_new, v_new = quantize(k, k_cache.dtype), quantize(v, v_cache.dtype)
    shapes = (q, k_cache.values, v_cache.values, k_cache.scales, v_cache.scales)
    call = jax.ffi.ffi_call(_QUANTIZED_TARGET,
                            tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in shapes),
                            input_output_aliases={3: 1, 4: 2, 5: 3, 6: 4})
    out, k_values, v_values, k_scales, v_scales = call(
        q, dequantize(k_new, q.dtype), dequantize(v_new, q.dtype),
        k_cache.values, v_cache.values, k_cache.scales, v_cache.scales,
        jnp.asarray(layer, jnp.int32),
        jnp.asarray(0 if sliding_window is None else sliding_window, jnp.int32),
        metadata.token_rows, metadata.positions, metadata.block_tables, metadata.context_lens,
        metadata.slot_mapping, k_new.values, v_new.values, k_new.scales, v_new.scales,
        scale=np.float32(scale), num_threads=np.int32(cpu_build.num_threads()))
    return out, QuantizedKV(k_values, k_scales), QuantizedKV(v_values, v_scales)
