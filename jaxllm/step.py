"""The engine step: block copies + forward pass + logits + sampling, as ONE jitted pure function.

It is compiled once per ``StepKey`` (tokens, rows, blocks per row, and whether Python logits
processors run): every other sampling feature (penalties, logit_bias, allowed_token_ids,
min_tokens, logprobs, prompt logprobs, strategies) rides in fixed-shape arrays and runs under
``lax.cond`` when some row uses it, so it adds no variant. Steps go through ``jax.jit``'s C++
dispatch path, which looks up the executable in a few microseconds where an ahead-of-time
``Compiled`` call cost ~50 per argument, and the host arrays travel packed in two buffers (see
``jaxllm.packing``). The device state (KV cache, token feedback, penalty counts) is donated:
XLA updates it in place instead of copying it every step.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import rejection_sampler
from jaxllm.kv_cache import KVCache
from jaxllm.lora.slab import lora_variables
from jaxllm.models.causal_lm import LMHead
from jaxllm.packing import PackedLayout, unpack
from jaxllm.penalties import count_samples
from jaxllm.sampler import Sampler
from jaxllm.sharding import TP_AXIS
from jaxllm.step_inputs import DeviceState, StepArrays, StepInputs, StepKey, StepOutputs

logger = logging.getLogger(__name__)


def copy_blocks(kv_cache: KVCache, copies: jax.Array) -> KVCache:
    """Copies KV blocks src -> dst in every layer, for each (src, dst) row of ``copies`` [C, 2]
    before the first (0, 0) row (padding), in order; every array of the cache (a quantized
    cache's scales too) has the block axis second. A loop of as many iterations as real
    copies: a step without copies copies nothing, and XLA updates the cache in place."""
    def copy(i: jax.Array, cache: KVCache) -> KVCache:
        src, dst = copies[i, 0], copies[i, 1]

        def move(a: jax.Array) -> jax.Array:
            block = jax.lax.dynamic_slice_in_dim(a, src, 1, axis=1)
            return jax.lax.dynamic_update_slice_in_dim(a, block, dst, axis=1)

        return jax.tree.map(move, cache)

    num_copies = jnp.sum(jnp.cumprod(copies[:, 0] != copies[:, 1]))
    return jax.lax.fori_loop(0, num_copies, copy, kv_cache)


def _forward(model: nn.Module, params: Any, kv_cache: KVCache, inputs: StepInputs,
             lora: dict[str, Any] | None = None) -> tuple[KVCache, jax.Array, jax.Array]:
    """(kv_cache, row logits [S, V], final-normed hidden states of every token [T, D]).

    The model computes logits only at ``logits_indices``; prompt logprobs need every token's,
    which a fixed-shape step can afford only under ``lax.cond``. So the model is asked for
    every token's index, and its final norm (the module named "norm" at the top) is
    intercepted: it normalises all T hidden states, which are kept, and hands the head only
    each row's last (T x D elementwise work, ~0.3 M values at 512 tokens of SmolLM2).
    ``lora``: the model's ``"lora"`` collection (``jaxllm.lora.slab.lora_variables``), if any.
    """
    num_tokens = inputs.token_ids.shape[0]
    every_token = dataclasses.replace(inputs, logits_indices=jnp.arange(num_tokens, dtype=jnp.int32))
    normed = []

    def keep_every_token(next_fun, args, kwargs, context):
        if context.method_name != "__call__" or context.module.path != ("norm",):
            return next_fun(*args, **kwargs)
        normed.append(next_fun(*args, **kwargs))
        return normed[0][inputs.logits_indices]

    with nn.intercept_methods(keep_every_token):
        kv_cache, logits = model.apply({"params": params, **({"lora": lora} if lora else {})},
                                       kv_cache, every_token)
    return kv_cache, logits, normed[0]


def head_logits(model: nn.Module, params: Any, normed: jax.Array) -> jax.Array:
    """[T, V] float32 logits of final-normed hidden states [T, D]: the model's own head."""
    head = LMHead(model.config, model.dtype)
    return head.apply({"params": params.get("lm_head", {})}, normed,
                      params["embed_tokens"]["embedding"])


def _replicated(mesh: jax.sharding.Mesh | None) -> Any:
    """Under tensor parallelism, gathers the vocabulary-split logits whole onto every device
    once, so the sampler runs replicated: left split, GSPMD partitioned the sampler too, with
    ~20 small collectives per step (maxima, sums, gathers) in place of this one. The logits
    are pinned vocabulary-split first: asked only for whole logits, GSPMD gathered the whole
    head [D, V] onto every device instead (twice a step, ~0.7 s a step on 2 CPU devices for a
    32k vocabulary) and computed all of it on each."""
    if mesh is None:
        return lambda x: x
    split = NamedSharding(mesh, PartitionSpec(None, TP_AXIS))
    whole = NamedSharding(mesh, PartitionSpec())
    return lambda x: jax.lax.with_sharding_constraint(
        jax.lax.with_sharding_constraint(x, split), whole)


def _under_mesh(mesh: jax.sharding.Mesh, jitted: Any, args: tuple) -> Any:
    """Calls (and so traces) the step with the tensor-parallel mesh as the context mesh, which
    the model's matmuls read (``layers.dot_general``)."""
    with jax.set_mesh(mesh):
        return jitted(*args)


class CompiledStep:
    """The jitted step: ``(params, state, key, layout, buffers) -> (state, outputs)``, where
    ``buffers`` are a ``StepArrays`` packed as ``layout`` (``jaxllm.packing``), the layout of
    ``key``'s shapes (``StepLayout.packed(key)``, so it adds no compilation of its own).

    Token feedback: ``state.last_tokens`` [S_max] holds the token each row of the previous
    step sampled. A token whose ``feedback_rows`` entry is r >= 0 takes ``last_tokens[r]`` as
    its id instead of ``inputs.token_ids``: the executor schedules and dispatches a step before
    the previous one's tokens reach the host.

    ``mesh``: the tensor-parallel mesh (``jaxllm.sharding``); None on one device, where the
    step is traced and called exactly as without one.
    """

    def __init__(self, model: nn.Module, sampler: Sampler, mesh: jax.sharding.Mesh | None = None) -> None:
        whole = _replicated(mesh)

        def step(params: Any, state: DeviceState, buffers: tuple[jax.Array, jax.Array],
                 key: StepKey, layout: PackedLayout, lora_slab: Any = None
                 ) -> tuple[DeviceState, StepOutputs]:
            arrays: StepArrays = unpack(buffers, layout)
            kv_cache = copy_blocks(state.kv_cache, arrays.block_copies)
            fed_back = state.last_tokens[jnp.maximum(arrays.feedback_rows, 0)]
            inputs = dataclasses.replace(arrays.inputs, token_ids=jnp.where(
                arrays.feedback_rows >= 0, fed_back, arrays.inputs.token_ids))
            lora = (None if lora_slab is None
                    else lora_variables(lora_slab, arrays.lora_slots, model.scan_layers))
            kv_cache, logits, normed = _forward(model, params, kv_cache, inputs, lora)
            logits, vocab = whole(logits), logits.shape[1]
            prompt = jax.lax.cond(
                jnp.any(arrays.prompt_next_ids >= 0),
                lambda: sampler.score_prompt(whole(head_logits(model, params, normed)),
                                             arrays.prompt_next_ids),
                lambda: sampler.no_prompt_scores(key.num_tokens, vocab))
            rows = sampler(logits, arrays.sampling, state.token_counts,
                           host_processors=key.host_processors)
            sampling, drafts = arrays.sampling, arrays.draft_token_ids
            if drafts.shape[1]:   # speculative decoding: verify the rows' proposals
                verified = jax.lax.cond(
                    jnp.any(drafts >= 0),
                    lambda: rejection_sampler.verify(
                        sampler, lambda x: whole(head_logits(model, params, x)), normed,
                        inputs.logits_indices, drafts, sampling, state.token_counts),
                    lambda: rejection_sampler.no_verification(*drafts.shape))
                token_ids, logprobs, verified = rejection_sampler.emit(
                    rows.token_ids, rows.logprobs, verified, drafts)
                token_counts = rejection_sampler.count_emitted(
                    state.token_counts, sampling.penalty_slots, verified, sampling.samples)
            else:
                token_ids, logprobs = rows.token_ids, rows.logprobs
                verified = rejection_sampler.Verified(token_ids[:, None], logprobs[:, None],
                                                      jnp.zeros_like(token_ids))
                token_counts = count_samples(state.token_counts, sampling.penalty_slots,
                                             token_ids, sampling.samples)
            state = DeviceState(kv_cache=kv_cache,
                                last_tokens=state.last_tokens.at[:key.num_rows].set(token_ids),
                                token_counts=token_counts)
            return state, StepOutputs(
                token_ids=token_ids, logprobs=logprobs, ranks=rows.ranks,
                top_token_ids=rows.top_token_ids, top_logprobs=rows.top_logprobs,
                prompt_logprobs=prompt.logprobs, prompt_ranks=prompt.ranks,
                prompt_top_token_ids=prompt.top_token_ids, prompt_top_logprobs=prompt.top_logprobs,
                spec_token_ids=verified.token_ids, spec_logprobs=verified.logprobs,
                num_accepted=verified.num_accepted)

        self._jitted = jax.jit(step, donate_argnums=1, static_argnums=(3, 4))
        if mesh is not None:
            jitted = self._jitted
            self._jitted = lambda *args: _under_mesh(mesh, jitted, args)
        self.keys: set[StepKey] = set()

    @property
    def num_compilations(self) -> int:
        """Executables compiled (or loaded from the persistent cache) so far: one per key."""
        return len(self.keys)

    def __call__(self, params: Any, state: DeviceState, key: StepKey, layout: PackedLayout,
                 buffers: tuple[Any, Any], lora_slab: Any = None) -> tuple[DeviceState, StepOutputs]:
        """Runs one step on packed host buffers (compiling it first for a new key: logged at
        INFO, which ``python -m jaxllm`` shows, so a first run says why it waits).
        ``lora_slab``: the LoRA slab's arrays (``jaxllm.lora.slab.LoRASlab``) when serving
        adapters; new contents of the same shapes reuse the compiled step."""
        if key in self.keys:
            return self._jitted(params, state, buffers, key, layout, lora_slab)
        self.keys.add(key)
        logger.info("compiling the step for %d tokens x %d rows x %d blocks%s (first use of "
                    "this shape)...", key.num_tokens, key.num_rows, key.num_blocks,
                    " with a structured-outputs mask" * key.structured
                    + " with Python logits processors" * key.host_processors)
        start = time.perf_counter()
        result = self._jitted(params, state, buffers, key, layout, lora_slab)
        logger.info("compiled in %.1f s", time.perf_counter() - start)
        return result
