"""The device side of LoRA serving: a fixed slab of adapter factors and the per-token update.

Shape legend: L layers, M slots (``max_loras``), D a projection's input dim, F its output dim,
R its rank (number of modules feeding it x ``max_lora_rank``), T tokens.

Per engine projection the slab holds ``a [L, D, M, R]`` and ``b [L, M, R, F]`` (scaling folded
into b). A token whose row runs under slot m adds ``x @ a[:, m] @ b[m]`` to the projection's
output; slot -1 adds nothing.

How the batched product is computed: punica/S-LoRA gather each token's A and B (BGMV) — on a
GPU kernel that reads each adapter once. Through XLA a gather materialises [T, D, R] copies
(64 decode rows x SmolLM2's 30 layers x 5 projections: ~1 GB per step), so here every token
meets all M slots in two dense matmuls, ``[T, D] x [D, M R]`` then, with the other slots'
columns zeroed, ``[T, M R] x [M R, F]``: the slab is read once per step, whatever the mix of
adapters, at 2 T M R (D + F) flops per projection. A step without LoRA rows skips it (cond).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.lora.adapter import LoRAAdapter
from jaxllm.lora.targets import Projection, TargetModule


def lora_delta(x: jax.Array, a: jax.Array, b: jax.Array, slots: jax.Array) -> jax.Array:
    """x [T, D] @ a[:, slot] @ b[slot] per token; zero where slots [T] is -1. a [D, M, R],
    b [M, R, F] -> [T, F] in a's dtype."""
    num_slots = b.shape[0]
    h = jnp.einsum("td,dmr->tmr", x.astype(a.dtype), a)                       # [T, M, R]
    h = jnp.where((slots[:, None] == jnp.arange(num_slots))[:, :, None], h, 0)
    return jnp.einsum("tmr,mrf->tf", h, b)                                     # [T, F]


def apply_lora(module: nn.Module, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """y (the output of ``module``'s projection ``name`` on x) plus the LoRA update of each
    token, when the ``"lora"`` collection has this projection (``lora_variables``)."""
    lora = module.get_variable("lora", name)
    if lora is None:
        return y
    slots = lora["slots"]
    return jax.lax.cond(
        jnp.any(slots >= 0),
        lambda: y + lora_delta(x, lora["a"], lora["b"], slots).astype(y.dtype),
        lambda: y)


def lora_variables(arrays: dict[str, tuple[jax.Array, jax.Array]], token_slots: jax.Array,
                   scan_layers: bool) -> dict[str, Any]:
    """The ``"lora"`` collection the model reads: the slab laid out as its params (under
    "layers" stacked [L, ...] for a scanned model, which slices it per layer like the params,
    else per "layers_{i}"), each projection's entry with the tokens' slots [T]."""
    num_layers = next(iter(arrays.values()))[0].shape[0]

    def tree(layer: int | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for name, (a, b) in arrays.items():
            parent, proj = name.split("/")
            slots = (token_slots if layer is not None
                     else jnp.broadcast_to(token_slots, (num_layers, *token_slots.shape)))
            out.setdefault(parent, {})[proj] = {
                "a": a if layer is None else a[layer], "b": b if layer is None else b[layer],
                "slots": slots}
        return out

    if scan_layers:
        return {"layers": tree(None)}
    return {f"layers_{i}": tree(i) for i in range(num_layers)}


def engine_factors(adapter: LoRAAdapter, targets: dict[str, TargetModule],
                   projections: dict[str, Projection], max_rank: int
                   ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """One adapter as each projection's (a [L, D, R], b [L, R, F]), scaling folded into b
    (``jaxllm.lora.targets`` for the layout). Differentiable: training builds its forward
    through it."""
    num_layers = next(iter(adapter.weights.values()))[0].shape[0]
    out = {name: [jnp.zeros((num_layers, p.in_dim, p.num_blocks * max_rank), jnp.float32),
                  jnp.zeros((num_layers, p.num_blocks * max_rank, p.out_dim), jnp.float32)]
           for name, p in projections.items()}
    for module, (a, b) in adapter.weights.items():
        rank = a.shape[-1]
        for p in targets[module].placements:
            start = p.block * max_rank
            fa, fb = out[p.projection]
            out[p.projection] = [
                fa.at[:, :, start:start + rank].set(a),
                fb.at[:, start:start + rank, p.columns[0]:p.columns[1]].set(
                    b[:, :, p.rows[0]:p.rows[1]] * adapter.scaling)]
    return {name: (a, b) for name, (a, b) in out.items()}


@jax.jit
def _write_slot(arrays: dict, slot: jax.Array, factors: dict) -> dict:
    return {name: (a.at[:, :, slot].set(factors[name][0].astype(a.dtype)),
                   b.at[:, slot].set(factors[name][1].astype(b.dtype)))
            for name, (a, b) in arrays.items()}


class LoRASlab:
    """The device slab: ``arrays[projection] = (a [L, D, M, R], b [L, M, R, F])``, and which
    adapter (``lora_int_id``) each slot holds. ``load`` replaces the arrays (a step in flight
    keeps the ones it was given)."""

    def __init__(self, projections: dict[str, Projection], targets: dict[str, TargetModule],
                 num_layers: int, max_loras: int, max_rank: int, dtype: Any,
                 device: jax.Device | None = None) -> None:
        self.projections, self.targets, self.max_rank = projections, targets, max_rank
        self.device = device
        self.arrays = jax.device_put(
            {name: (jnp.zeros((num_layers, p.in_dim, max_loras, p.num_blocks * max_rank), dtype),
                    jnp.zeros((num_layers, max_loras, p.num_blocks * max_rank, p.out_dim), dtype))
             for name, p in projections.items()}, device)
        self.loaded: list[int | None] = [None] * max_loras

    def load(self, slot: int, lora_int_id: int, adapter: LoRAAdapter) -> None:
        """Makes ``slot`` hold the adapter (nothing to do when it already does)."""
        if self.loaded[slot] == lora_int_id:
            return
        factors = jax.device_put(
            engine_factors(adapter, self.targets, self.projections, self.max_rank), self.device)
        self.arrays = _write_slot(self.arrays, jnp.int32(slot), factors)
        self.loaded[slot] = lora_int_id
