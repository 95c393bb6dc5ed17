"""ModelRunner: ScheduledBatch -> bucketed StepInputs -> one compiled step -> host tokens.

It owns preallocated numpy buffers sized for the largest bucket, fills them in place each
step, ships them with one ``device_put`` and reads the outputs back with one transfer.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxllm.kv_cache import KVCache
from jaxllm.scheduler import ScheduledBatch
from jaxllm.step import CompiledStep
from jaxllm.step_inputs import SamplingTensors, StepInputs, StepOutputs


def power_of_two_buckets(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to and including ``limit`` (added as the last bucket if not a power)."""
    buckets = []
    size = 1
    while size < limit:
        buckets.append(size)
        size *= 2
    buckets.append(limit)
    return tuple(buckets)


def pick_bucket(n: int, buckets: tuple[int, ...]) -> int:
    for size in buckets:
        if size >= n:
            return size
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


def _seed32(seed: int) -> int:
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


@dataclasses.dataclass
class _HostBuffers:
    token_ids_np: np.ndarray
    positions_np: np.ndarray
    slot_mapping_np: np.ndarray
    token_rows_np: np.ndarray
    block_tables_np: np.ndarray
    context_lens_np: np.ndarray
    logits_indices_np: np.ndarray
    temperature_np: np.ndarray
    top_k_np: np.ndarray
    top_p_np: np.ndarray
    seeds_np: np.ndarray
    output_index_np: np.ndarray

    @classmethod
    def allocate(cls, max_tokens: int, max_rows: int, max_blocks: int) -> "_HostBuffers":
        i32, f32 = np.int32, np.float32
        return cls(
            token_ids_np=np.zeros(max_tokens, i32), positions_np=np.zeros(max_tokens, i32),
            slot_mapping_np=np.zeros(max_tokens, i32), token_rows_np=np.zeros(max_tokens, i32),
            block_tables_np=np.zeros((max_rows, max_blocks), i32),
            context_lens_np=np.zeros(max_rows, i32), logits_indices_np=np.zeros(max_rows, i32),
            temperature_np=np.zeros(max_rows, f32), top_k_np=np.zeros(max_rows, i32),
            top_p_np=np.ones(max_rows, f32), seeds_np=np.zeros(max_rows, np.uint32),
            output_index_np=np.zeros(max_rows, i32))


class ModelRunner:
    def __init__(self, step: CompiledStep, params: Any, kv_cache: KVCache, block_size: int,
                 max_num_batched_tokens: int, max_num_seqs: int, max_blocks_per_seq: int) -> None:
        self.step = step
        self.params = params
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.token_buckets = power_of_two_buckets(max_num_batched_tokens)
        self.row_buckets = power_of_two_buckets(max_num_seqs)
        self.block_buckets = power_of_two_buckets(max_blocks_per_seq)
        self._buf = _HostBuffers.allocate(max_num_batched_tokens, max_num_seqs, max_blocks_per_seq)

    def prepare_inputs(self, batch: ScheduledBatch) -> tuple[StepInputs, SamplingTensors]:
        """Packs the batch into bucketed host arrays and moves them to the device in one call."""
        b, bs = self._buf, self.block_size
        num_rows = len(batch.scheduled)
        num_tokens = pick_bucket(batch.num_tokens, self.token_buckets)
        rows = pick_bucket(num_rows, self.row_buckets)
        max_ctx = max(item.seq.num_computed_tokens for item in batch.scheduled)
        blocks = pick_bucket(max(1, -(-max_ctx // bs)), self.block_buckets)

        b.block_tables_np[:rows, :blocks] = 0
        b.context_lens_np[:rows] = 0
        b.logits_indices_np[:rows] = 0
        b.temperature_np[:rows] = 0
        b.top_k_np[:rows] = 0
        b.top_p_np[:rows] = 1
        b.seeds_np[:rows] = 0
        b.output_index_np[:rows] = 0
        t = 0
        for r, item in enumerate(batch.scheduled):
            seq, n = item.seq, item.num_new_tokens
            start = seq.num_computed_tokens
            block_ids = np.asarray(seq.block_ids, np.int32)
            positions = np.arange(start, start + n, dtype=np.int32)
            b.token_ids_np[t:t + n] = seq.token_ids[start:start + n]
            b.positions_np[t:t + n] = positions
            b.slot_mapping_np[t:t + n] = block_ids[positions // bs] * bs + positions % bs
            b.token_rows_np[t:t + n] = r
            num_ctx_blocks = -(-start // bs)
            b.block_tables_np[r, :num_ctx_blocks] = block_ids[:num_ctx_blocks]
            b.context_lens_np[r] = start
            b.logits_indices_np[r] = t + n - 1
            params = seq.request.sampling_params
            b.temperature_np[r] = params.temperature
            b.top_k_np[r] = params.top_k
            b.top_p_np[r] = params.top_p
            b.seeds_np[r] = _seed32(seq.request.seed)
            b.output_index_np[r] = seq.num_output_tokens
            t += n
        # Padding tokens write into the reserved block 0 and belong to no row.
        b.token_ids_np[t:num_tokens] = 0
        b.positions_np[t:num_tokens] = 0
        b.slot_mapping_np[t:num_tokens] = np.arange(num_tokens - t) % bs
        b.token_rows_np[t:num_tokens] = -1

        inputs = StepInputs(
            token_ids=b.token_ids_np[:num_tokens], positions=b.positions_np[:num_tokens],
            slot_mapping=b.slot_mapping_np[:num_tokens], token_rows=b.token_rows_np[:num_tokens],
            block_tables=b.block_tables_np[:rows, :blocks], context_lens=b.context_lens_np[:rows],
            logits_indices=b.logits_indices_np[:rows])
        sampling = SamplingTensors(
            temperature=b.temperature_np[:rows], top_k=b.top_k_np[:rows], top_p=b.top_p_np[:rows],
            seeds=b.seeds_np[:rows], output_index=b.output_index_np[:rows])
        # Copy out of the reused buffers: on CPU device_put may alias an aligned numpy array,
        # and the next step rewrites these buffers while this one may still be in flight.
        return jax.device_put(jax.tree_util.tree_map(np.copy, (inputs, sampling)))

    def dispatch(self, batch: ScheduledBatch, inputs: tuple[StepInputs, SamplingTensors]) -> StepOutputs:
        """Launches one step on prepared inputs and returns at once (JAX dispatch is async)."""
        # Copy-on-write block copies only arise from forked sequences (n > 1, beam search),
        # which the engine does not create yet.
        assert not batch.block_copies, "block copies are not supported yet"
        inputs, sampling = inputs
        self.kv_cache, outputs = self.step(self.params, self.kv_cache, inputs, sampling)
        return outputs

    def fetch(self, batch: ScheduledBatch, outputs: StepOutputs) -> tuple[list[int], list[float]]:
        """Waits for a dispatched step; one transfer brings the rows' tokens and logprobs."""
        token_ids, logprobs = jax.device_get((outputs.token_ids, outputs.logprobs))
        num_rows = len(batch.scheduled)
        return token_ids[:num_rows].tolist(), logprobs[:num_rows].tolist()
