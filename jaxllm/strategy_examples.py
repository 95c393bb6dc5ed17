"""Example sampling strategies, written only against the public API (``jaxllm.strategies``).

Each one is a jittable filter of temperature-scaled, truncated logits (see ``jaxllm.strategies``
for the contract). ``register_examples()`` registers them by name; every ``Engine`` calls it,
so they are available in every engine without importing this module having side effects:

* ``"typical"``  locally typical sampling (Meister et al., 2022), argument ``mass``;
* ``"epsilon"``  epsilon sampling (Hewitt et al., 2022), argument ``epsilon``;
* ``"eta"``      eta sampling (Hewitt et al., 2022), argument ``epsilon``.

Their definitions follow transformers' TypicalLogitsWarper, EpsilonLogitsWarper and
EtaLogitsWarper (keeping at least one token), so results can be checked against them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.strategies import register_strategy, registered_strategies


def _entropy(log_probs: jax.Array) -> jax.Array:
    """[S, V] log-probabilities -> [S] entropy in nats; removed (-inf) tokens add nothing."""
    probs = jnp.exp(log_probs)
    return -jnp.sum(jnp.where(probs > 0, probs * log_probs, 0.0), axis=-1)


def _keep_top_token(keep: jax.Array, logits: jax.Array) -> jax.Array:
    return keep | (logits >= jnp.max(logits, axis=-1, keepdims=True))


def typical(logits: jax.Array, args: dict[str, jax.Array]) -> jax.Array:
    """Keeps the tokens whose surprisal is closest to the entropy, up to ``mass`` probability."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    distance = jnp.abs(-log_probs - _entropy(log_probs)[:, None])            # inf for removed
    order = jnp.argsort(distance, axis=-1)
    sorted_distance = jnp.take_along_axis(distance, order, axis=-1)
    cumulative = jnp.cumsum(jnp.exp(jnp.take_along_axis(log_probs, order, axis=-1)), axis=-1)
    last = jnp.minimum(jnp.sum(cumulative < args["mass"][:, None], axis=-1), logits.shape[-1] - 1)
    cutoff = jnp.take_along_axis(sorted_distance, last[:, None], axis=-1)
    return jnp.where(distance <= cutoff, logits, -jnp.inf)


def epsilon(logits: jax.Array, args: dict[str, jax.Array]) -> jax.Array:
    """Removes every token with probability below ``epsilon`` (the most likely one stays)."""
    probs = jax.nn.softmax(logits, axis=-1)
    keep = _keep_top_token(probs >= args["epsilon"][:, None], logits)
    return jnp.where(keep, logits, -jnp.inf)


def eta(logits: jax.Array, args: dict[str, jax.Array]) -> jax.Array:
    """Epsilon sampling with an entropy-dependent floor: min(epsilon, sqrt(epsilon) * exp(-H))."""
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    eps = args["epsilon"]
    floor = jnp.minimum(eps, jnp.sqrt(eps) * jnp.exp(-_entropy(log_probs)))
    keep = _keep_top_token(jnp.exp(log_probs) >= floor[:, None], logits)
    return jnp.where(keep, logits, -jnp.inf)


# name -> (function, keyword defaults)
EXAMPLES = {"typical": (typical, {"mass": 0.9}), "epsilon": (epsilon, {"epsilon": 3e-4}),
            "eta": (eta, {"epsilon": 3e-4})}


def register_examples() -> None:
    """Registers the examples under their names, unless a strategy already has that name (a
    user's own "typical" wins)."""
    taken = {s.name for s in registered_strategies()}
    for name, (fn, defaults) in EXAMPLES.items():
        if name not in taken:
            register_strategy(name, **defaults)(fn)
