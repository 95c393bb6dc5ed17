"""The pytrees that cross the host/device boundary once per step.

Shape legend: T tokens in the step (bucketed), S sequences (rows, bucketed), P blocks per row
(bucketed), V vocabulary, A strategy arguments, W a sparse token list's width
(``SamplingLimits``), C block copies per step, K max logprobs, R rotary tables (one per
distinct RoPE base of the model), N token-count slots. The token layout the attention kernels
read is their own ``AttentionMetadata`` (``jaxllm.kernels.paged_attention.metadata``).

Every array's shape is a function of the step key (T, S, P) and the engine's fixed widths, and
their padding values are declared once (``jaxllm.step_layout``; the sampling rows in
``jaxllm.sampling_rows``): no request, whatever sampling features it uses, changes a shape.

Rotary cos/sin come from the host (``rotary``), computed once per step from the positions: left
to XLA:CPU, cos(positions x inv_freq) was fused into every layer's rotary fusion and evaluated
again per head and layer (~40 ms of a 512-token SmolLM2 step, ~12 ms of a 64-row decode).
A model with several RoPE tables (Gemma 3: local and global bases) gets one per table; each
layer reads its own (``ModelConfig.layer_rope``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import numpy as np

from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kv_cache import KVCache
from jaxllm.sampling_rows import ROW_FIELDS


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array            # [T] int32   flattened new tokens of every scheduled row
    attention: AttentionMetadata    # positions, slots, rows [T]; block tables [S, P]; context [S]
    logits_indices: jax.Array       # [S] int32   index in T of each row's last token
    rotary: jax.Array               # [R, T, Hr] float32 cos | sin of each token's rotary angles
                                    #   (Hr/2 each; Hr = the rotated part of the head dim)


def _build(cls: type, num_rows: int, **values: Any) -> Any:
    """Host arrays for ``num_rows`` rows: every field's pad unless given in ``values``.

    [S] fields broadcast a scalar or take an [S] array; [S, W] fields take an array (default
    width 1 of pads; the grammar mask, none). For tests and for trying a strategy on hand-made
    logits.
    """
    fields = {}
    for name, field in ROW_FIELDS.items():
        shape = (num_rows,) if field.width is None else (num_rows, int(field.width != "mask_words"))
        if name in values:
            value = np.asarray(values.pop(name), field.dtype)
            shape = shape if field.width is None else value.shape
        else:
            value = field.pad
        fields[name] = np.broadcast_to(np.asarray(value, field.dtype), shape).copy()
    if values:
        raise TypeError(f"unknown SamplingTensors fields: {sorted(values)}")
    return cls(**fields)


# One column per ``sampling_rows.ROW_FIELDS`` entry, in its order: [S] or [S, W] (see there
# for each column's dtype, padding value and source).
SamplingTensors = jax.tree_util.register_dataclass(dataclasses.make_dataclass(
    "SamplingTensors", [(name, jax.Array) for name in ROW_FIELDS], frozen=True,
    namespace={"build": classmethod(_build), "__module__": __name__,
               "__doc__": "Per-row sampling settings: the columns of sampling_rows.ROW_FIELDS."}))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepArrays:
    """Everything a step takes from the host, shipped packed (``jaxllm.packing``)."""

    inputs: StepInputs
    sampling: SamplingTensors
    feedback_rows: jax.Array     # [T] int32   row of the previous step whose token this is, -1 none
    prompt_next_ids: jax.Array   # [T] int32   next prompt token after each token, -1 none
    block_copies: jax.Array      # [C, 2] int32 copy-on-write (src, dst) blocks; (0, 0) none
    draft_token_ids: jax.Array   # [S, Ks] int32 each row's proposed tokens (speculative decoding;
                                 #   Ks = num_speculative_tokens, 0 without), -1 padded
    lora_slots: jax.Array        # [T] int32   LoRA slot of each token's row, -1 none


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What stays on the device between steps; donated to each step, updated in place."""

    kv_cache: KVCache
    last_tokens: jax.Array       # [S_max] int32 each row's token of the previous step (feedback)
    token_counts: jax.Array      # [N, V] int32 per-slot token counts for penalties
                                 #   (``jaxllm.penalties``: 2 x output count + seen in prompt)


class StepKey(NamedTuple):
    """The static key a step is compiled for: its bucket (T, S, P), whether Python logits
    processors run in it (the one variant with a host callback), and whether a row is
    constrained by structured outputs (the variant that ships a token bitmask). Both variants
    compile on first use."""

    num_tokens: int
    num_rows: int
    num_blocks: int
    host_processors: bool = False
    structured: bool = False


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    token_ids: jax.Array             # [S] int32    sampled token of each row
    logprobs: jax.Array              # [S] float32  log-softmax of the raw logits at that token
    ranks: jax.Array                 # [S] int32    its rank (1 = most likely); 0 if not asked
    top_token_ids: jax.Array         # [S, K] int32   most likely tokens, when asked
    top_logprobs: jax.Array          # [S, K] float32 and their logprobs
    prompt_logprobs: jax.Array       # [T] float32 logprob of the next prompt token
    prompt_ranks: jax.Array          # [T] int32
    prompt_top_token_ids: jax.Array  # [T, K] int32
    prompt_top_logprobs: jax.Array   # [T, K] float32
    # Speculative decoding (``jaxllm.rejection_sampler.emit``): each row's emitted tokens are
    # spec_token_ids[r, :num_accepted[r] + 1]; [S, 1] and zeros without speculation.
    spec_token_ids: jax.Array        # [S, Ks + 1] int32
    spec_logprobs: jax.Array         # [S, Ks + 1] float32
    num_accepted: jax.Array          # [S] int32
