"""Repetition, frequency and presence penalties from token counts kept on the device.

Each sequence with penalties owns a slot of ``token_counts`` [N, V] int32 for its life: entry
v holds 2 x (occurrences of v among its output tokens) + (1 if v occurs in its prompt). The slot
is seeded once from the host's tokens (``seed_slot``, one compiled call of fixed shape), then
every step adds 2 at the token each such row sampled (``count_samples``), on the device, so a
step in flight needs no token from the host and the host never rebuilds a [S, max_model_len]
history (2 MB a step at 64 rows of SmolLM2's 8,192 positions, scattered again on the device).

Slots outlive a step: ``PenaltySlots`` keeps a sequence's slot while it runs and hands it to
another sequence only when every slot is taken, never away from a sequence in the step being
prepared or the one in flight (N = 2 x max_num_seqs covers both). A sequence that lost its
slot meanwhile is seeded again from its tokens, which the host then knows in full.

Shape legend: N slots, V vocabulary, S rows, L max_model_len.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.sequence import Sequence

OUTPUT_COUNT = 2   # the increment of one output occurrence; bit 0 is "seen in the prompt"


@functools.partial(jax.jit, donate_argnums=0)
def seed_slot(token_counts: jax.Array, slot: jax.Array, token_ids: jax.Array,
              num_prompt: jax.Array) -> jax.Array:
    """Overwrites one slot with a sequence's counts.

    Args:
        token_counts: [N, V] int32.
        slot: () int32.
        token_ids: [L] int32, the sequence's prompt then output tokens, -1 padded.
        num_prompt: () int32, how many leading tokens are prompt.
    Returns:
        [N, V] int32 with row ``slot`` = 2 x output counts + seen-in-prompt.
    """
    vocab = token_counts.shape[1]
    valid = token_ids >= 0
    is_output = valid & (jnp.arange(token_ids.shape[0]) >= num_prompt)
    row = jnp.zeros(vocab, jnp.int32)
    row = row.at[jnp.where(valid & ~is_output, token_ids, vocab)].set(1, mode="drop")
    row = row.at[jnp.where(is_output, token_ids, vocab)].add(OUTPUT_COUNT, mode="drop")
    return token_counts.at[slot].set(row)


def count_samples(token_counts: jax.Array, slots: jax.Array, token_ids: jax.Array,
                  samples: jax.Array) -> jax.Array:
    """Adds each sampling row's new token to its slot.

    Args:
        token_counts: [N, V] int32.
        slots: [S] int32, each row's slot, -1 for none.
        token_ids: [S] int32, the tokens the rows sampled.
        samples: [S] bool, whether the row's token is kept (its sequence's next token).
    """
    keep = samples & (slots >= 0)
    return token_counts.at[jnp.where(keep, slots, token_counts.shape[0]), token_ids].add(
        OUTPUT_COUNT, mode="drop")


def row_counts(token_counts: jax.Array, slots: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(output_counts [S, V] int32, seen [S, V] bool: in prompt or output) of each row's slot;
    zeros for rows without one (slot -1)."""
    counts = jnp.where(slots[:, None] >= 0, token_counts[jnp.maximum(slots, 0)], 0)
    return counts // OUTPUT_COUNT, counts > 0


def apply_penalties(logits: jax.Array, output_counts: jax.Array, seen: jax.Array,
                    repetition: jax.Array, frequency: jax.Array, presence: jax.Array) -> jax.Array:
    """vLLM's penalties: repetition divides positive / multiplies negative logits of every token
    seen in prompt or output; frequency and presence subtract per output occurrence / once.

    Args:
        logits: [S, V] float32.
        output_counts: [S, V] int32; seen: [S, V] bool.
        repetition, frequency, presence: [S] float32 (1, 0, 0 disable).
    """
    rep = repetition[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * (output_counts > 0)


class PenaltySlots:
    """Which sequence owns which slot of ``token_counts`` (host side).

    Args:
        num_slots: N.
        max_model_len: L, the width of a seeding call's token array.
    """

    def __init__(self, num_slots: int, max_model_len: int) -> None:
        self.max_model_len = max_model_len
        self._owner_slots: dict[Sequence, int] = {}
        self._free = list(range(num_slots - 1, -1, -1))

    def slot(self, seq: Sequence, keep: set[Sequence], seeds: list[tuple[int, np.ndarray, int]]) -> int:
        """``seq``'s slot; a new one is appended to ``seeds`` as (slot, [L] token ids, num
        prompt tokens) for ``seed_slot``. ``keep``: the sequences whose slots must survive
        (those of the step being prepared and of the step in flight)."""
        slot = self._owner_slots.get(seq)
        if slot is not None:
            return slot
        if seq.num_pending_tokens:
            raise RuntimeError(f"sequence {seq.request_id} needs a penalty slot while a step in "
                               "flight samples its next token")
        slot = self._free.pop() if self._free else self._evict(keep)
        self._owner_slots[seq] = slot
        tokens = np.full(self.max_model_len, -1, np.int32)
        tokens[:seq.num_tokens] = seq.token_ids
        seeds.append((slot, tokens, seq.num_prompt_tokens))
        return slot

    def _evict(self, keep: set[Sequence]) -> int:
        """Takes the slot of the longest-held owner outside ``keep``."""
        for owner in self._owner_slots:
            if owner not in keep:
                return self._owner_slots.pop(owner)
        raise RuntimeError(f"all {len(self._owner_slots)} penalty slots are in use by the "
                           "steps being prepared and in flight")
