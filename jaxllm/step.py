"""The engine step: forward pass + last-token logits + sampling, as ONE jitted pure function.

It is compiled ahead of time once per shape bucket (tokens, rows, blocks per row) and the
executables are kept in a table, so the number of compilations is exact and observable. The KV
cache argument is donated: XLA updates it in place instead of copying it every step.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from jaxllm.kv_cache import KVCache
from jaxllm.sampler import sample
from jaxllm.step_inputs import SamplingTensors, StepInputs, StepOutputs


def bucket_key(inputs: StepInputs) -> tuple[int, int, int]:
    """(T, S, P): the shapes that select a compiled executable."""
    num_rows, blocks_per_row = inputs.block_tables.shape
    return inputs.token_ids.shape[0], num_rows, blocks_per_row


class CompiledStep:
    def __init__(self, model: nn.Module) -> None:
        def step(params: Any, kv_cache: KVCache, inputs: StepInputs,
                 sampling: SamplingTensors) -> tuple[KVCache, StepOutputs]:
            kv_cache, logits = model.apply({"params": params}, kv_cache, inputs)
            token_ids, logprobs = sample(logits, sampling)
            return kv_cache, StepOutputs(token_ids=token_ids, logprobs=logprobs)

        self._jitted = jax.jit(step, donate_argnums=(1,))
        self._executables: dict[tuple[int, int, int], Any] = {}

    @property
    def num_compilations(self) -> int:
        return len(self._executables)

    def __call__(self, params: Any, kv_cache: KVCache, inputs: StepInputs,
                 sampling: SamplingTensors) -> tuple[KVCache, StepOutputs]:
        key = bucket_key(inputs)
        executable = self._executables.get(key)
        if executable is None:
            executable = self._jitted.lower(params, kv_cache, inputs, sampling).compile()
            self._executables[key] = executable
        return executable(params, kv_cache, inputs, sampling)
