"""Draft-model proposals for speculative decoding: k greedy tokens per row, one compiled call.

The draft (``jaxllm.draft_model``: a small model or the target's first layers) has its own
paged KV cache of the target's block count and size, addressed through the *target's* block
tables: a sequence's draft K/V sit in the same block ids and slots as its target K/V, so the
draft needs no block manager of its own, and whatever the scheduler frees, rolls back or
preempts is gone for the draft too.

Each step the scheduler picks the speculating rows and allocates their ``1 + d`` slots
(``propose`` gives only the count d), then ``complete`` runs the draft for all of them at once:
one jitted call computes each row's catch-up chunk (the tokens accepted since the draft's last
call, plus the last token; a fresh or preempted sequence: all of them), takes the argmax, then
runs k - 1 single-token steps in a ``lax.scan``, feeding each argmax back. The draft thus writes
positions up to L + d - 2 of a row of L tokens, inside the slots the target allocated, and
remembers what it fed there: the next call keeps those positions whose tokens were accepted.

Proposals are greedy (the draft's argmax): the target's point-mass verification
(``jaxllm.rejection_sampler.verify``) is then exact for greedy and sampled rows alike, and each
emitted token is the one the request draws without speculation, so seeded outputs stay
batch-independent. (Sampled proposals with ``rejection_sample`` accept more often at high
temperature, but make the emitted tokens depend on the draft.)

Steps use the engine's bucket policy (T, S, P), restricted to the rows that may speculate
(``disable_by_batch_size``); ``warmup`` compiles each of those keys.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import BaseKey, BucketPolicy, ceil_bucket
from jaxllm.draft_model import DraftSource, layer_skip_draft, layer_skip_params, load_draft
from jaxllm.kernels import get_attention
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kv_cache import KVCache, allocate_kv_cache
from jaxllm.models.causal_lm import CausalLM
from jaxllm.models.rope import RotaryTables
from jaxllm.scheduler import ScheduledSequence
from jaxllm.sequence import Sequence
from jaxllm.speculative import Proposer, SpeculativeConfig
from jaxllm.step_inputs import StepInputs


@dataclasses.dataclass
class DraftSync:
    """What the draft cache holds for one sequence: valid K/V of its first ``computed``
    tokens, then ``fed`` (proposals written speculatively), as of ``num_preemptions``."""

    computed: int
    fed: tuple[int, ...]
    num_preemptions: int

    def valid(self, seq: Sequence) -> int:
        """How many of ``seq``'s tokens have valid draft K/V now."""
        if seq.num_preemptions != self.num_preemptions:
            return 0   # its blocks were freed
        kept = seq.token_ids[self.computed:self.computed + len(self.fed)]
        matches = next((i for i, (a, b) in enumerate(zip(kept, self.fed)) if a != b), len(kept))
        return self.computed + matches


def draft_step(model: CausalLM, select: Callable[[Any], Any], params: Any, kv_cache: KVCache,
               arrays: dict[str, jax.Array]) -> tuple[KVCache, jax.Array]:
    """Catch-up chunk + k - 1 greedy single-token steps; (kv_cache, proposals [S, k]).

    ``arrays``: the chunk's StepInputs fields (token_ids, positions, slot_mapping, token_rows
    [T]; block_tables [S, P]; context_lens, logits_indices [S]; rotary [R, T, Hr]) and the
    single-token steps' positions, slot_mapping, token_rows [k - 1, S] and rotary
    [k - 1, R, S, Hr] (token_rows -1: a padding row, or a row with fewer proposals).
    """
    params = select(params)
    block_tables = arrays["block_tables"]

    def forward(kv: KVCache, token_ids: jax.Array, positions: jax.Array, slots: jax.Array,
                rows: jax.Array, context_lens: jax.Array, logits_indices: jax.Array,
                rotary: jax.Array) -> tuple[KVCache, jax.Array]:
        attention = AttentionMetadata(positions, slots, rows, block_tables, context_lens)
        kv, logits = model.apply({"params": params}, kv,
                                 StepInputs(token_ids, attention, logits_indices, rotary))
        return kv, jnp.argmax(logits, axis=-1).astype(jnp.int32)

    kv_cache, first = forward(kv_cache, arrays["token_ids"], arrays["positions"],
                              arrays["slot_mapping"], arrays["token_rows"], arrays["context_lens"],
                              arrays["logits_indices"], arrays["rotary"])
    num_rows = first.shape[0]

    def step(carry: tuple[KVCache, jax.Array], xs: tuple[jax.Array, ...]):
        kv, tokens = carry
        positions, slots, rows, rotary = xs
        kv, tokens = forward(kv, tokens, positions, slots, rows, positions,
                             jnp.arange(num_rows, dtype=jnp.int32), rotary)
        return (kv, tokens), tokens

    (kv_cache, _), rest = jax.lax.scan(step, (kv_cache, first), (
        arrays["sub_positions"], arrays["sub_slots"], arrays["sub_rows"], arrays["sub_rotary"]))
    return kv_cache, jnp.concatenate([first[:, None], rest.T], axis=1)


class DraftProposer(Proposer):
    """Proposes k tokens per speculating row with a draft model (see the module docstring).

    Args:
        draft: the draft's module; ``params`` its params, or a tree ``select`` maps to them
            inside the compiled call (layer skip: the target's params, cut there).
        kv_cache: the draft's cache, of the target's block count and size.
        rotary: the draft's rotary tables; policy: the engine's bucket policy.
    """

    def __init__(self, config: SpeculativeConfig, max_model_len: int, draft: CausalLM,
                 params: Any, kv_cache: KVCache, rotary: RotaryTables, policy: BucketPolicy,
                 select: Callable[[Any], Any] = lambda params: params) -> None:
        super().__init__(config, max_model_len)
        self.params, self.kv_cache, self.rotary, self.policy = params, kv_cache, rotary, policy
        self.block_size = policy.block_size
        self._step = jax.jit(lambda p, kv, a: draft_step(draft, select, p, kv, a), donate_argnums=1)
        self.synced: dict[Sequence, DraftSync] = {}
        self.keys: set[BaseKey] = set()

    def propose(self, seq: Sequence) -> list[int]:
        """Placeholders for ``room(seq)`` proposals, which ``complete`` fills in."""
        return [-1] * self.room(seq)

    def complete(self, scheduled: list[ScheduledSequence]) -> list[ScheduledSequence]:
        rows = [r for r, item in enumerate(scheduled) if item.num_drafts]
        self.synced = {seq: sync for seq, sync in self.synced.items() if not seq.is_finished}
        if not rows:
            return scheduled
        proposals = self.run([(scheduled[r].seq, scheduled[r].num_drafts) for r in rows])
        scheduled = list(scheduled)
        for r, drafts in zip(rows, proposals):
            item = scheduled[r]
            scheduled[r] = ScheduledSequence(item.seq, item.num_new_tokens, tuple(drafts))
        return scheduled

    def run(self, rows: list[tuple[Sequence, int]]) -> list[list[int]]:
        """Brings each row's draft K/V up to its tokens and proposes its d tokens."""
        starts = [min(self.synced[seq].valid(seq), seq.num_tokens - 1) if seq in self.synced else 0
                  for seq, _ in rows]
        budget = self.policy.max_num_batched_tokens
        # Catch-up beyond one step's tokens (a long fresh prompt): chunks without proposals.
        while sum(seq.num_tokens - start for (seq, _), start in zip(rows, starts)) > budget:
            chunk = []
            left = budget
            for (seq, _), start in zip(rows, starts):
                n = min(seq.num_tokens - 1 - start, left)
                chunk.append((seq, start, n, 0))
                left -= n
            self._call([item for item in chunk if item[2]])
            starts = [start + n for (_, start, n, _) in chunk]
        proposals = self._call([(seq, start, seq.num_tokens - start, d)
                                for (seq, d), start in zip(rows, starts)])
        for (seq, d), drafts in zip(rows, proposals):
            self.synced[seq] = DraftSync(seq.num_tokens, tuple(drafts[:d - 1]), seq.num_preemptions)
        return [drafts[:d].tolist() for (_, d), drafts in zip(rows, proposals)]

    def _call(self, rows: list[tuple[Sequence, int, int, int]]) -> np.ndarray:
        """One compiled call over rows (seq, first position, tokens, proposals d); [rows, k]."""
        bs, k = self.block_size, self.config.num_speculative_tokens
        num_tokens = sum(n for _, _, n, _ in rows)
        blocks = max(max(-(-(start + n + max(d - 2, 0)) // bs), -(-start // bs))
                     for _, start, n, d in rows)
        key = self.policy.pick(num_tokens, len(rows), blocks)
        a = self._padding(key)
        t = 0
        for r, (seq, start, n, d) in enumerate(rows):
            block_ids = np.asarray(seq.block_ids, np.int32)
            positions = np.arange(start, start + n, dtype=np.int32)
            a["token_ids"][t:t + n] = seq.token_ids[start:start + n]
            a["positions"][t:t + n] = positions
            a["slot_mapping"][t:t + n] = block_ids[positions // bs] * bs + positions % bs
            a["token_rows"][t:t + n] = r
            width = min(len(block_ids), key[2])
            a["block_tables"][r, :width] = block_ids[:width]
            a["context_lens"][r] = start
            a["logits_indices"][r] = t + n - 1
            sub = np.arange(start + n, start + n + d - 1, dtype=np.int32)   # proposals 1 .. d - 1
            a["sub_positions"][:len(sub), r] = sub
            a["sub_slots"][:len(sub), r] = block_ids[sub // bs] * bs + sub % bs
            a["sub_rows"][:len(sub), r] = r
            t += n
        self.rotary.fill(a["positions"][:t], a["rotary"][:, :t])
        flat = np.empty((self.rotary.shape[0], (k - 1) * key[1], self.rotary.shape[1]), np.float32)
        self.rotary.fill(a["sub_positions"].reshape(-1), flat)
        a["sub_rotary"] = flat.reshape(flat.shape[0], k - 1, key[1], flat.shape[2]).transpose(1, 0, 2, 3)
        self.keys.add(key)
        self.kv_cache, proposals = self._step(self.params, self.kv_cache, a)
        return np.asarray(jax.device_get(proposals))[:len(rows)]

    def _padding(self, key: BaseKey) -> dict[str, np.ndarray]:
        """Host arrays of a step of padding only (inert: padding writes into block 0)."""
        (t, s, p), k, bs = key, self.config.num_speculative_tokens, self.block_size
        num_tables, hr = self.rotary.shape
        return {
            "token_ids": np.zeros(t, np.int32), "positions": np.zeros(t, np.int32),
            "slot_mapping": (np.arange(t) % bs).astype(np.int32),
            "token_rows": np.full(t, -1, np.int32), "block_tables": np.zeros((s, p), np.int32),
            "context_lens": np.zeros(s, np.int32), "logits_indices": np.zeros(s, np.int32),
            "rotary": np.zeros((num_tables, t, hr), np.float32),
            "sub_positions": np.zeros((k - 1, s), np.int32),
            "sub_slots": np.tile((np.arange(s) % bs).astype(np.int32), (k - 1, 1)),
            "sub_rows": np.full((k - 1, s), -1, np.int32),
            "sub_rotary": np.zeros((k - 1, num_tables, s, hr), np.float32),
        }

    def warmup_keys(self) -> tuple[BaseKey, ...]:
        """The policy's keys a draft call can use: at most ``disable_by_batch_size`` rows."""
        policy = self.policy
        rows = min(self.config.disable_by_batch_size, policy.max_num_seqs)
        most = max(ceil_bucket(rows, policy.decode_rows), ceil_bucket(rows, policy.rows))
        return tuple(key for key in policy.keys() if key[1] <= most)

    def warmup(self) -> None:
        """Compiles and runs the draft call once for each of ``warmup_keys`` (padding only)."""
        for key in self.warmup_keys():
            self.keys.add(key)
            self.kv_cache, proposals = self._step(self.params, self.kv_cache, self._padding(key))
            jax.block_until_ready(proposals)


def build_draft_proposer(config: SpeculativeConfig, engine: Any, source: DraftSource | None
                         ) -> DraftProposer:
    """The draft proposer of ``engine`` (its runner built): ``source``'s model (``open_draft``)
    or, without one, the target's first ``config.num_layers`` layers; warmed up with the engine."""
    c = engine.config
    if source is None:
        model = layer_skip_draft(engine.model, config.num_layers)
        params, select = engine.model_runner.params, functools.partial(
            layer_skip_params, num_layers=config.num_layers)
    else:
        draft = load_draft(source, c.dtype, get_attention(c.attention), c.scan_layers, engine.device,
                           c.quantization)
        model, params, select = draft.model, draft.params, lambda params: params
    kv_cache = allocate_kv_cache(model.config, c.num_blocks, c.block_size, c.cache_dtype, engine.device)
    proposer = DraftProposer(config, c.max_model_len, model, params, kv_cache,
                             RotaryTables(model.config.rope), engine.bucket_policy, select)
    if c.warmup:
        proposer.warmup()
    return proposer
