"""Compiles every step shape of a :class:`~jaxllm.buckets.BucketPolicy` before serving.

Each key is compiled and run once on all-padding inputs: every token has row -1 and writes its
K/V into the reserved padding block 0, every block table is zeros and every context empty, so
the KV cache outside block 0 is untouched. Running (not only compiling) also fills JAX's
persistent compilation cache and any lazy initialisation, so a second start-up only loads.
(JAX does not write executables with host callbacks to that cache, so the variant for Python
logits processors, compiled on first use, is compiled afresh every start-up.)
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
import tqdm.auto as tqdm

from jaxllm.buckets import BaseKey, BucketPolicy
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.model_runner import ModelRunner, PreparedStep
from jaxllm.step_inputs import SamplingTensors, StepInputs


def padding_step_inputs(key: BaseKey, block_size: int, rotary_shape: tuple[int, int],
                        strategy_args: int = 1
                        ) -> tuple[StepInputs, SamplingTensors]:
    """Host inputs of shape ``key`` = (T, S, P) that only write into padding block 0.

    Laid out as ``ModelRunner.prepare_inputs`` lays out padding: token rows -1, slots
    ``0 .. block_size - 1`` of block 0, zero block tables, context lengths and rotary cos/sin
    (``rotary_shape`` = (tables, width)), neutral (greedy) sampling rows, and the plain variant (no history,
    bias or prompt logprobs).
    """
    num_tokens, num_rows, num_blocks = key
    zeros_t = np.zeros(num_tokens, np.int32)
    attention = AttentionMetadata(
        positions=zeros_t.copy(), slot_mapping=(np.arange(num_tokens) % block_size).astype(np.int32),
        token_rows=np.full(num_tokens, -1, np.int32),
        block_tables=np.zeros((num_rows, num_blocks), np.int32), context_lens=np.zeros(num_rows, np.int32))
    inputs = StepInputs(
        token_ids=zeros_t, attention=attention, logits_indices=np.zeros(num_rows, np.int32),
        rotary=np.zeros((rotary_shape[0], num_tokens, rotary_shape[1]), np.float32))
    sampling = SamplingTensors.build(num_rows, strategy_args=np.zeros((num_rows, strategy_args)))
    return inputs, sampling


def warmup(model_runner: ModelRunner, policy: BucketPolicy, *, progress: bool = True,
           keys: Iterable[BaseKey] | None = None) -> int:
    """Compiles and runs the runner's step once for every base key of ``policy``.

    Call it before any request is submitted (it updates ``model_runner.kv_cache`` like a step).

    Args:
        policy: the bucket policy whose ``keys()`` the engine's steps use.
        progress: show a "Compiling steps" tqdm bar.
        keys: a subset of keys to warm (default: all of ``policy.keys()``).

    Returns:
        How many executables were newly compiled (keys compiled before are only run).
    """
    keys = tuple(policy.keys() if keys is None else keys)
    step, width = model_runner.step, model_runner.num_strategy_args
    before = step.num_compilations
    for key in tqdm.tqdm(keys, desc="Compiling steps", unit="step", disable=not progress):
        inputs, sampling = padding_step_inputs(key, model_runner.block_size,
                                               model_runner.rotary.shape, width)
        no_feedback = np.full(inputs.token_ids.shape, -1, np.int32)
        jax.block_until_ready(model_runner.run_step(PreparedStep(inputs, sampling, no_feedback)))
    return step.num_compilations - before
