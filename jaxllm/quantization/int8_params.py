"""Float params -> int8 weight-only params: every projection kernel and the embedding table."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from jaxllm.quantization.weight import quantize_int8

_QUANTIZED_LEAVES = ("kernel", "embedding")


def quantize_params_int8(params: dict[str, Any], implementation: str) -> dict[str, Any]:
    """Each ``kernel`` (Flax [..., K, N], stacked layers included) and ``embedding`` ([V, D],
    also the tied head's weight) of a float params tree as a ``QuantizedWeight`` of int8 with
    one scale per output row ([N, K] data); every other leaf as it is."""
    def convert(path: tuple, leaf: Any) -> Any:
        name = str(getattr(path[-1], "key", path[-1]))
        if name not in _QUANTIZED_LEAVES:
            return leaf
        rows = np.asarray(leaf, np.float32)
        return quantize_int8(np.swapaxes(rows, -1, -2) if name == "kernel" else rows,
                             implementation)

    return jax.tree_util.tree_map_with_path(convert, params)
