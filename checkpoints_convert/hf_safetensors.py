"""HF safetensors checkpoint (one file or sharded) -> the engine's params pytree.

The tree uses Flax linen names and stacks every per-layer leaf along a leading layer axis L:

    embed_tokens/embedding                      [V, D]
    layers/input_layernorm/scale                [L, D]
    layers/self_attn/{q,k,v,o}_proj/kernel      [L, D, N*H] [L, D, K*H] [L, D, K*H] [L, N*H, D]
    layers/self_attn/{q,k,v,o}_proj/bias        [L, out]    (only with config.attention_bias)
    layers/post_attention_layernorm/scale       [L, D]
    layers/mlp/{gate,up,down}_proj/kernel       [L, D, F] [L, D, F] [L, F, D]
    layers/mlp/{gate,up,down}_proj/bias         [L, out]    (only with config.mlp_bias)
    norm/scale                                  [D]
    lm_head/kernel                              [D, V]      (only without tied embeddings)

Legend: V vocab, D hidden size, L layers, N query heads, K kv heads, H head dim, F MLP width.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike
from safetensors import safe_open

if TYPE_CHECKING:
    from jaxllm.config import ModelConfig

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Tensors some checkpoints carry that hold nothing the engine needs.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

Transform = Callable[[np.ndarray], np.ndarray]


def identity(w: np.ndarray) -> np.ndarray:
    return w


def transpose(w: np.ndarray) -> np.ndarray:
    """HF nn.Linear weight [out, in] -> Flax Dense kernel [in, out]."""
    return w.T


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Where one HF tensor goes in the params tree, and how it gets there."""

    path: tuple[str, ...]  # keys down the params tree
    hf_shape: tuple[int, ...]  # shape stored in the checkpoint
    transform: Transform
    layer: int | None = None  # index along the stacked layer axis; None for global leaves


def weight_map(config: ModelConfig) -> dict[str, WeightSpec]:
    """Every HF tensor name the checkpoint of ``config`` must hold, mapped to its place in the tree."""
    c = config
    d, f = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim

    # suffix after "model.layers.{i}." -> (tree path below "layers", hf shape, transform)
    linears = {
        ("self_attn", "q_proj"): (q_dim, d, c.attention_bias),
        ("self_attn", "k_proj"): (kv_dim, d, c.attention_bias),
        ("self_attn", "v_proj"): (kv_dim, d, c.attention_bias),
        ("self_attn", "o_proj"): (d, q_dim, c.attention_bias),
        ("mlp", "gate_proj"): (f, d, c.mlp_bias),
        ("mlp", "up_proj"): (f, d, c.mlp_bias),
        ("mlp", "down_proj"): (d, f, c.mlp_bias),
    }
    per_layer: dict[str, tuple[tuple[str, ...], tuple[int, ...], Transform]] = {
        "input_layernorm.weight": (("input_layernorm", "scale"), (d,), identity),
        "post_attention_layernorm.weight": (("post_attention_layernorm", "scale"), (d,), identity),
    }
    for (block, proj), (out_dim, in_dim, has_bias) in linears.items():
        per_layer[f"{block}.{proj}.weight"] = ((block, proj, "kernel"), (out_dim, in_dim), transpose)
        if has_bias:
            per_layer[f"{block}.{proj}.bias"] = ((block, proj, "bias"), (out_dim,), identity)

    specs = {
        "model.embed_tokens.weight": WeightSpec(("embed_tokens", "embedding"), (c.vocab_size, d), identity),
        "model.norm.weight": WeightSpec(("norm", "scale"), (d,), identity),
    }
    if not c.tie_word_embeddings:
        specs["lm_head.weight"] = WeightSpec(("lm_head", "kernel"), (c.vocab_size, d), transpose)
    for i in range(c.num_hidden_layers):
        for suffix, (path, hf_shape, transform) in per_layer.items():
            specs[f"model.layers.{i}.{suffix}"] = WeightSpec(("layers", *path), hf_shape, transform, i)
    return specs


def checkpoint_files(model_dir: str | os.PathLike) -> list[Path]:
    """The safetensors files of an HF model directory: the index's shards, or model.safetensors."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        shard_names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in shard_names]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    raise FileNotFoundError(f"{model_dir} holds neither {SINGLE_FILE} nor {INDEX_FILE}")


def load_params(model_dir: str | os.PathLike, config: ModelConfig,
                dtype: DTypeLike = np.float32) -> dict[str, Any]:
    """Reads an HF Llama-family checkpoint into the engine's params tree (layout in the module doc).

    Args:
        model_dir: local HF directory with ``model.safetensors`` or sharded files plus
            ``model.safetensors.index.json``; names carry the usual ``model.`` prefix.
        config: the model's architecture; decides which tensors must exist and their shapes.
        dtype: numpy dtype of every leaf, e.g. ``np.float32`` or ``ml_dtypes.bfloat16``.

    Returns:
        Nested dict of numpy arrays. Each tensor is read, converted and copied into its
        preallocated leaf one at a time, so peak memory is the tree plus one tensor.

    Raises:
        ValueError: a tensor is missing, unexpected, or has the wrong shape.
    """
    specs = weight_map(config)
    files = checkpoint_files(model_dir)
    names_by_file = {}
    for path in files:
        with safe_open(path, framework="numpy") as f:
            names_by_file[path] = [n for n in f.keys() if not n.endswith(_IGNORED_SUFFIXES)]
    _check_names(specs, [n for names in names_by_file.values() for n in names], config, model_dir)

    params: dict[str, Any] = {}
    num_layers = config.num_hidden_layers
    for path, names in names_by_file.items():
        with safe_open(path, framework="numpy") as f:
            for name in names:
                spec = specs.get(name)
                if spec is None:  # a duplicate lm_head of tied embeddings, see _check_names
                    continue
                tensor = f.get_tensor(name)
                if tensor.shape != spec.hf_shape:
                    raise ValueError(f"{name} in {path} has shape {tensor.shape}, expected "
                                     f"{spec.hf_shape} from the model config")
                value = spec.transform(tensor)
                if spec.layer is None:
                    _set_leaf(params, spec.path, np.ascontiguousarray(value, dtype=dtype))
                else:
                    leaf = _get_leaf(params, spec.path)
                    if leaf is None:
                        leaf = _set_leaf(params, spec.path,
                                         np.empty((num_layers, *value.shape), dtype))
                    leaf[spec.layer] = value  # casts to dtype on the copy
    return params


def _check_names(specs: dict[str, WeightSpec], names: list[str], config: ModelConfig,
                 model_dir: str | os.PathLike) -> None:
    found = set(names)
    if config.tie_word_embeddings:
        # Some tied checkpoints store the shared matrix twice; the embedding is the one used.
        found.discard("lm_head.weight")
    if problems := name_mismatches(specs, found):
        raise ValueError(f"Checkpoint {model_dir} does not match the model config "
                         f"({config.architecture}, {config.num_hidden_layers} layers): "
                         + "; ".join(problems))


def name_mismatches(expected: Iterable[str], found: Iterable[str], limit: int = 8) -> list[str]:
    """Lines naming the missing and the unexpected tensors; empty when the two name sets agree."""
    expected, found = set(expected), set(found)
    problems = []
    for kind, names in (("missing", sorted(expected - found)), ("unexpected", sorted(found - expected))):
        if names:
            more = f" and {len(names) - limit} more" if len(names) > limit else ""
            problems.append(f"{kind} tensors: {', '.join(names[:limit])}{more}")
    return problems


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
