"""The "interleaved" layout of quantized weights that the CPU integer-dot kernel reads
(``kernels/cpu_int_dot_matmul.cc``): a byte permutation of the GGUF blocks (or int8 rows), made
once at load, so that one 256-bit load holds 2 weight bytes of each of 16 features.

For 16 consecutive output features (a group) and one block of 32 weights along K, the 16 blocks
become one block group: their float16 header fields (d; Q4_1: d then m) field by field, 16 of
each, then the payload (nibble bytes or int8 weights) in 2-byte words, word c of every feature
in turn. The array keeps its [..., N, row_bytes] shape: group g is rows 16g .. 16g + 15, its
block groups in order along K. ``deinterleave`` undoes it exactly (jnp or numpy), which is how
the jnp reference and embedding lookups read such weights.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

GROUP = 16   # features of a group: one float32 vector of AVX-512
WORD = 2     # payload bytes of one feature next to each other


class BlockFields(NamedTuple):
    headers: int     # float16 fields at the start of a block (d; Q4_1: d, m)
    payload: int     # bytes after them


# The types the integer-dot kernel reads; blocks of 32 weights ("int8": a row cut in 32 bytes).
FIELDS = {"Q4_0": BlockFields(1, 16), "Q4_1": BlockFields(2, 16), "Q8_0": BlockFields(1, 32),
          "int8": BlockFields(0, 32)}


def can_interleave(qtype: str, out_features: int) -> bool:
    return qtype in FIELDS and out_features % GROUP == 0


def interleave(data: np.ndarray, qtype: str) -> np.ndarray:
    """GGUF rows (int8: int8 rows) [..., N, row_bytes] -> the interleaved layout, same shape."""
    return _permute(np, np.asarray(data), qtype, forward=True)


def deinterleave(data: Any, qtype: str) -> Any:
    """The inverse of ``interleave`` (numpy in, numpy out; else jnp)."""
    return _permute(np if isinstance(data, np.ndarray) else jnp, data, qtype, forward=False)


def interleaved_rows(data: Any, qtype: str, rows: Any) -> Any:
    """Rows ``rows`` (int [T]) of interleaved ``data`` [N, row_bytes] as GGUF rows [T, row_bytes]:
    the rows' groups gathered and deinterleaved."""
    n, width = data.shape
    groups = jnp.take(data.reshape(n // GROUP, GROUP * width), rows // GROUP, axis=0)
    plain = deinterleave(groups.reshape(-1, GROUP, width), qtype)     # [T, 16, width]
    return jnp.take_along_axis(plain, (rows % GROUP)[:, None, None], axis=1)[:, 0]


def _permute(xp: Any, data: Any, qtype: str, forward: bool) -> Any:
    fields = FIELDS[qtype]
    *lead, n, width = data.shape
    size = 2 * fields.headers + fields.payload
    g, nb, words = n // GROUP, width // size, fields.payload // WORD
    head = 2 * fields.headers
    if forward:
        blocks = data.reshape(*lead, g, GROUP, nb, size)
        header = xp.moveaxis(blocks[..., :head].reshape(*lead, g, GROUP, nb, fields.headers, 2), -4, -2)
        payload = xp.moveaxis(blocks[..., head:].reshape(*lead, g, GROUP, nb, words, WORD), -4, -2)
        payload = payload.reshape(*lead, g, nb, GROUP * fields.payload)
        out = xp.concatenate([header.reshape(*lead, g, nb, GROUP * head), payload], axis=-1)
    else:
        groups = data.reshape(*lead, g, nb, GROUP * size)
        header = groups[..., :GROUP * head].reshape(*lead, g, nb, fields.headers, GROUP, 2)
        payload = groups[..., GROUP * head:].reshape(*lead, g, nb, words, GROUP, WORD)
        header = xp.moveaxis(header, -2, -4).reshape(*lead, g, GROUP, nb, head)
        payload = xp.moveaxis(payload, -2, -4).reshape(*lead, g, GROUP, nb, fields.payload)
        out = xp.concatenate([header, payload], axis=-1)
    return out.reshape(*lead, n, width)

