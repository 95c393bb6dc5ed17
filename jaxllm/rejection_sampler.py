"""Verifying proposed tokens inside the compiled step (speculative decoding), pure jax.

A row with d proposals x_1 .. x_d computes d + 1 tokens: its last known token and the
proposals. Position j (0 .. d) of the row predicts output token base + j. The target token
at each position is drawn exactly as a plain decode step would draw that output token:
every SamplingParams feature on the position's logits (penalties counting the proposals
before it as output tokens), and Gumbel-max with the key ``fold_in(key(seed), base + j)``.
The row keeps proposals while they equal the target tokens and then emits the target token
at the first mismatch (or the bonus token after d matches): 1 .. d + 1 tokens.

Why this is the speculative-sampling rule for n-gram proposals: their draft distribution q is
a point mass on x_j, so the rule accepts x_j with probability min(1, p(x_j) / 1) = p(x_j) and
otherwise resamples from max(p - q, 0) normalised, i.e. p with x_j removed. Drawing y ~ p
and accepting iff y == x_j does exactly that: P(accept) = p(x_j), and given a rejection y is
distributed as p conditioned on y != x_j. Greedy rows are the temperature-0 case (accept while
the proposal is the argmax). A bonus of this form: each emitted token is the very token the
request would have drawn without speculation (same distribution, same key), so a seeded
request gives the same tokens with or without speculation, alone or in any batch.

``rejection_sample`` is the general rule for a draft distribution q (a draft model), on
explicit probabilities.

Shape legend: S rows, K proposals per row (the engine's num_speculative_tokens), J = K + 1
positions per row, R = S x J virtual rows, T tokens, D model dim, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp

from jaxllm.penalties import count_samples
from jaxllm.sampler import Sampler
from jaxllm.step_inputs import SamplingTensors


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Verified:
    token_ids: jax.Array      # [S, J] int32   target token at each position (valid to num_accepted)
    logprobs: jax.Array       # [S, J] float32 their raw-logit logprobs
    num_accepted: jax.Array   # [S] int32      leading proposals equal to the target tokens


def num_accepted(draft_token_ids: jax.Array, target_token_ids: jax.Array) -> jax.Array:
    """[S] how many leading proposals [S, K] (-1 = none) equal the target tokens [S, K + 1]."""
    k = draft_token_ids.shape[1]
    match = (target_token_ids[:, :k] == draft_token_ids) & (draft_token_ids >= 0)
    return jnp.sum(jnp.cumprod(match.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)


def position_rows(sampling: SamplingTensors, num_positions: int) -> SamplingTensors:
    """Each row's settings repeated for its J positions (row r -> virtual rows r J .. r J + J - 1),
    position j sampling output token ``output_index + j``; no logprob alternatives."""
    rows = jax.tree.map(lambda x: jnp.repeat(x, num_positions, axis=0), sampling)
    offsets = jnp.tile(jnp.arange(num_positions, dtype=jnp.int32), sampling.temperature.shape[0])
    return dataclasses.replace(rows, output_index=rows.output_index + offsets,
                               num_logprobs=jnp.full_like(rows.num_logprobs, -1),
                               beam=jnp.zeros_like(rows.beam))


def prior_tokens(draft_token_ids: jax.Array) -> jax.Array:
    """[R, K]: for position j of row r, the proposals before it (-1 elsewhere): penalties
    count them as output tokens, as they are once accepted."""
    s, k = draft_token_ids.shape
    before = jnp.arange(k)[None, :] < jnp.arange(k + 1)[:, None]                     # [J, K]
    return jnp.where(before[None], draft_token_ids[:, None, :], -1).reshape(s * (k + 1), k)


def verify(sampler: Sampler, head: Callable[[jax.Array], jax.Array], normed: jax.Array,
           logits_indices: jax.Array, draft_token_ids: jax.Array, sampling: SamplingTensors,
           token_counts: jax.Array) -> Verified:
    """Scores every position of the proposing rows and decides acceptance.

    Args:
        head: final-normed hidden states [R, D] -> logits [R, V] (the model's head).
        normed: [T, D] final-normed hidden states of every token of the step.
        logits_indices: [S] each row's last token: a row of d proposals ends with them.
        draft_token_ids: [S, K] int32 each row's proposals, -1 padded.
        sampling: the rows' settings [S].
        token_counts: [N, V] the penalty slots.
    """
    s, k = draft_token_ids.shape
    num_drafts = jnp.sum(draft_token_ids >= 0, axis=1)                                   # [S]
    indices = logits_indices[:, None] - num_drafts[:, None] + jnp.arange(k + 1)[None]    # [S, J]
    indices = jnp.clip(indices, 0, normed.shape[0] - 1).reshape(-1)
    logits = head(normed[indices])                                                       # [R, V]
    rows = sampler(logits, position_rows(sampling, k + 1), token_counts,
                   prior_tokens=prior_tokens(draft_token_ids))
    token_ids = rows.token_ids.reshape(s, k + 1)
    return Verified(token_ids, rows.logprobs.reshape(s, k + 1), num_accepted(draft_token_ids, token_ids))


def no_verification(num_rows: int, num_speculative: int) -> Verified:
    """Zeros shaped as ``verify``'s, for steps without proposals."""
    shape = (num_rows, num_speculative + 1)
    return Verified(jnp.zeros(shape, jnp.int32), jnp.zeros(shape, jnp.float32),
                    jnp.zeros(num_rows, jnp.int32))


def emit(token_ids: jax.Array, logprobs: jax.Array, verified: Verified, draft_token_ids: jax.Array
         ) -> tuple[jax.Array, jax.Array, Verified]:
    """Each row's last emitted token and its logprob [S] (a plain row's sample, a proposing
    row's token after its accepted proposals), and ``verified`` with plain rows' single
    sample in column 0 (num_accepted 0): every row's emitted tokens are
    ``token_ids[r, :num_accepted[r] + 1]``."""
    proposing = jnp.any(draft_token_ids >= 0, axis=1)                                    # [S]
    accepted = jnp.where(proposing, verified.num_accepted, 0)
    last = jnp.take_along_axis(verified.token_ids, accepted[:, None], axis=1)[:, 0]
    last_lp = jnp.take_along_axis(verified.logprobs, accepted[:, None], axis=1)[:, 0]
    all_ids = jnp.where(proposing[:, None], verified.token_ids,
                        verified.token_ids.at[:, 0].set(token_ids))
    all_lps = jnp.where(proposing[:, None], verified.logprobs,
                        verified.logprobs.at[:, 0].set(logprobs))
    return (jnp.where(proposing, last, token_ids), jnp.where(proposing, last_lp, logprobs),
            Verified(all_ids, all_lps, accepted))


def count_emitted(token_counts: jax.Array, slots: jax.Array, verified: Verified,
                  samples: jax.Array) -> jax.Array:
    """Adds every emitted token (``emit``'s layout) of the sampling rows to their penalty slots."""
    s, j = verified.token_ids.shape
    kept = (jnp.arange(j)[None] <= verified.num_accepted[:, None]) & samples[:, None]     # [S, J]
    return count_samples(token_counts, jnp.repeat(slots, j), verified.token_ids.reshape(-1),
                         kept.reshape(-1))


def rejection_sample(target_probs: jax.Array, draft_probs: jax.Array, draft_token_ids: jax.Array,
                     key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The speculative-sampling rule for a draft distribution q (Leviathan et al. 2023).

    Proposal j is accepted with probability min(1, p_j(x_j) / q_j(x_j)); the first rejected
    position draws from max(p_j - q_j, 0) normalised, and a row that accepts all K draws the
    bonus token from p_K. Every emitted token is then distributed as the target's.

    Args:
        target_probs: [S, K + 1, V] p at each position.
        draft_probs: [S, K, V] q the proposals were drawn from.
        draft_token_ids: [S, K] int32 the proposals.
        key: a PRNG key.
    Returns:
        (token_ids [S, K + 1] int32: the proposals, then the resampled or bonus token at
        ``num_accepted``; num_accepted [S] int32).
    """
    s, k = draft_token_ids.shape
    accept_key, draw_key = jax.random.split(key)
    p_x = jnp.take_along_axis(target_probs[:, :k], draft_token_ids[..., None], axis=-1)[..., 0]
    q_x = jnp.take_along_axis(draft_probs, draft_token_ids[..., None], axis=-1)[..., 0]
    u = jax.random.uniform(accept_key, (s, k))
    accepted = jnp.sum(jnp.cumprod((u * q_x < p_x).astype(jnp.int32), axis=1), axis=1)  # [S]
    residual = jnp.maximum(target_probs[:, :k] - draft_probs, 0.0)                       # [S, K, V]
    residual = jnp.concatenate([residual, target_probs[:, k:]], axis=1)                  # [S, J, V]
    chosen = jnp.take_along_axis(residual, accepted[:, None, None], axis=1)[:, 0]         # [S, V]
    # An all-zero residual (p == q) never follows a rejection; log(0) rows are never drawn.
    final = jax.random.categorical(draw_key, jnp.log(chosen), axis=-1).astype(jnp.int32)
    token_ids = jnp.concatenate([draft_token_ids, jnp.zeros((s, 1), jnp.int32)], axis=1)
    return token_ids.at[jnp.arange(s), accepted].set(final), accepted.astype(jnp.int32)
