"""GGUF (ggml) block formats, dequantized with jnp exactly as the ``gguf`` package does.

A quantized row of K values is K / block_size blocks of ``type_size`` bytes, laid out as
llama.cpp writes them. Each ``_dequantize_<type>`` maps blocks ``[..., type_size]`` uint8 to
``[..., block_size]`` float32 with the same float operations, in the same order, as
``gguf.quants.<type>.dequantize_blocks`` (every product of a float16 scale with the small
integers of a block is exact in float32, so fused multiply-adds change nothing): the tests
assert bit equality.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

QK_K = 256


def _f16(b: jax.Array) -> jax.Array:
    """[..., 2] little-endian bytes -> [..., 1]: the float16 they hold, as float32."""
    return jax.lax.bitcast_convert_type(b, jnp.float16).astype(jnp.float32)[..., None]


def _bits(b: jax.Array, shifts: tuple[int, ...], mask: int, groups: int) -> jax.Array:
    """b [..., groups * n] uint8 -> [..., groups, len(shifts), n]: (b >> shift) & mask, the
    shifts varying within each group of n bytes (ggml's ``qs.reshape(-1, 1, n) >> shifts``)."""
    b = b.reshape(*b.shape[:-1], groups, 1, b.shape[-1] // groups)
    shift = jnp.asarray(shifts, jnp.uint8).reshape(len(shifts), 1)
    return (b >> shift) & jnp.uint8(mask)


def _flat(x: jax.Array, *tail: int) -> jax.Array:
    """The last three axes of x (from ``_bits``) reshaped to ``tail``."""
    return x.reshape(*x.shape[:-3], *tail)


def _merge(x: jax.Array) -> jax.Array:
    """[..., a, b] -> [..., a * b]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def _nibbles(qs: jax.Array) -> jax.Array:
    """[..., 16] bytes -> [..., 32] uint8: the 16 low nibbles, then the 16 high ones."""
    return _flat(_bits(qs, (0, 4), 0x0F, 1), 32)


def _high_bits(qh: jax.Array) -> jax.Array:
    """[..., 4] bytes (a little-endian uint32) -> [..., 32] uint8: bit j of it at j."""
    word = jax.lax.bitcast_convert_type(qh, jnp.uint32)[..., None]
    return ((word >> jnp.arange(32, dtype=jnp.uint32)) & jnp.uint32(1)).astype(jnp.uint8)


def _dequantize_q4_0(b: jax.Array) -> jax.Array:
    qs = _nibbles(b[..., 2:]).astype(jnp.int8) - jnp.int8(8)
    return _f16(b[..., :2]) * qs.astype(jnp.float32)


def _dequantize_q4_1(b: jax.Array) -> jax.Array:
    qs = _nibbles(b[..., 4:]).astype(jnp.float32)
    return (_f16(b[..., :2]) * qs) + _f16(b[..., 2:4])


def _dequantize_q5_0(b: jax.Array) -> jax.Array:
    q = (_nibbles(b[..., 6:]) | (_high_bits(b[..., 2:6]) << jnp.uint8(4))).astype(jnp.int8) - jnp.int8(16)
    return _f16(b[..., :2]) * q.astype(jnp.float32)


def _dequantize_q5_1(b: jax.Array) -> jax.Array:
    q = (_nibbles(b[..., 8:]) | (_high_bits(b[..., 4:8]) << jnp.uint8(4))).astype(jnp.float32)
    return (_f16(b[..., :2]) * q) + _f16(b[..., 2:4])


def _dequantize_q8_0(b: jax.Array) -> jax.Array:
    x = jax.lax.bitcast_convert_type(b[..., 2:], jnp.int8).astype(jnp.float32)
    return x * _f16(b[..., :2])


def _dequantize_q2_k(b: jax.Array) -> jax.Array:
    scales, qs = b[..., :16], b[..., 16:80]
    d, dmin = _f16(b[..., 80:82]), _f16(b[..., 82:84])
    dl = (d * (scales & jnp.uint8(0xF)).astype(jnp.float32))[..., None]         # [..., 16, 1]
    ml = (dmin * (scales >> jnp.uint8(4)).astype(jnp.float32))[..., None]
    q = _flat(_bits(qs, (0, 2, 4, 6), 3, 2), 16, 16).astype(jnp.float32)
    return _merge(dl * q - ml)


def _dequantize_q3_k(b: jax.Array) -> jax.Array:
    hmask, qs, scales, d = b[..., :32], b[..., 32:96], b[..., 96:108], _f16(b[..., 108:110])
    low = _flat(_bits(scales[..., :8], (0, 4), 0x0F, 1), 16)
    high = _flat(_bits(scales[..., 8:], (0, 2, 4, 6), 0x03, 1), 16)
    sc = ((low | (high << jnp.uint8(4))).astype(jnp.int8) - jnp.int8(32)).astype(jnp.float32)
    dl = (d * sc)[..., None]                                          # [..., 16, 1]
    ql = _flat(_bits(qs, (0, 2, 4, 6), 3, 2), 16, 16)
    qh = _flat(_bits(hmask, tuple(range(8)), 1, 1), 16, 16) ^ jnp.uint8(1)
    q = (ql.astype(jnp.int8) - (qh << jnp.uint8(2)).astype(jnp.int8)).astype(jnp.float32)
    return _merge(dl * q)


def _scale_min_k4(scales: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Q4_K/Q5_K's 12 bytes of packed 6-bit scales and mins -> two [..., 8] uint8."""
    d, m, m_d = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = jnp.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = jnp.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _k4_scales(b: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(d * sc, dmin * m) [..., 8, 1] of a Q4_K/Q5_K block."""
    sc, mn = _scale_min_k4(b[..., 4:16])
    d = (_f16(b[..., :2]) * sc.astype(jnp.float32))[..., None]
    dm = (_f16(b[..., 2:4]) * mn.astype(jnp.float32))[..., None]
    return d, dm


def _dequantize_q4_k(b: jax.Array) -> jax.Array:
    d, dm = _k4_scales(b)
    q = _flat(_bits(b[..., 16:], (0, 4), 0x0F, 4), 8, 32).astype(jnp.float32)
    return _merge(d * q - dm)


def _dequantize_q5_k(b: jax.Array) -> jax.Array:
    d, dm = _k4_scales(b)
    ql = _flat(_bits(b[..., 48:], (0, 4), 0x0F, 4), 8, 32)
    qh = _flat(_bits(b[..., 16:48], tuple(range(8)), 0x01, 1), 8, 32)
    q = (ql | (qh << jnp.uint8(4))).astype(jnp.float32)
    return _merge(d * q - dm)


def _dequantize_q6_k(b: jax.Array) -> jax.Array:
    ql, qh = b[..., :128], b[..., 128:192]
    scales = jax.lax.bitcast_convert_type(b[..., 192:208], jnp.int8).astype(jnp.float32)
    d = (_f16(b[..., 208:210]) * scales)[..., None]                   # [..., 16, 1]
    low = _flat(_bits(ql, (0, 4), 0x0F, 2), 8, 32)
    high = _flat(_bits(qh, (0, 2, 4, 6), 0x03, 2), 8, 32)
    q = ((low | (high << jnp.uint8(4))).astype(jnp.int8) - jnp.int8(32))
    q = q.reshape(*q.shape[:-2], 16, 16).astype(jnp.float32)
    return _merge(d * q)


# GGUF type name -> (values per block, bytes per block, blocks [..., bytes] -> [..., values]).
GGML_TYPES: dict[str, tuple[int, int, Callable[[jax.Array], jax.Array]]] = {
    "Q4_0": (32, 18, _dequantize_q4_0),
    "Q4_1": (32, 20, _dequantize_q4_1),
    "Q5_0": (32, 22, _dequantize_q5_0),
    "Q5_1": (32, 24, _dequantize_q5_1),
    "Q8_0": (32, 34, _dequantize_q8_0),
    "Q2_K": (QK_K, 84, _dequantize_q2_k),
    "Q3_K": (QK_K, 110, _dequantize_q3_k),
    "Q4_K": (QK_K, 144, _dequantize_q4_k),
    "Q5_K": (QK_K, 176, _dequantize_q5_k),
    "Q6_K": (QK_K, 210, _dequantize_q6_k),
}


def row_bytes(qtype: str, in_features: int) -> int:
    """Bytes of one quantized row of ``in_features`` values (a multiple of the block size)."""
    block, size, _ = GGML_TYPES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype} rows hold whole blocks of {block} values; got {in_features}")
    return in_features // block * size


def dequantize_rows(data: jax.Array, qtype: str) -> jax.Array:
    """Packed GGUF rows ``data`` [..., row_bytes] uint8 -> [..., K] float32."""
    block, size, dequantize = GGML_TYPES[qtype]
    blocks = data.reshape(*data.shape[:-1], data.shape[-1] // size, size)
    values = dequantize(blocks)                                  # [..., K / block, block]
    return values.reshape(*data.shape[:-1], values.shape[-2] * block)
