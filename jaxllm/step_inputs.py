"""The pytrees that cross the host/device boundary once per step.

Shape legend: T tokens in the step (bucketed), S sequences (rows, bucketed), P blocks per row
(bucketed), V vocabulary. Padding: padded tokens have row -1 and write to slots of the reserved
block 0; padded rows have an all-zero block table and context length 0.
"""

from __future__ import annotations

import dataclasses

import jax

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array       # [T] int32   flattened new tokens of every scheduled row
    positions: jax.Array       # [T] int32   position of each token in its sequence
    slot_mapping: jax.Array    # [T] int32   cache slot (block_id * block_size + offset) to write
    token_rows: jax.Array      # [T] int32   row of each token, -1 for padding
    block_tables: jax.Array    # [S, P] int32 blocks holding each row's cached context
    context_lens: jax.Array    # [S] int32   tokens of each row already in the cache
    logits_indices: jax.Array  # [S] int32   index in T of each row's last token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array     # [S] float32  0 = greedy
    top_k: jax.Array           # [S] int32    0 = disabled
    top_p: jax.Array           # [S] float32  1 = disabled
    seeds: jax.Array           # [S] uint32   per-request seed (low 32 bits)
    output_index: jax.Array    # [S] int32    index of the token being sampled in the output


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    token_ids: jax.Array       # [S] int32    sampled token of each row
    logprobs: jax.Array        # [S] float32  log-softmax of the raw logits at that token
