"""HF safetensors checkpoint (one file or sharded) -> the engine's params pytree.

Which tensors a checkpoint must hold and where each goes is the family's weight map
(``ModelFamily.weight_map``: a list of ``weight_spec.WeightSpec``); the tree it builds is
described in ``jaxllm.models.causal_lm``.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .file_checks import CheckpointFileError, open_safetensors
from .weight_spec import WeightSpec, place

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that hold nothing the engine needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF model directory: the index's shards, or model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            contents = json.loads(index.read_text())
        except ValueError as e:
            raise CheckpointFileError(f"{index} is not a valid index (JSON: {e})") from e
        if not isinstance(contents, dict) or not isinstance(contents.get("weight_map"), dict):
            raise CheckpointFileError(f"{index} has no 'weight_map' of tensor names to files")
        return [model_dir / name for name in sorted(set(contents["weight_map"].values()))]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_params(model_dir: str | os.PathLike, specs: list[WeightSpec], num_layers: int,
                dtype: DTypeLike = np.float32, *, optional: Iterable[str] = (),
                description: str = "the model config") -> dict[str, Any]:
    """Reads an HF checkpoint into the engine's params tree, as a family's weight map says.

    Args:
        model_dir: local HF directory with ``model.safetensors`` or sharded files plus
            ``model.safetensors.index.json``.
        specs: the weight map: every tensor the checkpoint must hold and where it goes.
        num_layers: the length of the stacked layer axis.
        dtype: numpy dtype of every leaf, e.g. ``np.float32`` or ``ml_dtypes.bfloat16``.
        optional: names the checkpoint may hold without a spec (ignored), e.g. the duplicate
            ``lm_head.weight`` some tied checkpoints store.
        description: what the specs were derived from, for error messages.

    Returns:
        Nested dict of numpy arrays. Each tensor is read, transformed and copied into its
        preallocated leaf one at a time, so peak memory is the tree plus one tensor.

    Raises:
        ValueError: a tensor is missing, unexpected, or has the wrong shape.
        CheckpointFileError: a file is empty, truncated or corrupt (checked from its header
            before any tensor is read).
    """
    by_name: dict[str, list[WeightSpec]] = defaultdict(list)
    for spec in specs:
        by_name[spec.hf_name].append(spec)
    files = checkpoint_files(model_dir)
    names_by_file = {}
    for path in files:
        with open_safetensors(path) as f:
            names_by_file[path] = [n for n in f.keys() if not n.endswith(_IGNORED_SUFFIXES)]
    found = {n for names in names_by_file.values() for n in names} - set(optional)
    if problems := name_mismatches(by_name, found):
        raise ValueError(f"Checkpoint {model_dir} does not match {description}: " + "; ".join(problems))

    params: dict[str, Any] = {}
    for path, names in names_by_file.items():
        with open_safetensors(path) as f:
            for name in names:
                if name not in by_name:  # an optional tensor
                    continue
                tensor = f.get_tensor(name)
                for spec in by_name[name]:
                    if tensor.shape != spec.hf_shape:
                        raise ValueError(f"{name} in {path} has shape {tensor.shape}, expected "
                                         f"{spec.hf_shape} from {description}")
                    place(params, spec, spec.apply(tensor), num_layers, dtype)
    return params


def name_mismatches(expected: Iterable[str], found: Iterable[str], limit: int = 8) -> list[str]:
    """Lines naming the missing and the unexpected tensors; empty when the two name sets agree."""
    expected, found = set(expected), set(found)
    problems = []
    for kind, names in (("missing", sorted(expected - found)), ("unexpected", sorted(found - expected))):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            problems.append(f"{kind} tensors: {', '.join(names[:limit])}{more}")
    return problems
