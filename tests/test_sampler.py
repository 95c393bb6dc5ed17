"""The sampler: greedy, temperature, top-k, top-p, per-row seeds, logprobs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.sampler import Sampler, first_argmax, truncation_mask
from jaxllm.step_inputs import SamplingTensors

# Compiling the sampler costs seconds on CPU, so the tests share few shapes: [ROWS, VOCAB] for
# small batches and [NUM_DRAWS, 7] for distributions.
_sample_jit = jax.jit(Sampler())
truncation_mask_jit = jax.jit(truncation_mask)
ROWS, VOCAB = 32, 48
NUM_DRAWS = 24_000


def sample_jit(logits, params: SamplingTensors):
    """(token_ids, logprobs) of the default sampler."""
    out = _sample_jit(logits, params)
    return out.token_ids, out.logprobs


def tensors(num_rows: int, temperature=1.0, top_k=0, top_p=1.0, seeds=0, output_index=0, **more) -> SamplingTensors:
    return SamplingTensors.build(num_rows, temperature=temperature, top_k=top_k, top_p=top_p,
                                 seeds=seeds, output_index=output_index, **more)


def reference_mask(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """Top-k, then top-p over the top-k-renormalised softmax; ties with the last kept logit stay."""
    vocab = logits.shape[-1]
    desc = np.sort(logits.astype(np.float64))[::-1]
    k = min(top_k, vocab) if top_k > 0 else vocab
    top = desc[:k]
    probs = np.exp(top - top[0])
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    num_kept = int(np.sum(mass_before < top_p))      # mass_before increases: a prefix is kept
    return logits >= top[num_kept - 1]


def reference_probs(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    scaled = logits.astype(np.float64) / temperature
    keep = reference_mask(scaled, top_k, top_p)
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    return probs / probs.sum()


def test_sample_temperature_zero_is_argmax():
    logits = jnp.asarray(np.random.default_rng(0).normal(size=(ROWS, VOCAB)) * 3, jnp.float32)
    params = tensors(ROWS, temperature=0.0, top_k=3, top_p=0.5, seeds=np.arange(ROWS), output_index=7)
    tokens, _ = sample_jit(logits, params)
    np.testing.assert_array_equal(tokens, np.argmax(logits, axis=-1))
    assert tokens.dtype == jnp.int32


def test_first_argmax_equals_argmax_with_ties_and_masked_tokens():
    rng = np.random.default_rng(3)
    logits = rng.integers(-3, 3, size=(ROWS, VOCAB)).astype(np.float32)   # many ties
    logits[rng.random((ROWS, VOCAB)) < 0.3] = -np.inf
    logits[0] = -np.inf                                                   # every token masked
    logits[1, [5, 40]] = 9.0                                              # tie between two tokens
    got = jax.jit(first_argmax)(jnp.asarray(logits))
    np.testing.assert_array_equal(got, np.argmax(logits, axis=-1))
    assert got[0] == 0 and got[1] == 5 and got.dtype == jnp.int32


def test_sample_greedy_rows_stay_argmax_beside_sampled_rows():
    logits = jnp.asarray(np.random.default_rng(1).normal(size=(ROWS, VOCAB)) * 0.1, jnp.float32)  # flat
    temperature = np.tile(np.array([0, 1, 0, 2], np.float32), ROWS // 4)
    tokens, _ = sample_jit(logits, tensors(ROWS, temperature=temperature, seeds=np.arange(ROWS)))
    greedy = temperature == 0
    np.testing.assert_array_equal(np.asarray(tokens)[greedy], np.argmax(logits, -1)[greedy])
    assert np.any(np.asarray(tokens)[~greedy] != np.argmax(logits, -1)[~greedy])


def test_truncation_mask_hand_computed_top_k_with_ties():
    logits = jnp.array([[1.0, 3.0, 2.0, 2.0, 0.0]] * 3)
    mask = truncation_mask_jit(logits, jnp.array([1, 2, 0]), jnp.array([1.0, 1.0, 1.0]))
    np.testing.assert_array_equal(mask, [[False, True, False, False, False],
                                         [False, True, True, True, False],   # tie with 2.0 kept
                                         [True, True, True, True, True]])


def test_truncation_mask_hand_computed_top_p():
    # probs ~ [0.643, 0.236, 0.087, 0.032, 0.002]; mass before each: 0, .643, .879, .966, .998
    logits = jnp.log(jnp.array([[0.643, 0.236, 0.087, 0.032, 0.002]] * 4))
    mask = truncation_mask_jit(logits, jnp.zeros(4, jnp.int32), jnp.array([0.1, 0.643 + 1e-3, 0.9, 0.99]))
    np.testing.assert_array_equal(mask, [[True, False, False, False, False],
                                         [True, True, False, False, False],
                                         [True, True, True, False, False],
                                         [True, True, True, True, False]])


def test_truncation_mask_top_p_is_over_the_top_k_renormalised_distribution():
    # Top-2 of [0.5, 0.3, 0.2] renormalises to [0.625, 0.375]: top_p 0.6 keeps one token,
    # while over the full distribution 0.6 would have kept two.
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
    mask = truncation_mask_jit(jnp.concatenate([logits, logits]), jnp.array([2, 0]), jnp.array([0.6, 0.6]))
    assert mask.tolist() == [[True, False, False], [True, True, False]]


def test_truncation_mask_top_p_one_keeps_every_token():
    """top_p == 1 disables top-p, even for tokens whose probability rounds away in float32."""
    logits = jnp.array([[0.0, -20.0, -20.0, -20.0], [5.0, -30.0, 0.0, -25.0]])
    mask = truncation_mask_jit(logits, jnp.array([0, 3], jnp.int32), jnp.array([1.0, 1.0]))
    np.testing.assert_array_equal(mask, [[True, True, True, True], [True, False, True, True]])


def test_truncation_mask_matches_numpy_reference():
    rng = np.random.default_rng(0)
    num_rows, vocab = 256, 24
    logits = rng.normal(size=(num_rows, vocab)) * rng.uniform(0.3, 4, size=(num_rows, 1))
    logits[::3] = np.round(logits[::3] * 2) / 2                         # many exact ties
    logits = logits.astype(np.float32)
    top_k = rng.integers(0, vocab + 4, size=num_rows).astype(np.int32)
    top_k[::5] = 0
    top_p = rng.uniform(0.02, 1.0, size=num_rows).astype(np.float32)
    top_p[::7] = 1.0
    mask = np.asarray(truncation_mask_jit(jnp.asarray(logits), jnp.asarray(top_k), jnp.asarray(top_p)))
    num_checked = 0
    for row in range(num_rows):
        # Skip rows where top_p sits within float32 rounding of a cumulative mass boundary.
        desc = np.sort(logits[row].astype(np.float64))[::-1]
        k = min(top_k[row], vocab) if top_k[row] > 0 else vocab
        probs = np.exp(desc[:k] - desc[0])
        probs /= probs.sum()
        boundaries = np.cumsum(probs) - probs
        if top_p[row] < 1 and np.min(np.abs(boundaries - top_p[row])) < 1e-5:
            continue
        num_checked += 1
        np.testing.assert_array_equal(mask[row], reference_mask(logits[row], top_k[row], top_p[row]),
                                      err_msg=f"row {row}: k={top_k[row]} p={top_p[row]}")
    assert num_checked >= 0.95 * num_rows


def draw(logits: np.ndarray, temperature, top_k, top_p, seed: int) -> np.ndarray:
    """NUM_DRAWS samples, row r with its own settings; output_index r makes the draws independent."""
    params = tensors(NUM_DRAWS, temperature, top_k, top_p, seeds=seed, output_index=np.arange(NUM_DRAWS))
    rows = jnp.broadcast_to(jnp.asarray(logits), (NUM_DRAWS, logits.shape[-1]))
    return np.asarray(sample_jit(rows, params)[0])


DISTRIBUTION_LOGITS = np.array([2.0, 1.5, 1.0, 0.4, 0.0, -0.7, -1.5], np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0),
    (0.6, 0, 1.0),
    (1.7, 0, 1.0),
    (1.0, 3, 1.0),
    (1.0, 0, 0.8),
    (1.4, 5, 0.85),
])
def test_sample_distribution_matches_expected_probabilities(temperature, top_k, top_p):
    import scipy.stats as scipy_stats
    num_draws = NUM_DRAWS
    tokens = draw(DISTRIBUTION_LOGITS, temperature, top_k, top_p, seed=1234)
    expected = reference_probs(DISTRIBUTION_LOGITS, temperature, top_k, top_p)
    counts = np.bincount(tokens, minlength=len(expected))
    support = expected > 0
    assert counts[~support].sum() == 0, f"sampled truncated tokens: {counts} vs {expected}"
    assert support.sum() >= 2
    result = scipy_stats.chisquare(counts[support], expected[support] * num_draws)
    assert result.pvalue > 1e-3, f"counts {counts} expected {expected * num_draws}"


def test_sample_same_seed_and_index_gives_same_token_in_any_row_and_batch():
    rng = np.random.default_rng(1)
    num_target = 12
    logits = rng.normal(size=(num_target, VOCAB)).astype(np.float32)
    seeds = rng.integers(0, 2**32, size=num_target, dtype=np.uint32)
    seeds[0] = 2**32 - 1
    index = rng.integers(0, 1000, size=num_target).astype(np.int32)

    def batch(positions, others_vary):
        """The target rows at ``positions``; other rows plain, or greedy / truncated / hot."""
        b_logits = rng.normal(size=(ROWS, VOCAB)).astype(np.float32)
        temperature = np.full(ROWS, 0.9, np.float32)
        top_k, top_p = np.zeros(ROWS, np.int32), np.ones(ROWS, np.float32)
        if others_vary:
            temperature = rng.choice([0.0, 0.5, 2.0], size=ROWS).astype(np.float32)
            top_k = rng.choice([0, 1, 5], size=ROWS).astype(np.int32)
            top_p = rng.choice([1.0, 0.3], size=ROWS).astype(np.float32)
            top_k[0 if 0 not in positions else max(set(range(ROWS)) - set(positions))] = 5
        b_seeds = rng.integers(0, 2**32, size=ROWS, dtype=np.uint32)
        b_index = rng.integers(0, 1000, size=ROWS).astype(np.int32)
        b_logits[positions], temperature[positions], top_k[positions], top_p[positions] = logits, 0.9, 0, 1.0
        b_seeds[positions], b_index[positions] = seeds, index
        params = tensors(ROWS, temperature, top_k, top_p, seeds=b_seeds, output_index=b_index)
        tokens, logprobs = sample_jit(jnp.asarray(b_logits), params)
        return np.asarray(tokens)[positions], np.asarray(logprobs)[positions]

    first = np.arange(num_target)
    shuffled = rng.permutation(ROWS)[:num_target]
    alone, alone_lp = batch(first, others_vary=False)     # no row truncates: the cheap branch
    mixed, mixed_lp = batch(shuffled, others_vary=True)   # some row truncates: the mask branch
    np.testing.assert_array_equal(mixed, alone)
    np.testing.assert_array_equal(mixed_lp, alone_lp)
    again, _ = batch(first, others_vary=False)
    np.testing.assert_array_equal(again, alone)


def test_sample_seed_and_output_index_both_change_the_draw():
    logits = jnp.zeros((ROWS, VOCAB))                                   # uniform
    by_seed, _ = sample_jit(logits, tensors(ROWS, seeds=np.arange(ROWS), output_index=3))
    by_index, _ = sample_jit(logits, tensors(ROWS, seeds=7, output_index=np.arange(ROWS)))
    # 32 uniform draws over 48 tokens: ~23 distinct expected; all equal would mean the seed
    # or the index is ignored.
    assert len(set(np.asarray(by_seed).tolist())) > 12
    assert len(set(np.asarray(by_index).tolist())) > 12


def test_sample_rows_follow_their_own_settings_in_one_call():
    logits = np.array([3.0, 2.5, 2.0, 1.0, 0.5, 0.0, -0.5], np.float32)
    settings = [  # (temperature, top_k, top_p, allowed tokens)
        (0.0, 0, 1.0, {0}),
        (1.0, 1, 1.0, {0}),
        (1.0, 2, 1.0, {0, 1}),
        (1.0, 0, 0.5, {0, 1}),           # probs .44 .27 .16 ...: mass before token 2 is .71
        (5.0, 0, 1.0, set(range(7))),
        (2.0, 4, 0.99, {0, 1, 2, 3}),
    ]
    draws = NUM_DRAWS // len(settings)
    col = lambda i: np.repeat([s[i] for s in settings], draws)           # noqa: E731
    tokens = draw(logits, col(0), col(1), col(2), seed=99).reshape(len(settings), draws)
    for (temperature, top_k, top_p, allowed), row_tokens in zip(settings, tokens):
        seen = set(row_tokens.tolist())
        assert seen == allowed, f"T={temperature} k={top_k} p={top_p}: saw {sorted(seen)}"


def test_sample_logprobs_are_log_softmax_of_raw_logits_at_the_chosen_token():
    rng = np.random.default_rng(2)
    logits = (rng.normal(size=(ROWS, VOCAB)) * 3).astype(np.float32)
    params = tensors(ROWS, temperature=rng.choice([0.0, 0.5, 1.0, 3.0], size=ROWS),
                     top_k=rng.choice([0, 3], size=ROWS), top_p=rng.choice([1.0, 0.7], size=ROWS),
                     seeds=np.arange(ROWS), output_index=5)
    tokens, logprobs = sample_jit(jnp.asarray(logits), params)
    logits64 = logits.astype(np.float64)
    log_softmax = logits64 - logits64.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    expected = log_softmax[np.arange(ROWS), np.asarray(tokens)]
    np.testing.assert_allclose(logprobs, expected, atol=1e-5, rtol=0)
    assert logprobs.dtype == jnp.float32
