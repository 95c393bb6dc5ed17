"""The engine step: forward pass + logits + sampling, as ONE jitted pure function.

It is compiled once per shape key (tokens, rows, blocks per row, and the widths of the optional
sampling arrays). Steps go through ``jax.jit``'s C++ dispatch path with the host (numpy) inputs
as arguments: it looks up the executable and transfers the inputs in C++, which costs a few
microseconds per array where a Python ``device_put`` plus a call of an ahead-of-time
``Compiled`` cost ~50 (a 1-row step spent ~2.5 ms of host time on them). Compilations are
counted by input signature (every shape and dtype), which is what XLA compiles for. The KV cache
argument is donated: XLA updates it in place instead of copying it every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kv_cache import KVCache
from jaxllm.sampler import Sampler
from jaxllm.step_inputs import SamplingTensors, StepInputs, StepOutputs


class CompiledStep:
    """The jitted step: ``(params, kv_cache, last_tokens, inputs, sampling, feedback_rows) ->
    (kv_cache, last_tokens, outputs)``.

    Token feedback: ``last_tokens`` [R] holds the token each row of the previous step sampled
    (R = the most rows a step has; it stays on the device). A token whose ``feedback_rows``
    entry is r >= 0 takes ``last_tokens[r]`` as its id instead of ``inputs.token_ids``: the
    executor schedules and dispatches a step before the previous one's tokens reach the host.
    """

    def __init__(self, model: nn.Module, sampler: Sampler) -> None:
        def step(params: Any, kv_cache: KVCache, last_tokens: jax.Array, inputs: StepInputs,
                 sampling: SamplingTensors, feedback_rows: jax.Array
                 ) -> tuple[KVCache, jax.Array, StepOutputs]:
            fed_back = last_tokens[jnp.maximum(feedback_rows, 0)]
            inputs = dataclasses.replace(
                inputs, token_ids=jnp.where(feedback_rows >= 0, fed_back, inputs.token_ids))
            if sampling.prompt_next_ids.shape[0]:
                # Prompt logprobs need every token's logits, not only each row's last.
                every_token = jnp.arange(inputs.token_ids.shape[0], dtype=jnp.int32)
                kv_cache, all_logits = model.apply(
                    {"params": params}, kv_cache, dataclasses.replace(inputs, logits_indices=every_token))
                outputs = sampler(all_logits[inputs.logits_indices], sampling, all_logits)
            else:
                kv_cache, logits = model.apply({"params": params}, kv_cache, inputs)
                outputs = sampler(logits, sampling)
            return kv_cache, last_tokens.at[:outputs.token_ids.shape[0]].set(outputs.token_ids), outputs

        self._jitted = jax.jit(step, donate_argnums=(1, 2))
        self._signatures: set[tuple] = set()

    @property
    def num_compilations(self) -> int:
        """Executables compiled (or loaded from the persistent cache) so far."""
        return len(self._signatures)

    def __call__(self, params: Any, kv_cache: KVCache, last_tokens: jax.Array, inputs: StepInputs,
                 sampling: SamplingTensors, feedback_rows: np.ndarray
                 ) -> tuple[KVCache, jax.Array, StepOutputs]:
        """Runs one step; inputs may be numpy arrays (transferred by the call)."""
        self._signatures.add(tuple((a.shape, a.dtype.str) for a in jax.tree_util.tree_leaves((inputs, sampling))))
        return self._jitted(params, kv_cache, last_tokens, inputs, sampling, feedback_rows)
