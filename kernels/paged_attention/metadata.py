"""What every attention implementation reads about a step's token layout, besides q/k/v.

Shape legend: T tokens in the step, S rows (sequences), P blocks per row.

Defined beside the kernels so that they depend on nothing of the engine: the engine's
``StepInputs`` carries one ``AttentionMetadata`` (``inputs.attention``), and the benchmarks and
tests build one directly.

Padding: padded tokens have row -1 and write to slots of the reserved block 0; padded rows have
an all-zero block table and context length 0.

Sliding windows: a layer with window W lets the token at position p attend to the keys at
positions p - W + 1 .. p (transformers' ``kv_idx > q_idx - sliding_window``). Implementations
take it per call as ``sliding_window``: None (a static full-attention layer), or an int or int32
scalar (traced when layers of different kinds run under one ``lax.scan``), where a value <= 0
also means full attention.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    positions: jax.Array     # [T] int32   position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32   cache slot (block_id * block_size + offset) to write
    token_rows: jax.Array    # [T] int32   row of each token, -1 for padding
    block_tables: jax.Array  # [S, P] int32 blocks holding each row's cached context
    context_lens: jax.Array  # [S] int32   tokens of each row already in the cache


def window_starts(positions: jax.Array, sliding_window: int | jax.Array | None) -> jax.Array | int:
    """The first key position each token [T] may attend to: 0 without a window."""
    if sliding_window is None:
        return 0
    window = jnp.asarray(sliding_window, jnp.int32)
    return jnp.where(window > 0, jnp.maximum(positions - window + 1, 0), 0)
