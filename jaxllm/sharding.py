"""Tensor parallelism over a ``jax.sharding.Mesh``: one "tp" axis of N devices.

The params are placed with ``NamedSharding`` rules each family declares beside its weight map
(``ModelFamily.partition_rules``, Megatron's split: ``family.DECODER_PARTITION_RULES``) and
GSPMD inserts the collectives of the one compiled step (an all-reduce after o_proj and after
down_proj, and around the vocabulary-split embedding and head). Attention runs per shard inside
``shard_map`` over the head axis, so any registered implementation (the C++ CPU kernel, the
Pallas GPU kernel: custom calls GSPMD cannot partition) sees its shard's heads only. The KV cache
is split over kv heads; the host (scheduler, KV manager, buckets) keeps one logical block pool.

Two layout changes make the split work, both done once at load:
  * the fused q|k|v kernel [D, (N + 2K) H] is reordered into N blocks [q_s | k_s | v_s], so a
    column split hands each device whole heads of all three (``ModelConfig.qkv_shards`` tells
    ``layers.Attention`` how to cut it);
  * with fewer kv heads than devices (N % K == 0), each kv head is repeated N / K times, as vLLM
    does, so every device holds the one kv head its query heads use: the model then runs with N
    kv heads (memory per device: one head's KV, the same as K = N would take).
Splits that cannot work are refused at ``Engine()``, naming the head counts.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxllm.config import ModelConfig

TP_AXIS = "tp"
# (regex matched against the end of a leaf's "/"-joined path, its spec over the leaf's trailing
# axes): a stacked layer leaf's leading L axis is never split. Leaves no rule matches are
# replicated.
PartitionRules = tuple[tuple[str, tuple[str | None, ...]], ...]


def check_tensor_parallel(config: ModelConfig, size: int, num_devices: int) -> None:
    """Refuses a split this model or machine cannot take, naming the numbers.

    Raises:
        ValueError: query heads or the MLP width not divisible by ``size``, kv heads that
            neither divide nor are divided by it, or more devices asked than there are.
    """
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % size:
        raise ValueError(f"num_attention_heads ({heads}) must be divisible by "
                         f"tensor_parallel_size ({size})")
    if kv_heads % size and size % kv_heads:
        raise ValueError(f"num_key_value_heads ({kv_heads}) and tensor_parallel_size ({size}): "
                         "one must divide the other (kv heads are split, or replicated when fewer)")
    if config.intermediate_size % size:
        raise ValueError(f"intermediate_size ({config.intermediate_size}) must be divisible by "
                         f"tensor_parallel_size ({size})")
    if size > num_devices:
        raise ValueError(f"tensor_parallel_size={size} needs {size} devices; "
                         f"{jax.default_backend()} has {num_devices}")


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """A model split over ``size`` devices: its mesh, the config the sharded model runs with,
    and how params, KV cache and attention are laid out on it.

    Attributes:
        source: the checkpoint's config.
        config: the one the model runs with: q|k|v in ``size`` blocks, kv heads replicated up
            to ``size`` when there are fewer.
    """

    source: ModelConfig
    size: int
    rules: PartitionRules
    config: ModelConfig
    mesh: Mesh

    @classmethod
    def create(cls, config: ModelConfig, size: int, rules: PartitionRules,
               family: str, devices: list[jax.Device] | None = None) -> TensorParallel:
        """Checks the split (``check_tensor_parallel``) and builds the mesh over ``devices``
        (a data-parallel replica's group) or the first ``size`` devices.

        Raises:
            ValueError: the split is impossible, or the family declares no partition rules.
        """
        check_tensor_parallel(config, size, jax.device_count())
        if not rules:
            raise ValueError(f"the {family} family declares no partition rules: "
                             "tensor_parallel_size must be 1")
        sharded = dataclasses.replace(config, qkv_shards=size,
                                      num_key_value_heads=max(config.num_key_value_heads, size))
        group = (devices or jax.devices())[:size]
        mesh = Mesh(np.asarray(group), (TP_AXIS,), axis_types=(AxisType.Auto,))
        return cls(config, size, rules, sharded, mesh)

    def layout_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Host params of the checkpoint (stacked layers) -> the sharded model's layout:
        q|k|v columns reordered per shard, kv heads repeated when replicated."""
        attn = params["layers"]["self_attn"]
        columns = self._qkv_columns()
        qkv = {name: np.take(leaf, columns, axis=-1) for name, leaf in attn["qkv_proj"].items()}
        return {**params, "layers": {**params["layers"],
                                     "self_attn": {**attn, "qkv_proj": qkv}}}

    def _qkv_columns(self) -> np.ndarray:
        """For each column of the sharded fused axis, its column in the checkpoint's q|k|v."""
        src, head_dim = self.source, self.source.head_dim
        heads, kv_heads = src.num_attention_heads, src.num_key_value_heads
        # Replicated kv head j of the sharded model is the checkpoint's head j * K // K'.
        kv_total = self.config.num_key_value_heads
        q_per, kv_per = heads // self.size, kv_total // self.size
        blocks = []
        for s in range(self.size):
            kv = [j * kv_heads // kv_total for j in range(s * kv_per, (s + 1) * kv_per)]
            q_heads = range(s * q_per, (s + 1) * q_per)
            k_heads = [heads + h for h in kv]
            v_heads = [heads + kv_heads + h for h in kv]
            for h in (*q_heads, *k_heads, *v_heads):
                blocks.append(np.arange(h * head_dim, (h + 1) * head_dim))
        return np.concatenate(blocks)

    def param_sharding(self, path: str, ndim: int) -> NamedSharding:
        """The sharding of the leaf at ``path`` ("a/b/c") of ``ndim`` axes."""
        for pattern, spec in self.rules:
            if re.search(f"(^|/){pattern}$", path):
                return NamedSharding(self.mesh, PartitionSpec(*(None,) * (ndim - len(spec)), *spec))
        return NamedSharding(self.mesh, PartitionSpec())

    def place_params(self, params: dict[str, Any]) -> dict[str, Any]:
        """Puts each leaf on the mesh, split by the family's rules."""
        def place(path: tuple, leaf: Any) -> jax.Array:
            name = "/".join(str(getattr(p, "key", p)) for p in path)
            return jax.device_put(leaf, self.param_sharding(name, np.ndim(leaf)))

        return jax.tree_util.tree_map_with_path(place, params)

    @property
    def kv_cache_sharding(self) -> NamedSharding:
        """[L, B, Z, K, H] split over K: each device holds its heads of every block."""
        return NamedSharding(self.mesh, PartitionSpec(None, None, None, TP_AXIS, None))

    def attention(self, attention_fn: Callable) -> Callable:
        """``attention_fn`` run per shard: q [T, N, H], k/v [T, K, H] and the caches split over
        heads, the step's metadata (and a traced layer index or window) replicated."""
        heads = PartitionSpec(None, TP_AXIS, None)
        cache = self.kv_cache_sharding.spec
        mesh = self.mesh

        def sharded(q, k, v, k_cache, v_cache, layer, metadata, *, scale, sliding_window=None):
            traced = [isinstance(a, jax.Array) for a in (layer, sliding_window)]

            def local(q, k, v, k_cache, v_cache, metadata, *dynamic):
                rest = iter(dynamic)
                layer_, window = (next(rest) if t else a
                                  for t, a in zip(traced, (layer, sliding_window)))
                return attention_fn(q, k, v, k_cache, v_cache, layer_, metadata, scale=scale,
                                    sliding_window=window)

            dynamic = [a for t, a in zip(traced, (layer, sliding_window)) if t]
            # A quantized cache's scales [L, B, Z, K] are split like its values, over K.
            caches = jax.tree.map(lambda a: PartitionSpec(*cache[:a.ndim]), k_cache)
            run = jax.shard_map(
                local, mesh=mesh, check_vma=False,
                in_specs=(heads, heads, heads, caches, caches, PartitionSpec())
                + (PartitionSpec(),) * len(dynamic),
                out_specs=(heads, caches, caches))
            return run(q, k, v, k_cache, v_cache, metadata, *dynamic)

        return sharded
