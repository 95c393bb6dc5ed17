"""Where a PEFT adapter's modules land among the engine's projections.

A PEFT adapter names transformers modules (``q_proj``, Phi-3's ``qkv_proj``, ``gate_up_proj``
...); the engine runs fused projections (q|k|v as one ``self_attn/qkv_proj``; Phi-3's gate|up
split into ``mlp/gate_proj`` and ``mlp/up_proj``). Both facts already live in the family's
weight map (``columns`` of a fused leaf, ``TakeRows`` of a fused tensor), so the LoRA map is
read from it, not written again per family.

An engine projection fed by n modules gets n rank blocks: module k's A fills columns
[k R, k R + r) of the projection's A, its B (scaled) the same rows of the projection's B, at
the module's output columns. Blocks an adapter does not use stay zero, so any adapter fits any
slot and the compiled step never changes shape.
"""

from __future__ import annotations

import dataclasses

from jaxllm.checkpoints_convert.weight_spec import TakeRows, WeightSpec


@dataclasses.dataclass(frozen=True)
class Placement:
    projection: str              # engine projection, e.g. "self_attn/qkv_proj"
    rows: tuple[int, int]        # output features of the module taken (rows of its lora_B)
    columns: tuple[int, int]     # where they land in the projection's output
    block: int                   # the module's rank block in that projection


@dataclasses.dataclass(frozen=True)
class TargetModule:
    name: str                    # transformers module name, e.g. "q_proj"
    in_dim: int
    out_dim: int
    placements: tuple[Placement, ...]


@dataclasses.dataclass(frozen=True)
class Projection:
    name: str                    # "self_attn/qkv_proj": its path under a layer's params
    in_dim: int
    out_dim: int
    num_blocks: int              # modules feeding it: its rank is num_blocks x max rank


def lora_targets(weight_map: list[WeightSpec]) -> tuple[dict[str, TargetModule], dict[str, Projection]]:
    """(targetable modules by name, engine projections by name) of a family's weight map."""
    modules: dict[str, list] = {}
    dims: dict[str, tuple[int, int]] = {}
    projections: dict[str, list] = {}
    for spec in weight_map:
        if spec.layer != 0 or spec.path[0] != "layers" or spec.path[-1] != "kernel":
            continue
        name = spec.hf_name.split(".")[-2]
        out_dim, in_dim = spec.hf_shape
        projection = "/".join(spec.path[1:-1])
        take = next((t for t in spec.transforms if isinstance(t, TakeRows)), None)
        rows = (take.start, take.stop) if take else (0, out_dim)
        columns = spec.columns or (0, rows[1] - rows[0])
        width = spec.leaf_shape[-1] if spec.leaf_shape else rows[1] - rows[0]
        feeders = projections.setdefault(projection, [in_dim, width, []])[2]
        if name not in feeders:
            feeders.append(name)
        dims[name] = (in_dim, out_dim)
        modules.setdefault(name, []).append(
            Placement(projection, rows, columns, feeders.index(name)))
    return ({name: TargetModule(name, *dims[name], tuple(p)) for name, p in modules.items()},
            {name: Projection(name, d_in, d_out, len(feeders))
             for name, (d_in, d_out, feeders) in projections.items()})
