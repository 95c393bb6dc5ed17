"""How one checkpoint tensor lands in the params tree: a path, a layer, named transforms.

A family's weight map (``ModelFamily.weight_map``) is a list of ``WeightSpec``. Conversions
that change the layout happen here, at load, by name: ``transpose`` (HF [out, in] -> Flax
[in, out]), ``TakeRows`` (one half of a fused tensor), and ``columns`` (several tensors
concatenated into one leaf, e.g. q | k | v). One tensor may feed several specs (Phi-3's
gate_up_proj -> gate_proj and up_proj).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

Transform = Callable[[np.ndarray], np.ndarray]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def transpose(w: np.ndarray) -> np.ndarray:
    """HF nn.Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return w.T


@dataclasses.dataclass(frozen=True)
class TakeRows:
    """w[start:stop]: one part of a tensor fused along its first (output) axis."""

    start: int
    stop: int

    def __call__(self, w: np.ndarray) -> np.ndarray:
        if w.shape[0] < self.stop:
            raise ValueError(f"cannot take rows {self.start}:{self.stop} of a {w.shape} tensor")
        return w[self.start:self.stop]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """One checkpoint tensor (or a part of it), and where it goes in the params tree.

    Attributes:
        hf_name: the tensor's name in the checkpoint.
        hf_shape: the shape it must have there.
        path: keys down the params tree to the leaf.
        transforms: applied in order to the tensor as read.
        layer: index along the stacked layer axis; None for global leaves.
        columns: (start, stop) along the leaf's last axis that this tensor fills, when several
            tensors share one leaf; None fills the whole leaf.
        leaf_shape: the (per-layer) shape of that shared leaf; required with ``columns``.
    """

    hf_name: str
    hf_shape: tuple[int, ...]
    path: tuple[str, ...]
    transforms: tuple[Transform, ...] = ()
    layer: int | None = None
    columns: tuple[int, int] | None = None
    leaf_shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.columns is None) != (self.leaf_shape is None):
            raise ValueError(f"{self.hf_name}: columns and leaf_shape go together")

    def apply(self, tensor: np.ndarray) -> np.ndarray:
        for transform in self.transforms:
            tensor = transform(tensor)
        return tensor


def place(params: dict[str, Any], spec: WeightSpec, value: np.ndarray, num_layers: int,
          dtype: Any) -> None:
    """Writes a transformed tensor into its leaf, allocating the leaf on first use."""
    leaf_shape = spec.leaf_shape or value.shape
    full_shape = leaf_shape if spec.layer is None else (num_layers, *leaf_shape)
    leaf = _get_leaf(params, spec.path)
    if leaf is None:
        leaf = _set_leaf(params, spec.path, np.empty(full_shape, dtype))
    target = leaf if spec.layer is None else leaf[spec.layer]
    if spec.columns is not None:
        target = target[..., spec.columns[0]:spec.columns[1]]
    if target.shape != value.shape:
        raise ValueError(f"{spec.hf_name}: a {value.shape} tensor does not fit {spec.path} "
                         f"{target.shape}")
    target[...] = value  # casts to dtype on the copy


def _get_leaf(tree: dict[str, Any], path: tuple[str, ...]) -> np.ndarray | None:
    for key in path:
        if key not in tree:
            return None
        tree = tree[key]
    return tree


def _set_leaf(tree: dict[str, Any], path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value
    return value
