"""Quantized GGUF tensor data for tests, for every block type the converter reads.

``gguf.quants.quantize`` implements the legacy types (Q4_0 .. Q8_0) but not the K-quants nor
the IQ types. For those, ``quantize`` writes random blocks whose float16 scales are set to
small finite values: not a quantization of ``w``, but valid data for checking that a file of
that type is read (and dequantized) the same way by the converter and by transformers.
"""

from __future__ import annotations

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.constants import GGML_QUANT_SIZES

# Byte offsets of each block's float16 scales (d, and dmin where the type has one).
_F16_OFFSETS = {Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2),
                Q.Q6_K: (208,), Q.IQ4_NL: (0,)}


def is_exact(qtype: Q) -> bool:
    """Whether ``quantize`` really quantizes ``w`` for this type (else it writes random blocks)."""
    return qtype not in _F16_OFFSETS


def quantize(w: np.ndarray, qtype: Q, rng: np.random.Generator) -> np.ndarray:
    """Tensor data of type ``qtype`` for a float32 array ``w`` (rows x a multiple of the block)."""
    if is_exact(qtype):
        return gguf.quants.quantize(w.astype(np.float32), qtype)
    block, size = GGML_QUANT_SIZES[qtype]
    num_blocks = w.size // block
    data = rng.integers(0, 256, (num_blocks, size), dtype=np.uint8)
    scales = rng.uniform(0.001, 0.02, (num_blocks, len(_F16_OFFSETS[qtype]))).astype(np.float16)
    for i, offset in enumerate(_F16_OFFSETS[qtype]):
        data[:, offset:offset + 2] = scales[:, i:i + 1].view(np.uint8)
    return data.reshape(*w.shape[:-1], w.shape[-1] // block * size)
