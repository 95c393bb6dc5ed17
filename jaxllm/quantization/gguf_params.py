"""A GGUF file -> the params tree of ``causal_lm`` with its quantized blocks kept as they are.

The family's GGUF tensor map and HF weight map say where each tensor goes, as for the float
conversion (``checkpoints_convert.gguf``). A projection kernel or the embedding table whose
tensors are all of a type in ``ggml.GGML_TYPES`` becomes a ``QuantizedWeight`` of the file's
rows: row transforms (llama.cpp's q/k permutation, ``TakeRows``) move whole packed rows, the
transpose into Flax's [in, out] layout is skipped (a quantized weight stays [out, in]), and
tensors sharing a leaf (q | k | v) are concatenated along N, which keeps every block intact.
Every other tensor (norms, biases, types without a jnp dequantization) is dequantized to float
with the ``gguf`` package, as the float conversion does.

Types that differ between the parts of one leaf (Gemma 3's Q4_K_M: q and k Q5_0, v Q8_0 in
some layers) or between layers of a stacked leaf are made one when that is exact (Q4_0 and
Q5_0 blocks are Q8_0 blocks with the same scale); otherwise the leaf is kept per layer with
unrolled layers, or dequantized to float when the layers are scanned (logged).
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from jaxllm.checkpoints_convert.gguf_reader import open_gguf
from jaxllm.checkpoints_convert.hf_safetensors import name_mismatches
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, place, transpose
from jaxllm.config import ModelConfig
from jaxllm.quantization.ggml import GGML_TYPES
from jaxllm.quantization.weight import QuantizedWeight

logger = logging.getLogger(__name__)

_PACKED_LEAVES = ("kernel", "embedding")
# Exact re-encodings: these blocks are Q8_0 blocks (same float16 scale, q - offset in int8).
_TO_Q8_0_OFFSET = {"Q4_0": 8, "Q5_0": 16}

Leaf = tuple[tuple[str, ...], int | None]   # (path in the tree, layer or None)


def load_gguf_params(gguf_path: str | os.PathLike, family: Any, hf_config: Any,
                     config: ModelConfig, dtype: Any, *, scan_layers: bool,
                     implementation: str) -> dict[str, Any]:
    """The params tree (stacked "layers" when ``scan_layers``, else "layers_0".."layers_{L-1}")
    with the file's quantized projections and embedding as ``QuantizedWeight``.

    Args:
        family: the file's ``ModelFamily``; ``hf_config`` and ``config`` its transformers and
            model configs (the float conversion's ``config.json``: the same metadata).
        dtype: numpy dtype of the float leaves.
        implementation: ``QuantizedWeight.implementation`` of every packed leaf.

    Raises:
        ValueError: the file's tensors do not match the family's map, or a shape differs.
    """
    reader = open_gguf(gguf_path)
    names = [t.name for t in reader.tensors]
    mapping = family.gguf.tensor_map(hf_config)
    if problems := name_mismatches(mapping, names):
        raise ValueError(f"{gguf_path} does not match the {family.name} family: " + "; ".join(problems))
    specs: dict[str, list[WeightSpec]] = defaultdict(list)
    for spec in family.weight_map(config):
        specs[spec.hf_name].append(spec)

    # Which leaves keep their blocks: every tensor feeding them is of a packed type.
    sources: dict[Leaf, list[tuple[Any, WeightSpec]]] = defaultdict(list)
    for tensor in reader.tensors:
        for spec in specs[mapping[tensor.name][0]]:
            sources[(spec.path, spec.layer)].append((tensor, spec))
    num_layers = config.num_hidden_layers
    floats: dict[str, Any] = {}
    packed: dict[Leaf, QuantizedWeight] = {}
    for leaf, parts in sources.items():
        types = [t.tensor_type.name for t, _ in parts]
        keep = leaf[0][-1] in _PACKED_LEAVES and all(q in GGML_TYPES for q in types)
        if keep and _common_type(types) is None:
            logger.warning("%s of layer %s joins %s: dequantized to float", "/".join(leaf[0]),
                           leaf[1], sorted(set(types)))
            keep = False
        for tensor, spec in parts:
            expected = tuple(reversed([int(n) for n in tensor.shape]))
            if expected != spec.hf_shape:
                raise ValueError(f"{tensor.name} in {gguf_path} is {expected}, expected "
                                 f"{spec.hf_shape} from the model config")
        if keep:
            packed[leaf] = _packed_leaf(parts, mapping, implementation)
        else:
            for tensor, spec in parts:
                w = mapping[tensor.name][1](gguf_dequantize(tensor.data, tensor.tensor_type))
                place(floats, spec, spec.apply(w), num_layers, dtype)
    return _assemble(floats, packed, num_layers, dtype, scan_layers)


def _packed_leaf(parts: list[tuple[Any, WeightSpec]], mapping: dict, implementation: str
                 ) -> QuantizedWeight:
    """One leaf's tensors as packed rows, concatenated along N in their column order."""
    rows = []
    for tensor, spec in sorted(parts, key=lambda p: (p[1].columns or (0,))[0]):
        data = np.asarray(mapping[tensor.name][1](tensor.data))   # row transforms move packed rows
        for transform in spec.transforms:
            if transform is not transpose:                        # packed rows stay [N, K]
                data = transform(data)
        rows.append((tensor.tensor_type.name, data, spec.hf_shape[1]))
    qtype = _common_type([q for q, _, _ in rows])
    data = np.concatenate([_to_type(d, q, qtype) for q, d, _ in rows])
    return QuantizedWeight(data, None, qtype, (data.shape[0], rows[0][2]), implementation)


def _common_type(qtypes: list[str]) -> str | None:
    """One type all ``qtypes`` convert to exactly, or None."""
    kinds = set(qtypes)
    if len(kinds) == 1:
        return qtypes[0]
    return "Q8_0" if kinds <= {"Q8_0", *_TO_Q8_0_OFFSET} else None


def _to_type(data: np.ndarray, qtype: str, target: str) -> np.ndarray:
    """Packed rows of ``qtype`` re-encoded as ``target`` (only the exact conversions above)."""
    if qtype == target:
        return data
    values = gguf_dequantize(data, GGMLQuantizationType[qtype])          # d * (q - offset), exact
    block, size, _ = GGML_TYPES[qtype]
    blocks = data.reshape(*data.shape[:-1], -1, size)
    d16 = blocks[..., :2].copy().view(np.float16)                         # [..., nb, 1]
    d = d16.astype(np.float32)
    q = values.reshape(*blocks.shape[:-1], block) / np.where(d == 0, 1, d)
    q8 = np.rint(q).astype(np.int8).view(np.uint8)
    return np.concatenate([d16.view(np.uint8), q8], axis=-1).reshape(*data.shape[:-1], -1)


def _assemble(floats: dict[str, Any], packed: dict[Leaf, QuantizedWeight], num_layers: int,
              dtype: Any, scan_layers: bool) -> dict[str, Any]:
    from jaxllm.models.causal_lm import unstack_layers

    per_layer: dict[tuple[str, ...], list[QuantizedWeight]] = defaultdict(list)
    for (path, layer), weight in sorted(packed.items(), key=lambda item: item[0][1] or 0):
        if layer is None:
            _set(floats, path, weight)
        else:
            per_layer[path].append(weight)
    if scan_layers:
        for path, weights in per_layer.items():
            _set(floats, path, _stacked(path, weights, dtype))
        return floats
    params = unstack_layers(floats, num_layers) if "layers" in floats else floats
    for path, weights in per_layer.items():
        for i, weight in enumerate(weights):
            _set(params, (f"layers_{i}", *path[1:]), weight)
    return params


def _stacked(path: tuple[str, ...], weights: list[QuantizedWeight], dtype: Any) -> Any:
    """One stacked leaf [L, ...] of per-layer weights: packed when one type fits all layers,
    else float (the Flax kernel layout [L, K, N])."""
    qtype = _common_type([w.qtype for w in weights])
    if qtype is not None and len({w.shape for w in weights}) == 1:
        data = np.stack([_to_type(w.data, w.qtype, qtype) for w in weights])
        return QuantizedWeight(data, None, qtype, weights[0].shape, weights[0].implementation)
    logger.warning("%s mixes %s over its layers: dequantized to float, as scanned layers need "
                   "one type per stacked weight (scan_layers=False keeps each layer's blocks)",
                   "/".join(path), sorted({w.qtype for w in weights}))
    values = [gguf_dequantize(w.data, GGMLQuantizationType[w.qtype]) for w in weights]
    return np.stack([np.swapaxes(v, -1, -2) for v in values]).astype(dtype)


def _set(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
