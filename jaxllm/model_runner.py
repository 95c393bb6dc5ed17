"""ModelRunner: ScheduledBatch -> bucketed StepInputs -> one compiled step -> host tokens.

It owns preallocated numpy buffers sized for the largest bucket, fills them in place each
step, hands them to the compiled step (which ships them packed in two buffers) and reads the
outputs back with one transfer.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.buckets import BucketPolicy
from jaxllm.kv_cache import KVCache
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.models.rope import RotaryTables
from jaxllm.outputs import Logprob, PositionLogprobs
from jaxllm.scheduler import ScheduledBatch
from jaxllm.sequence import Sequence
from jaxllm.step import CompiledStep
from jaxllm.step_inputs import (
    SAMPLING_ROW_FIELDS,
    SamplingTensors,
    StepInputs,
    StepOutputs,
)
from jaxllm.strategies import SamplingStrategy


def _seed32(seed: int) -> int:
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


_TOKEN_FIELDS = ("token_ids", "positions", "slot_mapping", "token_rows")
_ROW_INPUT_FIELDS = ("context_lens", "logits_indices")
_ATTENTION_TOKEN_FIELDS = ("positions", "slot_mapping", "token_rows")


@dataclasses.dataclass
class RowResults:
    """What one step gave each scheduled row, on the host."""

    token_ids: list[int]
    logprobs: list[float]
    # Only for rows that asked: {row: {token id: Logprob}} and {row: [(position, entry)]}.
    top_logprobs: dict[int, PositionLogprobs]
    prompt_logprobs: dict[int, list[tuple[int, PositionLogprobs]]]


class PreparedStep(NamedTuple):
    """Host arrays of one step: what ``CompiledStep`` takes besides params and device state."""

    inputs: StepInputs
    sampling: SamplingTensors
    feedback_rows: np.ndarray  # [T] int32: row of the previous step whose token this is, or -1


class _HostBuffers:
    """Preallocated numpy arrays for the largest bucket, refilled in place every step."""

    def __init__(self, max_tokens: int, max_rows: int, max_blocks: int, num_strategy_args: int,
                 rotary_shape: tuple[int, int]) -> None:
        self.tokens = {name: np.zeros(max_tokens, np.int32) for name in _TOKEN_FIELDS}
        self.rotary = np.zeros((rotary_shape[0], max_tokens, rotary_shape[1]), np.float32)
        self.feedback_rows = np.full(max_tokens, -1, np.int32)
        self.row_inputs = {name: np.zeros(max_rows, np.int32) for name in _ROW_INPUT_FIELDS}
        self.block_tables = np.zeros((max_rows, max_blocks), np.int32)
        self.rows = {name: np.full(max_rows, pad, dtype) for name, (dtype, pad) in SAMPLING_ROW_FIELDS.items()}
        self.strategy_args = np.zeros((max_rows, num_strategy_args), np.float32)


class ModelRunner:
    """Packs batches into step inputs, runs the compiled step, and unpacks its outputs.

    Args:
        strategies: the registered strategies the compiled sampler serves, in its order.
        max_model_len: the width of the token history shipped for penalties.
        vocab_size: the width of the bias rows.
        rotary: the model's rotary tables: each step's cos/sin are computed here, on the host.
    """

    def __init__(self, step: CompiledStep, params: Any, kv_cache: KVCache, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int,
                 max_model_len: int, vocab_size: int, rotary: RotaryTables,
                 strategies: tuple[SamplingStrategy, ...] = (),
                 bucket_policy: BucketPolicy | None = None) -> None:
        self.step = step
        self.params = params
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.strategy_index = {s.name: i for i, s in enumerate(strategies, start=1)}
        self.strategies = strategies
        self.bucket_policy = bucket_policy or BucketPolicy(
            max_num_batched_tokens, max_num_seqs, max_blocks_per_seq, block_size)
        self.num_strategy_args = max([len(s.defaults) for s in strategies] + [1])
        self.rotary = rotary
        self._buf = _HostBuffers(max_num_batched_tokens, max_num_seqs, max_blocks_per_seq,
                                 self.num_strategy_args, rotary.shape)
        # Each row's last sampled token, kept on the device for the next step (token feedback).
        self.last_tokens = jnp.zeros(max(s for _, s, _ in self.bucket_policy.keys()), jnp.int32)
        # The rows of the step in flight that have Python logits processors (one step at a
        # time is in flight: the executor fetches a step before preparing the next).
        self._processor_rows: dict[int, Sequence] = {}

    def prepare_inputs(self, batch: ScheduledBatch, previous: ScheduledBatch | None = None) -> PreparedStep:
        """Lays the batch out in bucketed host arrays for the step: views of the runner's
        buffers, valid until the next call (the step copies them into its packed buffers).

        ``previous`` is the step still in flight, if any: a row's token that it is sampling
        (the sequence's pending token) is fed back on the device from that step's row.
        """
        b, bs = self._buf, self.block_size
        scheduled = batch.scheduled
        max_ctx = max(item.start for item in scheduled)
        num_tokens, rows, blocks = self.bucket_policy.pick(
            batch.num_tokens, len(scheduled), -(-max_ctx // bs))

        b.block_tables[:rows, :blocks] = 0
        for name in _ROW_INPUT_FIELDS:
            b.row_inputs[name][:rows] = 0
        for name, (_, pad) in SAMPLING_ROW_FIELDS.items():
            b.rows[name][:rows] = pad
        b.strategy_args[:rows] = 0
        self._processor_rows = {}
        b.feedback_rows[:num_tokens] = -1
        previous_rows = {id(item.seq): r for r, item in enumerate(previous.scheduled)} if previous else {}
        t = 0
        for r, item in enumerate(scheduled):
            seq, n, start = item.seq, item.num_new_tokens, item.start
            block_ids = np.asarray(seq.block_ids, np.int32)
            positions = np.arange(start, start + n, dtype=np.int32)
            known = min(n, seq.num_tokens - start)
            b.tokens["token_ids"][t:t + known] = seq.token_ids[start:start + known]
            if known < n:   # the pending token: the previous step's sample for this sequence
                b.tokens["token_ids"][t + known] = 0
                b.feedback_rows[t + known] = previous_rows[id(seq)]
            b.tokens["positions"][t:t + n] = positions
            b.tokens["slot_mapping"][t:t + n] = block_ids[positions // bs] * bs + positions % bs
            b.tokens["token_rows"][t:t + n] = r
            num_ctx_blocks = -(-start // bs)
            b.block_tables[r, :num_ctx_blocks] = block_ids[:num_ctx_blocks]
            b.row_inputs["context_lens"][r] = start
            b.row_inputs["logits_indices"][r] = t + n - 1
            self._fill_sampling_row(r, seq)
            t += n
        # Padding tokens write into the reserved block 0 and belong to no row.
        b.tokens["token_ids"][t:num_tokens] = 0
        b.tokens["positions"][t:num_tokens] = 0
        b.tokens["slot_mapping"][t:num_tokens] = np.arange(num_tokens - t) % bs
        b.tokens["token_rows"][t:num_tokens] = -1

        self.rotary.fill(b.tokens["positions"][:num_tokens], b.rotary[:, :num_tokens])
        attention = AttentionMetadata(
            **{name: b.tokens[name][:num_tokens] for name in _ATTENTION_TOKEN_FIELDS},
            block_tables=b.block_tables[:rows, :blocks], context_lens=b.row_inputs["context_lens"][:rows])
        inputs = StepInputs(token_ids=b.tokens["token_ids"][:num_tokens], attention=attention,
                            logits_indices=b.row_inputs["logits_indices"][:rows],
                            rotary=b.rotary[:, :num_tokens])
        sampling = SamplingTensors(
            **{name: b.rows[name][:rows] for name in SAMPLING_ROW_FIELDS},
            strategy_args=b.strategy_args[:rows], history=self._history(scheduled, rows),
            use_processors=self._use_processors(rows),
            logit_bias=self._logit_bias(scheduled, rows),
            prompt_next_ids=self._prompt_next_ids(scheduled, num_tokens))
        return PreparedStep(inputs, sampling, b.feedback_rows[:num_tokens])

    def _fill_sampling_row(self, r: int, seq: Sequence) -> None:
        rows, params = self._buf.rows, seq.request.sampling_params
        for name in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                     "frequency_penalty", "presence_penalty"):
            rows[name][r] = getattr(params, name)
        rows["seeds"][r] = _seed32(seq.request.seed)
        rows["output_index"][r] = seq.num_output_tokens + seq.num_pending_tokens
        num_top = _num_top_logprobs(seq)
        rows["num_logprobs"][r] = -1 if num_top is None else num_top
        rows["prompt_lens"][r] = seq.num_prompt_tokens
        if params.strategy is not None:
            index = self.strategy_index[params.strategy]
            rows["strategy_ids"][r] = index
            values = self.strategies[index - 1].arg_values(params.strategy_args)
            self._buf.strategy_args[r, :len(values)] = values
        if params.logits_processors:
            self._processor_rows[r] = seq

    def _use_processors(self, rows: int) -> np.ndarray:
        """[S] rows with Python logits processors; [0] if none (no host callback is compiled)."""
        if not self._processor_rows:
            return np.zeros(0, np.bool_)
        use = np.zeros(rows, np.bool_)
        use[list(self._processor_rows)] = True
        return use

    def _history(self, scheduled: list, rows: int) -> np.ndarray:
        """[S, max_model_len] prompt + output ids for penalties; [S, 0] if no row has any."""
        if not any(item.seq.request.sampling_params.needs_penalties for item in scheduled):
            return np.zeros((rows, 0), np.int32)
        history = np.full((rows, self.max_model_len), -1, np.int32)
        for r, item in enumerate(scheduled):
            if item.seq.request.sampling_params.needs_penalties:
                history[r, :item.seq.num_tokens] = item.seq.token_ids
        return history

    def _logit_bias(self, scheduled: list, rows: int) -> np.ndarray:
        """[S, V] bias rows for logit_bias / allowed_token_ids / min_tokens; [S, 0] if unused."""
        rows_bias = [(r, _bias_entries(item.seq)) for r, item in enumerate(scheduled)]
        if not any(entries for _, entries in rows_bias):
            return np.zeros((rows, 0), np.float32)
        bias = np.zeros((rows, self.vocab_size), np.float32)
        for r, (allowed, additive, banned) in ((r, e) for r, e in rows_bias if e):
            if allowed is not None:
                bias[r] = -np.inf
                bias[r, allowed] = 0
            if additive:
                bias[r, list(additive)] += np.asarray(list(additive.values()), np.float32)
            bias[r, banned] = -np.inf
        return bias

    def _prompt_next_ids(self, scheduled: list, num_tokens: int) -> np.ndarray:
        """[T] the prompt token after each token, where prompt logprobs are wanted; else [0]."""
        if not any(item.seq.needs_prompt_logprobs for item in scheduled):
            return np.zeros(0, np.int32)
        next_ids = np.full(num_tokens, -1, np.int32)
        t = 0
        for item in scheduled:
            seq, n = item.seq, item.num_new_tokens
            if seq.needs_prompt_logprobs:
                start = seq.num_computed_tokens
                stop = min(start + n, seq.num_prompt_tokens - 1)
                next_ids[t:t + max(0, stop - start)] = seq.token_ids[start + 1:stop + 1]
            t += n
        return next_ids

    def host_logits_processor(self, logits: np.ndarray, use: np.ndarray) -> np.ndarray:
        """Runs the Python logits processors of the rows in flight (called from the step)."""
        logits = np.array(logits, np.float32)
        for r, seq in self._processor_rows.items():
            for processor in seq.request.sampling_params.logits_processors:
                logits[r] = processor(seq.output_token_ids, logits[r])
        return logits

    @property
    def uses_host_callbacks(self) -> bool:
        """Whether the last prepared step calls Python logits processors while it runs (it must
        finish before the next step is prepared, which would replace their rows)."""
        return bool(self._processor_rows)

    def run_step(self, prepared: PreparedStep) -> StepOutputs:
        """Dispatches the compiled step on the runner's params, KV cache and token feedback."""
        self.kv_cache, self.last_tokens, outputs = self.step(
            self.params, self.kv_cache, self.last_tokens, prepared)
        return outputs

    def dispatch(self, batch: ScheduledBatch, prepared: PreparedStep) -> StepOutputs:
        """Launches one step on prepared inputs and returns at once (JAX dispatch is async).

        Copy-on-write block copies of forked sequences (n > 1, beam search) run first.
        """
        if batch.block_copies:
            num = 1 << (len(batch.block_copies) - 1).bit_length()   # few shapes: powers of two
            pairs = np.zeros((num, 2), np.int32)                    # padding copies block 0 onto itself
            pairs[:len(batch.block_copies)] = batch.block_copies
            self.kv_cache = _copy_blocks(self.kv_cache, jax.device_put(pairs[:, 0]), jax.device_put(pairs[:, 1]))
        return self.run_step(prepared)

    def fetch(self, batch: ScheduledBatch, outputs: StepOutputs) -> RowResults:
        """Waits for a dispatched step; brings back the rows' tokens and what they asked for."""
        scheduled = batch.scheduled
        want_top = [r for r, item in enumerate(scheduled) if _num_top_logprobs(item.seq) is not None]
        want_prompt = outputs.prompt_logprobs.shape[0] > 0
        arrays = [outputs.token_ids, outputs.logprobs]
        if want_top:
            arrays += [outputs.ranks, outputs.top_token_ids, outputs.top_logprobs]
        if want_prompt:
            arrays += [outputs.prompt_logprobs, outputs.prompt_ranks,
                       outputs.prompt_top_token_ids, outputs.prompt_top_logprobs]
        host = jax.device_get(arrays)
        num_rows = len(scheduled)
        token_ids, logprobs = host[0][:num_rows].tolist(), host[1][:num_rows].tolist()
        results = RowResults(token_ids, logprobs, {}, {})
        if want_top:
            ranks, top_ids, top_lps = host[2:5]
            for r in want_top:
                num = _num_top_logprobs(scheduled[r].seq)
                results.top_logprobs[r] = _position_logprobs(
                    token_ids[r], logprobs[r], ranks[r], top_ids[r, :num], top_lps[r, :num])
        if want_prompt:
            lps, ranks, top_ids, top_lps = host[-4:]
            t = 0
            for r, item in enumerate(scheduled):
                seq, n = item.seq, item.num_new_tokens
                if seq.needs_prompt_logprobs:
                    num = seq.request.sampling_params.prompt_logprobs
                    start = item.start
                    results.prompt_logprobs[r] = [
                        (p + 1, _position_logprobs(seq.token_ids[p + 1], lps[t + i], ranks[t + i],
                                                   top_ids[t + i, :num], top_lps[t + i, :num]))
                        for i, p in enumerate(range(start, min(start + n, seq.num_prompt_tokens - 1)))]
                t += n
        return results


@functools.partial(jax.jit, donate_argnums=0)
def _copy_blocks(kv_cache: KVCache, src: jax.Array, dst: jax.Array) -> KVCache:
    """Copies KV blocks src[i] -> dst[i] in every layer (no dst is also a src)."""
    return KVCache(k=kv_cache.k.at[:, dst].set(kv_cache.k[:, src]),
                   v=kv_cache.v.at[:, dst].set(kv_cache.v[:, src]))


def _position_logprobs(token_id: int, logprob: float, rank: int, top_ids: np.ndarray,
                       top_logprobs: np.ndarray) -> PositionLogprobs:
    entry = {int(t): Logprob(float(lp), rank=i + 1) for i, (t, lp) in enumerate(zip(top_ids, top_logprobs))}
    entry.setdefault(int(token_id), Logprob(float(logprob), rank=int(rank)))
    return entry


def _num_top_logprobs(seq: Sequence) -> int | None:
    """How many top alternatives the row needs: beam search's candidates, or ``logprobs``."""
    if seq.group is not None and seq.group.beam is not None:
        return seq.group.beam.num_candidates
    return seq.request.sampling_params.logprobs


def _bias_entries(seq: Sequence) -> tuple[list[int] | None, dict[int, float], list[int]] | None:
    """(allowed ids or None, additive biases, banned ids) of one row, or None if it has none.

    min_tokens bans the stop token ids (and EOS, unless ignore_eos) until reached.
    """
    p = seq.request.sampling_params
    banned: list[int] = []
    if seq.num_output_tokens + seq.num_pending_tokens < p.min_tokens:
        banned = list(p.stop_token_ids) + ([] if p.ignore_eos else sorted(seq.request.eos_token_ids))
    if p.allowed_token_ids is None and not p.logit_bias and not banned:
        return None
    return p.allowed_token_ids, dict(p.logit_bias or {}), banned
