"""Scheduler: picks which sequences run in the next step and how many tokens each (no jax).

Policy per step, within ``max_num_seqs`` sequences and ``max_num_batched_tokens`` tokens:
  1. running decodes first (one token each), then running sequences still in prefill;
  2. then waiting sequences in order of (``Request.priority``, arrival): lower priority values
     first, first come first served among equals. Each first attaches the longest cached prefix
     of its full blocks (prefix caching), then takes a prefill chunk of whatever token budget is
     left (chunked prefill), as long as KV blocks allow. The head of the queue is never
     overtaken: if it does not fit, nobody behind it is admitted this step.
When a running sequence cannot get a block, the newest running sequence is preempted by
recompute: its blocks are freed (the full ones stay cached until evicted) and it goes back to
the waiting queue ahead of the waiting sequences of its priority. When it resumes, its prefix
lookup usually finds most of its prompt and generated tokens still cached; the rest is
recomputed.

``RequestMetrics.num_cached_tokens`` is the prefix hit of the sequence's first admission, so it
counts prompt tokens only. Hits when a preempted sequence resumes count in the KVCacheManager's
hit statistics but not in that metric (they save the recompute that preemption caused).

The scheduler is the only writer of sequence progress (status, computed and pending tokens) and,
through its KVCacheManager, of block ownership. A step's life: ``schedule`` picks it,
``advance`` marks it dispatched, ``record_outputs`` takes each row's outputs back; the
Postprocessor ends and adds sequences with ``finish`` and ``fork``.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.lora.slots import LoRASlots
from jaxllm.sequence import Sequence, SequenceStatus
from jaxllm.speculative import Proposer


@dataclasses.dataclass(frozen=True, slots=True)
class ScheduledSequence:
    """One row of a step: ``num_new_tokens`` tokens of ``seq`` from position ``start``.

    ``start`` and ``completes_prefill`` are read off the sequence when the row is made: the
    sequence advances (``Scheduler.advance``) as soon as the step is dispatched.

    Speculative decoding: ``draft_token_ids`` is None for a row that does not speculate, else
    the proposals its last ``len(draft_token_ids)`` tokens are (possibly none).
    """

    seq: Sequence
    num_new_tokens: int
    draft_token_ids: tuple[int, ...] | None = None
    start: int = dataclasses.field(init=False)
    # True when the step computes the sequence's last token, so it samples a new one.
    completes_prefill: bool = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        seq = self.seq
        object.__setattr__(self, "start", seq.num_computed_tokens)
        object.__setattr__(self, "completes_prefill", seq.num_computed_tokens + self.num_new_tokens
                           - self.num_drafts == seq.num_tokens + seq.num_pending_tokens)

    @property
    def num_drafts(self) -> int:
        return len(self.draft_token_ids or ())


@dataclasses.dataclass
class ScheduledBatch:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]
    # Copy-on-write block copies (src block id, dst block id) for the device to make, in order,
    # before this step's K/V writes. Within one schedule() no dst is also a src, so one gather
    # of every src followed by one scatter to every dst does the same.
    block_copies: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, prefill_first: bool = False,
                 proposer: Proposer | None = None, lora_slots: LoRASlots | None = None) -> None:
        self.kv_cache_manager = kv_cache_manager
        self.proposer = proposer
        self.lora_slots = lora_slots  # with LoRA serving: a request waits for its adapter's slot
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.prefill_first = prefill_first
        self.waiting: list[Sequence] = []  # sorted by _waiting_keys
        self._waiting_keys: list[tuple[int, int]] = []  # (priority, order), ascending
        self.running: list[Sequence] = []  # in admission order: the last one is the newest
        self.num_preemptions = 0
        self._num_added = 0
        self._num_requeued = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq, self._num_added)
        self._num_added += 1

    def finish(self, seq: Sequence, finish_reason: str) -> None:
        """Marks ``seq`` finished, removes it from the queues and frees its blocks.

        A step in flight may still be sampling a token for it: that row is dropped.
        """
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = finish_reason
        seq.num_pending_tokens = 0
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self._dequeue(self.waiting.index(seq))
        self.kv_cache_manager.free(seq)

    def find(self, request_id: str) -> list[Sequence]:
        """The live sequences of a request (several with n > 1 or beam search)."""
        return [seq for seq in (*self.running, *self.waiting) if seq.request_id == request_id]

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Runs ``child``, forked off ``parent`` (n > 1, beam search).

        It shares ``parent``'s blocks of the computed tokens they have in common (copy-on-write;
        none if ``parent`` was preempted meanwhile), and computes at least its last token, whose
        logits it samples from.
        """
        self.kv_cache_manager.fork(parent, child)
        child.num_computed_tokens = min(child.num_computed_tokens, child.num_tokens - 1)
        child.status = SequenceStatus.RUNNING
        self.running.append(child)

    def advance(self, batch: ScheduledBatch) -> None:
        """The batch was dispatched: its tokens count as computed, and each row that samples
        owes its sequence a pending token (the next step may compute it before it is known)."""
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.completes_prefill:
                item.seq.num_pending_tokens += 1
            if item.num_drafts:
                item.seq.spec.in_flight = True

    def rollback(self, seq: Sequence, num_computed_tokens: int) -> None:
        """Speculative decoding: only ``seq``'s first ``num_computed_tokens`` tokens have
        valid K/V (its rejected proposals' positions are overwritten later); frees the blocks
        that held nothing else. Nothing to do for a sequence preempted meanwhile."""
        if seq.status is SequenceStatus.RUNNING and seq.num_computed_tokens > num_computed_tokens:
            seq.num_computed_tokens = num_computed_tokens
            self.kv_cache_manager.free_tail(seq)

    def record_outputs(self, seq: Sequence, sampled: bool) -> None:
        """``seq``'s row of a step was post-processed: the token it sampled, if any, is no
        longer pending, and the blocks now full of known computed tokens (the next step's
        included) are offered to the prefix cache."""
        if seq.is_finished:
            return
        if sampled:
            seq.num_pending_tokens -= 1
        self.kv_cache_manager.cache_full_blocks(seq)

    def schedule(self) -> ScheduledBatch:
        kv = self.kv_cache_manager
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted: list[Sequence] = []

        # Decodes first so a long prefill never starves running generations. With
        # prefill_first, a step that can admit a waiting sequence runs prefills only: fresh
        # prompts have no cached context to gather, where beside long decodes every prefill
        # token would gather the step's widest context (costly for the CPU reference attention).
        candidates = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)
        if self.prefill_first and self._can_admit():
            candidates = [s for s in candidates if s.num_uncomputed_tokens > 1]
        proposer = self.proposer
        speculating = (proposer is not None
                       and len(self.running) <= proposer.config.disable_by_batch_size)
        for seq in candidates:
            # A beam waiting for its siblings' candidates has nothing to compute; a row
            # verifying proposals in flight does not know its length yet.
            if (budget == 0 or seq in preempted or seq.num_uncomputed_tokens == 0
                    or len(scheduled) == self.max_num_seqs
                    or (seq.spec is not None and seq.spec.in_flight)):
                continue
            num_new = min(seq.num_uncomputed_tokens, budget)
            drafts = None
            is_decode = seq.num_uncomputed_tokens == 1
            if speculating and is_decode and proposer.may_speculate(seq):
                if seq.num_pending_tokens:
                    continue   # waits for its last token: proposals follow from it
                drafts = tuple(proposer.propose(seq)[:budget - 1])
                if not kv.can_allocate(seq, 1 + len(drafts)):
                    drafts = ()
                num_new += len(drafts)
            elif speculating and is_decode:
                proposer.tick_backoff(seq)
            while not kv.can_allocate(seq, num_new):
                victim = self._newest_parked() or self.running[-1]
                for i, item in enumerate(scheduled):
                    if item.seq is victim:
                        budget += scheduled.pop(i).num_new_tokens
                        break
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                kv.allocate(seq, num_new)
                scheduled.append(ScheduledSequence(seq, num_new, drafts))
                budget -= num_new
        if speculating:
            scheduled = proposer.complete(scheduled)

        # Admit waiting sequences only when nothing had to be preempted this step.
        while not preempted and budget > 0:
            head = self._admission_head(budget)
            if head is None:
                break
            index, seq, cached_block_ids, num_new, fits = head
            if not fits:
                # Parked beams hold blocks but cannot move: when they are what blocks
                # admission, they step aside (else beam groups could wait on each other).
                parked = self._newest_parked()
                if parked is None:
                    break
                self._preempt(parked)
                continue
            self._dequeue(index)
            if seq.request.lora_request is not None:
                self.lora_slots.assign(seq.request.lora_request.lora_int_id, self._busy_loras())
            kv.allocate(seq, num_new, cached_block_ids)
            if seq.num_preemptions == 0:
                seq.metrics.num_cached_tokens = seq.num_computed_tokens
            if seq.metrics.first_scheduled_time is None:
                seq.metrics.first_scheduled_time = time.monotonic()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return ScheduledBatch(scheduled=scheduled, preempted=preempted,
                              block_copies=kv.take_block_copies())

    def _admission_head(self, budget: int) -> tuple[int, Sequence, list[int], int, bool] | None:
        """The next waiting sequence to admit, if a seat is free and one is not parked: its
        queue index, itself, its cached prefix blocks, its first chunk within ``budget``, and
        whether the blocks for that chunk are free."""
        if len(self.running) >= self.max_num_seqs:
            return None
        # Not a parked beam, nor a sequence preempted while a step in flight samples its next
        # token (it waits for that token to land).
        busy = self._busy_loras() if self.lora_slots is not None else set()
        index = next((i for i, w in enumerate(self.waiting)
                      if not _is_parked(w) and not w.num_pending_tokens and self._has_lora_slot(w, busy)),
                     None)
        if index is None:
            return None
        seq, kv = self.waiting[index], self.kv_cache_manager
        cached_block_ids = kv.get_cached_prefix(seq)
        num_new = min(seq.num_tokens - len(cached_block_ids) * kv.block_size, budget)
        return index, seq, cached_block_ids, num_new, kv.can_allocate(seq, num_new, cached_block_ids)

    def _busy_loras(self) -> set[int]:
        """The adapters running sequences use (their slots cannot be reassigned)."""
        return {s.request.lora_request.lora_int_id for s in self.running
                if s.request.lora_request is not None}

    def _has_lora_slot(self, seq: Sequence, busy: set[int]) -> bool:
        lora = seq.request.lora_request
        return lora is None or self.lora_slots.can_assign(lora.lora_int_id, busy)

    def _can_admit(self) -> bool:
        """Whether the admission loop would admit a waiting sequence on a fresh budget."""
        head = self._admission_head(self.max_num_batched_tokens)
        return head is not None and head[-1]

    def _newest_parked(self) -> Sequence | None:
        parked = [s for s in self.running if _is_parked(s)]
        return parked[-1] if parked else None

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv_cache_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        # Ahead of every waiting sequence of its priority, the latest preempted first (so
        # victims taken newest first resume oldest first).
        self._num_requeued += 1
        self._enqueue(seq, -self._num_requeued)

    def _enqueue(self, seq: Sequence, order: int) -> None:
        key = (seq.request.priority, order)
        index = bisect.bisect_right(self._waiting_keys, key)
        self._waiting_keys.insert(index, key)
        self.waiting.insert(index, seq)

    def _dequeue(self, index: int) -> Sequence:
        del self._waiting_keys[index]
        return self.waiting.pop(index)


def _is_parked(seq: Sequence) -> bool:
    """A beam whose next-token candidates are in, waiting for its siblings': nothing to run."""
    return seq.group is not None and seq in seq.group.pending
