"""The engine step: forward pass + logits + sampling, as ONE jitted pure function.

It is compiled once per shape key (tokens, rows, blocks per row, and the widths of the optional
sampling arrays). Steps go through ``jax.jit``'s C++ dispatch path, which looks up the executable
in a few microseconds where an ahead-of-time ``Compiled`` call cost ~50 per argument, and the
host arrays travel packed in two buffers (see ``jaxllm.packing``). The KV cache and the token
feedback buffer are donated: XLA updates them in place instead of copying them every step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.kv_cache import KVCache
from jaxllm.packing import PackedLayout, pack, unpack
from jaxllm.sampler import Sampler
from jaxllm.step_inputs import StepOutputs


class CompiledStep:
    """The jitted step: ``(params, kv_cache, last_tokens, prepared) -> (kv_cache, last_tokens,
    outputs)``, where ``prepared`` is a ``model_runner.PreparedStep`` of host arrays (inputs,
    sampling tensors, feedback rows), shipped packed in two buffers (``jaxllm.packing``).

    Token feedback: ``last_tokens`` [R] holds the token each row of the previous step sampled
    (R = the most rows a step has; it stays on the device). A token whose ``feedback_rows``
    entry is r >= 0 takes ``last_tokens[r]`` as its id instead of ``inputs.token_ids``: the
    executor schedules and dispatches a step before the previous one's tokens reach the host.
    """

    def __init__(self, model: nn.Module, sampler: Sampler) -> None:
        def step(params: Any, kv_cache: KVCache, last_tokens: jax.Array,
                 buffers: tuple[jax.Array, jax.Array], layout: PackedLayout
                 ) -> tuple[KVCache, jax.Array, StepOutputs]:
            inputs, sampling, feedback_rows = unpack(buffers, layout)
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

        self._jitted = jax.jit(step, donate_argnums=(1, 2), static_argnums=(4,))
        self._layouts: set[PackedLayout] = set()

    @property
    def num_compilations(self) -> int:
        """Executables compiled (or loaded from the persistent cache) so far: one per layout
        (every shape and dtype of the step's inputs)."""
        return len(self._layouts)

    def __call__(self, params: Any, kv_cache: KVCache, last_tokens: jax.Array,
                 prepared: Any) -> tuple[KVCache, jax.Array, StepOutputs]:
        """Runs one step on host arrays (copied into the packed buffers before returning)."""
        buffers, layout = pack(prepared)
        self._layouts.add(layout)
        return self._jitted(params, kv_cache, last_tokens, buffers, layout)
