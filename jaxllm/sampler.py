"""The sampler: a pure, jittable function from logits and per-row settings to tokens.

Every row samples with its own temperature / top-k / top-p and its own key, so one compiled
step serves a batch of differently-sampled requests, and a seeded request draws the same
tokens alone or in any batch: its key is fold_in(key(seed), output_index), independent of the
row it landed in. Shape legend: S rows, V vocabulary.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.step_inputs import SamplingTensors


def truncation_mask(logits: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """Which tokens survive top-k then top-p (top-p over the top-k-renormalised distribution).

    Args:
        logits: [S, V] float32, already divided by temperature.
        top_k: [S] int32, 0 disables.
        top_p: [S] float32, 1 disables.
    Returns:
        [S, V] bool; ties with the smallest kept logit are kept too.
    """
    vocab = logits.shape[-1]
    sorted_logits = -jnp.sort(-logits, axis=-1)                           # [S, V] descending
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)            # [S]
    in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
    probs = jax.nn.softmax(jnp.where(in_top_k, sorted_logits, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The top token always stays; top_p >= 1 keeps everything even where float32 mass rounds to 1.
    keep_sorted = in_top_k & ((mass_before < top_p[:, None]) | (top_p[:, None] >= 1))
    num_kept = jnp.sum(keep_sorted, axis=-1)
    threshold = jnp.take_along_axis(sorted_logits, (num_kept - 1)[:, None], axis=-1)
    return logits >= threshold


def _sample_rows(logits: jax.Array, params: SamplingTensors) -> jax.Array:
    temperature = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = logits / temperature[:, None]
    needs_truncation = jnp.any((params.top_k > 0) | (params.top_p < 1))
    scaled = jax.lax.cond(
        needs_truncation,
        lambda x: jnp.where(truncation_mask(x, params.top_k, params.top_p), x, -jnp.inf),
        lambda x: x, scaled)

    def gumbel(seed, index):
        key = jax.random.fold_in(jax.random.key(seed), index)
        return jax.random.gumbel(key, (logits.shape[-1],), jnp.float32)

    noise = jax.vmap(gumbel)(params.seeds, params.output_index)           # [S, V]
    return jnp.argmax(scaled + noise, axis=-1)                            # Gumbel-max: no host sync


def sample(logits: jax.Array, params: SamplingTensors) -> tuple[jax.Array, jax.Array]:
    """Samples one token per row.

    Args:
        logits: [S, V] float32.
        params: per-row settings, [S] each.
    Returns:
        (token_ids [S] int32, logprobs [S] float32: log-softmax of the raw logits at each token).
    """
    greedy = jnp.argmax(logits, axis=-1)
    all_greedy = jnp.all(params.temperature == 0)
    sampled = jax.lax.cond(all_greedy, lambda: greedy, lambda: _sample_rows(logits, params))
    token_ids = jnp.where(params.temperature == 0, greedy, sampled).astype(jnp.int32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(logprobs, token_ids[:, None], axis=-1)[:, 0]
    return token_ids, chosen
