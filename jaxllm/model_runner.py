"""ModelRunner: ScheduledBatch -> bucketed step arrays -> one compiled step -> host tokens.

It owns preallocated host buffers sized for the largest bucket (``jaxllm.step_layout``), fills
them each step (padding first, then the scheduled rows), hands them packed to the compiled step
and reads the outputs back with one transfer. The device state between steps (KV cache, token
feedback, penalty counts) lives here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm.buckets import BucketPolicy
from jaxllm.grammar import GrammarMasks, mask_words, sequence_matcher
from jaxllm.kv_cache import KVCache
from jaxllm.logits_processors import HostProcessors
from jaxllm.models.rope import RotaryTables
from jaxllm.packing import pack
from jaxllm.penalties import PenaltySlots, seed_slot
from jaxllm.row_results import RowResults, num_top_logprobs, prompt_positions, row_results
from jaxllm.sampling_rows import SamplingLimits, fill_row
from jaxllm.scheduler import ScheduledBatch, ScheduledSequence
from jaxllm.sequence import Sequence
from jaxllm.step import CompiledStep
from jaxllm.step_inputs import (DeviceState, SamplingTensors, StepArrays, StepInputs, StepKey,
                                StepOutputs)
from jaxllm.step_layout import HostBuffers, StepLayout, assemble
from jaxllm.strategies import SamplingStrategy

__all__ = ["ModelRunner", "PreparedStep", "RowResults"]


class PreparedStep(NamedTuple):
    """One step's host side: its key and arrays, and the penalty slots to seed before it."""

    key: StepKey
    arrays: StepArrays
    penalty_seeds: list[tuple[int, np.ndarray, int]]   # (slot, [L] token ids, prompt length)

    @property
    def inputs(self) -> StepInputs:
        return self.arrays.inputs

    @property
    def sampling(self) -> SamplingTensors:
        return self.arrays.sampling


class ModelRunner:
    """Packs batches into step arrays, runs the compiled step, and unpacks its outputs.

    Args:
        strategies: the registered strategies the compiled sampler serves, in its order.
        max_model_len: the width of a penalty slot's seeding tokens.
        vocab_size: the width of the penalty counts.
        rotary: the model's rotary tables: each step's cos/sin are computed here, on the host.
        limits: the widths of the sparse sampling rows (logit_bias, allowed_token_ids,
            min_tokens' stop ids); requests over them are refused at submission
            (``sampling_rows.check_sampling_limits``).
    """

    def __init__(self, step: CompiledStep, params: Any, kv_cache: KVCache, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, vocab_size: int, rotary: RotaryTables,
                 strategies: tuple[SamplingStrategy, ...] = (),
                 bucket_policy: BucketPolicy | None = None, *,
                 limits: SamplingLimits = SamplingLimits(), num_speculative_tokens: int = 0) -> None:
        self.step = step
        self.params = params
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.strategy_index = {s.name: i for i, s in enumerate(strategies, start=1)}
        self.strategies = strategies
        self.bucket_policy = bucket_policy or BucketPolicy(
            max_num_batched_tokens, max_num_seqs, max_blocks_per_seq, block_size)
        self.num_strategy_args = max([len(s.defaults) for s in strategies] + [1])
        self.rotary = rotary
        self.layout = StepLayout(block_size, rotary.shape, max_block_copies=max_num_seqs,
                                 num_strategy_args=self.num_strategy_args, limits=limits,
                                 mask_words=mask_words(vocab_size),
                                 num_speculative_tokens=num_speculative_tokens)
        largest = StepKey(max_num_batched_tokens, max_num_seqs, max_blocks_per_seq, structured=True)
        self._buffers = HostBuffers(self.layout, largest)
        # Each row's last sampled token, kept on the device for the next step (token feedback).
        # Under tensor parallelism, replicated over the cache's mesh from the start, as the step
        # returns them: left uncommitted, the first step's shape was compiled a second time.
        state = _replicated_like(kv_cache)
        self.last_tokens = jnp.zeros(max_num_seqs, jnp.int32, device=state)
        # Penalty slots for the rows of the step being prepared and of the one in flight.
        self.penalty_slots = PenaltySlots(2 * max_num_seqs, max_model_len)
        self.token_counts = jnp.zeros((2 * max_num_seqs, vocab_size), jnp.int32, device=state)
        # The Python logits processors of the rows that sample, run from the step's host
        # callback, and their faults until the step is fetched.
        self.host_processors = HostProcessors()
        self.grammar_masks = GrammarMasks()
        # Called with (key, penalty seeds, packed buffers) before each step is dispatched: a
        # multi-host leader publishes the step for its followers (``jaxllm.multihost``).
        self.on_dispatch: Callable[[StepKey, list, tuple[np.ndarray, np.ndarray]], None] | None = None
        # LoRA serving (``jaxllm.lora.serving.LoRAServing``), set by the engine with enable_lora.
        self.lora: Any = None

    def prepare_inputs(self, batch: ScheduledBatch, previous: ScheduledBatch | None = None) -> PreparedStep:
        """Lays the batch out in bucketed host arrays for the step: views of the runner's
        buffers, valid until the next call (the step copies them into its packed buffers).

        ``previous`` is the step still in flight, if any: a row's token that it is sampling
        (the sequence's pending token) is fed back on the device from that step's row.
        """
        bs, scheduled = self.block_size, batch.scheduled
        max_ctx = max(item.start for item in scheduled)
        base = self.bucket_policy.pick(batch.num_tokens, len(scheduled), -(-max_ctx // bs))
        self.host_processors.prepare({
            r: item.seq for r, item in enumerate(scheduled)
            if item.completes_prefill and item.seq.request.sampling_params.logits_processors})
        constrained = [(sequence_matcher(item.seq), r) for r, item in enumerate(scheduled)
                       if item.completes_prefill and item.seq.request.grammar is not None]
        key = StepKey(*base, host_processors=self.host_processors.active, structured=bool(constrained))
        a = self._buffers.views(key)
        self.grammar_masks.fill(constrained, a["grammar_mask"])
        previous_rows = {item.seq: r for r, item in enumerate(previous.scheduled)} if previous else {}
        keep = {item.seq for item in scheduled} | set(previous_rows)
        seeds: list[tuple[int, np.ndarray, int]] = []
        t = 0
        for r, item in enumerate(scheduled):
            seq, n, start = item.seq, item.num_new_tokens, item.start
            block_ids = np.asarray(seq.block_ids, np.int32)
            positions = np.arange(start, start + n, dtype=np.int32)
            num_drafts = item.num_drafts
            known = min(n - num_drafts, seq.num_tokens - start)
            a["token_ids"][t:t + known] = seq.token_ids[start:start + known]
            if known < n - num_drafts:   # the pending token: the previous step's sample for it
                a["feedback_rows"][t + known] = previous_rows[seq]
            if num_drafts:   # speculative decoding: the proposals end the row
                a["token_ids"][t + n - num_drafts:t + n] = item.draft_token_ids
                a["draft_token_ids"][r, :num_drafts] = item.draft_token_ids
            a["positions"][t:t + n] = positions
            a["slot_mapping"][t:t + n] = block_ids[positions // bs] * bs + positions % bs
            a["token_rows"][t:t + n] = r
            if self.lora is not None:
                a["lora_slots"][t:t + n] = self.lora.slot_for(seq.request.lora_request)
            prompt = prompt_positions(item)
            a["prompt_next_ids"][t:t + len(prompt)] = seq.token_ids[start + 1:start + 1 + len(prompt)]
            num_ctx_blocks = -(-start // bs)
            a["block_tables"][r, :num_ctx_blocks] = block_ids[:num_ctx_blocks]
            a["context_lens"][r] = start
            a["logits_indices"][r] = t + n - 1
            self._fill_sampling_row(a, r, item, keep, seeds)
            t += n
        self.rotary.fill(a["positions"][:t], a["rotary"][:, :t])
        self._fill_block_copies(a["block_copies"], batch.block_copies)
        return PreparedStep(key, assemble(a), seeds)

    def _fill_sampling_row(self, a: dict[str, np.ndarray], r: int, item: ScheduledSequence,
                           keep: set[Sequence], seeds: list) -> None:
        seq = item.seq
        request, params = seq.request, seq.request.sampling_params
        strategy = None
        if params.strategy is not None:
            index = self.strategy_index[params.strategy]
            strategy = (index, self.strategies[index - 1].arg_values(params.strategy_args))
        fill_row(a, r, params, seed=request.seed, eos_token_ids=request.eos_token_ids,
                 output_index=seq.num_output_tokens + seq.num_pending_tokens,
                 num_logprobs=num_top_logprobs(seq), samples=item.completes_prefill,
                 beam=seq.group is not None and seq.group.beam is not None,
                 penalty_slot=self.penalty_slots.slot(seq, keep, seeds) if params.needs_penalties else -1,
                 strategy=strategy)

    def _fill_block_copies(self, out: np.ndarray, copies: list[tuple[int, int]]) -> None:
        if len(copies) > len(out):
            raise RuntimeError(f"{len(copies)} copy-on-write block copies in one step, over "
                               f"the {len(out)} a step makes (max_num_seqs)")
        if copies:
            out[:len(copies)] = copies

    def host_logits_processor(self, logits: np.ndarray, use: np.ndarray) -> np.ndarray:
        """Runs the Python logits processors of the rows in flight (called from the step); a
        faulty one fails its request only (``jaxllm.logits_processors``)."""
        return self.host_processors(logits)

    @property
    def uses_host_callbacks(self) -> bool:
        """Whether the last prepared step calls Python logits processors while it runs (it must
        finish before the next step is prepared, which would replace their rows)."""
        return self.host_processors.active

    @property
    def state(self) -> DeviceState:
        return DeviceState(self.kv_cache, self.last_tokens, self.token_counts)

    def run_step(self, prepared: PreparedStep) -> StepOutputs:
        """Seeds new penalty slots, then dispatches the compiled step on the runner's params
        and device state; returns at once (JAX dispatch is async)."""
        buffers = pack(prepared.arrays, self.layout.packed(prepared.key))
        if self.on_dispatch is not None:
            self.on_dispatch(prepared.key, prepared.penalty_seeds, buffers)
        return self.run_packed(prepared.key, prepared.penalty_seeds, buffers)

    def run_packed(self, key: StepKey, penalty_seeds: list[tuple[int, np.ndarray, int]],
                   buffers: tuple[np.ndarray, np.ndarray]) -> StepOutputs:
        """``run_step`` on inputs already packed (a multi-host follower's, as the leader
        packed them)."""
        for slot, token_ids, num_prompt in penalty_seeds:
            self.token_counts = seed_slot(self.token_counts, np.int32(slot), token_ids, np.int32(num_prompt))
        state, outputs = self.step(self.params, self.state, key, self.layout.packed(key), buffers,
                                   None if self.lora is None else self.lora.slab.arrays)
        self.kv_cache, self.last_tokens, self.token_counts = state.kv_cache, state.last_tokens, state.token_counts
        return outputs

    def dispatch(self, batch: ScheduledBatch, prepared: PreparedStep) -> StepOutputs:
        """Launches one prepared step (its copy-on-write block copies included)."""
        return self.run_step(prepared)

    def fetch(self, batch: ScheduledBatch, outputs: StepOutputs) -> RowResults:
        """Waits for a dispatched step; brings back the rows' tokens and what they asked for."""
        scheduled = batch.scheduled
        want_top = any(num_top_logprobs(item.seq) is not None for item in scheduled)
        want_prompt = any(prompt_positions(item) for item in scheduled)
        arrays = [outputs.token_ids, outputs.logprobs]
        if want_top:
            arrays += [outputs.ranks, outputs.top_token_ids, outputs.top_logprobs]
        if want_prompt:
            arrays += [outputs.prompt_logprobs, outputs.prompt_ranks,
                       outputs.prompt_top_token_ids, outputs.prompt_top_logprobs]
        want_spec = any(item.num_drafts for item in scheduled)
        if want_spec:
            arrays += [outputs.spec_token_ids, outputs.spec_logprobs, outputs.num_accepted]
        host = jax.device_get(arrays)
        spec = tuple(host[-3:]) if want_spec else None
        host = host[:-3] if want_spec else host
        results = row_results(scheduled, host[0], host[1], tuple(host[2:5]) if want_top else None,
                              tuple(host[-4:]) if want_prompt else None, spec)
        results.errors = self.host_processors.take_faults(scheduled)
        return results


def _replicated_like(kv_cache: KVCache | None) -> NamedSharding | None:
    """Replicated over the KV cache's mesh, if it is laid out on one; None otherwise."""
    sharding = getattr(getattr(kv_cache, "k", None), "sharding", None)
    return NamedSharding(sharding.mesh, PartitionSpec()) if isinstance(sharding, NamedSharding) else None
