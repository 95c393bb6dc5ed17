"""The engine step: forward pass + logits + sampling, as ONE jitted pure function.

It is compiled ahead of time once per shape key (tokens, rows, blocks per row, and the widths of
the optional sampling arrays) and the executables are kept in a table, so the number of
compilations is exact and observable. The KV cache argument is donated: XLA updates it in place
instead of copying it every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.kv_cache import KVCache
from jaxllm.sampler import Sampler
from jaxllm.step_inputs import SamplingTensors, StepInputs, StepOutputs

StepKey = tuple[int, ...]


def bucket_key(inputs: StepInputs, sampling: SamplingTensors) -> StepKey:
    """(T, S, P, history width, bias width, prompt-logprob width, processors): selects an
    executable."""
    num_rows, blocks_per_row = inputs.block_tables.shape
    return (inputs.token_ids.shape[0], num_rows, blocks_per_row, sampling.history.shape[1],
            sampling.logit_bias.shape[1], sampling.prompt_next_ids.shape[0],
            sampling.use_processors.shape[0])


class CompiledStep:
    def __init__(self, model: nn.Module, sampler: Sampler) -> None:
        def step(params: Any, kv_cache: KVCache, inputs: StepInputs,
                 sampling: SamplingTensors) -> tuple[KVCache, StepOutputs]:
            if sampling.prompt_next_ids.shape[0]:
                # Prompt logprobs need every token's logits, not only each row's last.
                every_token = jnp.arange(inputs.token_ids.shape[0], dtype=jnp.int32)
                kv_cache, all_logits = model.apply(
                    {"params": params}, kv_cache, dataclasses.replace(inputs, logits_indices=every_token))
                return kv_cache, sampler(all_logits[inputs.logits_indices], sampling, all_logits)
            kv_cache, logits = model.apply({"params": params}, kv_cache, inputs)
            return kv_cache, sampler(logits, sampling)

        self._jitted = jax.jit(step, donate_argnums=(1,))
        self._executables: dict[StepKey, Any] = {}

    @property
    def num_compilations(self) -> int:
        return len(self._executables)

    def __call__(self, params: Any, kv_cache: KVCache, inputs: StepInputs,
                 sampling: SamplingTensors) -> tuple[KVCache, StepOutputs]:
        key = bucket_key(inputs, sampling)
        executable = self._executables.get(key)
        if executable is None:
            executable = self._jitted.lower(params, kv_cache, inputs, sampling).compile()
            self._executables[key] = executable
        return executable(params, kv_cache, inputs, sampling)
