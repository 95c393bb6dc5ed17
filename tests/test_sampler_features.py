"""The sampler's optional parts against NumPy / transformers references: min-p, penalties from
device token counts, sparse token lists, top logprobs (beam candidates under min_tokens),
prompt logprobs, registered strategies and host logits processors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.penalties import apply_penalties, count_samples, row_counts, seed_slot
from jaxllm.sampler import Sampler, truncation_mask
from jaxllm.step_inputs import SamplingTensors
from jaxllm.strategies import SamplingStrategy, register_strategy, registered_strategies
from jaxllm.strategy_examples import register_examples
from jaxllm.token_lists import apply_token_lists

ROWS, VOCAB = 32, 48
NUM_DRAWS = 24_000
truncation_mask_jit = jax.jit(truncation_mask)


def np_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def reference_mask(logits: np.ndarray, top_k: int, top_p: float, min_p: float) -> np.ndarray:
    """min-p and top-k on the sorted logits, then top-p over the survivors' renormalised softmax."""
    desc = np.sort(logits.astype(np.float64))[::-1]
    k = min(top_k, len(desc)) if top_k > 0 else len(desc)
    kept = desc[:k]
    if min_p > 0:
        kept = kept[kept >= kept[0] + np.log(min_p)]
    probs = np.exp(kept - kept[0])
    probs /= probs.sum()
    mass_before = np.cumsum(probs) - probs
    num_kept = len(kept) if top_p >= 1 else int(np.sum(mass_before < top_p))
    return logits >= kept[num_kept - 1]


def test_truncation_mask_with_min_p_matches_numpy_reference():
    rng = np.random.default_rng(3)
    num_rows, vocab = 256, 24
    logits = (rng.normal(size=(num_rows, vocab)) * rng.uniform(0.3, 4, size=(num_rows, 1))).astype(np.float32)
    logits[::3] = np.round(logits[::3] * 2) / 2                          # exact ties
    top_k = rng.choice([0, 0, 3, 10], size=num_rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.9, 0.5], size=num_rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.05, 0.2, 0.6, 1.0], size=num_rows).astype(np.float32)
    mask = np.asarray(truncation_mask_jit(jnp.asarray(logits), jnp.asarray(top_k),
                                          jnp.asarray(top_p), jnp.asarray(min_p)))
    num_checked = 0
    for row in range(num_rows):
        expected = reference_mask(logits[row], top_k[row], top_p[row], min_p[row])
        # Skip rows whose min-p or top-p boundary sits within float32 rounding of a token.
        desc = np.sort(logits[row].astype(np.float64))[::-1]
        gaps = np.abs(desc - desc[0] - np.log(min_p[row])) if min_p[row] > 0 else np.ones(1)
        if np.any((gaps > 0) & (gaps < 1e-5)):
            continue
        if top_p[row] < 1:
            probs = np.exp(np.where(expected, logits[row], -np.inf) - logits[row].max())
            boundaries = np.cumsum(np.sort(probs / probs.sum())[::-1])
            if np.min(np.abs(boundaries - top_p[row])) < 1e-5:
                continue
        num_checked += 1
        np.testing.assert_array_equal(mask[row], expected, err_msg=f"row {row}")
    assert num_checked >= 0.9 * num_rows


def test_min_p_one_keeps_only_the_ties_of_the_top_token():
    logits = jnp.array([[1.0, 3.0, 3.0, 2.9]])
    mask = truncation_mask_jit(logits, jnp.array([0]), jnp.array([1.0]), jnp.array([1.0]))
    assert mask.tolist() == [[False, True, True, False]]


DISTRIBUTION_LOGITS = np.array([2.0, 1.5, 1.0, 0.4, 0.0, -0.7, -1.5], np.float32)


@pytest.mark.parametrize("temperature, top_k, top_p, min_p", [
    (1.0, 0, 1.0, 0.1),
    (0.7, 0, 1.0, 0.3),
    (1.3, 5, 0.9, 0.05),
    (1.0, 4, 1.0, 0.2),
])
def test_distribution_after_min_p_truncation_matches_softmax(temperature, top_k, top_p, min_p):
    import scipy.stats as scipy_stats
    params = SamplingTensors.build(NUM_DRAWS, temperature=temperature, top_k=top_k, top_p=top_p,
                                   min_p=min_p, seeds=77, output_index=np.arange(NUM_DRAWS))
    rows = jnp.broadcast_to(jnp.asarray(DISTRIBUTION_LOGITS), (NUM_DRAWS, len(DISTRIBUTION_LOGITS)))
    tokens = np.asarray(jax.jit(Sampler())(rows, params).token_ids)
    scaled = DISTRIBUTION_LOGITS.astype(np.float64) / temperature
    keep = reference_mask(scaled, top_k, top_p, min_p)
    expected = np.where(keep, np.exp(scaled - scaled.max()), 0)
    expected /= expected.sum()
    counts = np.bincount(tokens, minlength=len(expected))
    assert counts[~keep].sum() == 0
    assert keep.sum() >= 2
    result = scipy_stats.chisquare(counts[keep], expected[keep] * NUM_DRAWS)
    assert result.pvalue > 1e-3, f"counts {counts} expected {expected * NUM_DRAWS}"


def reference_penalties(logits, prompt, output, repetition, frequency, presence):
    """vLLM's definitions, one row at a time, in plain NumPy."""
    out = logits.astype(np.float64).copy()
    for token in set(prompt) | set(output):
        out[token] = out[token] / repetition if out[token] > 0 else out[token] * repetition
    for token in set(output):
        out[token] -= frequency * output.count(token) + presence
    return out


def seeded_counts(histories, prompt_lens, vocab: int, num_slots: int) -> jax.Array:
    """Token counts with slot r seeded from histories[r] (prompt then output ids)."""
    counts = jnp.zeros((num_slots, vocab), jnp.int32)
    for slot, (tokens, num_prompt) in enumerate(zip(histories, prompt_lens)):
        padded = np.full(64, -1, np.int32)
        padded[:len(tokens)] = tokens
        counts = seed_slot(counts, np.int32(slot), padded, np.int32(num_prompt))
    return counts


def test_penalties_match_numpy_reference():
    rng = np.random.default_rng(4)
    logits = (rng.normal(size=(ROWS, VOCAB)) * 2).astype(np.float32)
    prompt_lens = rng.integers(1, 20, size=ROWS)
    rows, histories = [], []
    for r in range(ROWS):
        total = int(rng.integers(prompt_lens[r], 41))
        tokens = rng.integers(0, 12, size=total).tolist()                  # many repeats
        histories.append(tokens)
        rows.append((tokens[:prompt_lens[r]], tokens[prompt_lens[r]:]))
    counts = seeded_counts(histories, prompt_lens, VOCAB, ROWS + 3)
    slots = rng.permutation(ROWS + 3)[:ROWS].astype(np.int32)            # rows sit in any slot
    counts = counts[np.argsort(np.concatenate([slots, np.setdiff1d(np.arange(ROWS + 3), slots)]))]
    repetition = rng.choice([1.0, 1.3, 0.8], size=ROWS).astype(np.float32)
    frequency = rng.uniform(-2, 2, size=ROWS).astype(np.float32)
    presence = rng.uniform(-2, 2, size=ROWS).astype(np.float32)

    @jax.jit
    def penalise(logits, counts, slots):
        output_counts, seen = row_counts(counts, slots)
        return apply_penalties(logits, output_counts, seen, repetition, frequency, presence)

    got = np.asarray(penalise(jnp.asarray(logits), counts, slots))
    for r, (prompt, output) in enumerate(rows):
        expected = reference_penalties(logits[r], prompt, output, repetition[r], frequency[r], presence[r])
        np.testing.assert_allclose(got[r], expected, rtol=1e-6, atol=1e-5, err_msg=f"row {r}")


def test_counted_samples_equal_a_seeding_with_those_tokens():
    """Step by step, count_samples keeps the counts a seeding from the whole history gives;
    rows that do not sample or have no slot change nothing."""
    rng = np.random.default_rng(9)
    slots = np.array([2, -1, 0, 3], np.int32)
    samples = np.array([True, True, False, True])
    histories = [rng.integers(0, VOCAB, 5).tolist() for _ in range(4)]
    by_slot = {int(slot): histories[r] for r, slot in enumerate(slots) if slot >= 0}
    counts = seeded_counts([by_slot.get(i, []) for i in range(6)], [5] * 6, VOCAB, 6)
    for _ in range(6):
        tokens = rng.integers(0, VOCAB, 4).astype(np.int32)
        counts = jax.jit(count_samples)(counts, slots, tokens, samples)
        for r in np.flatnonzero(samples & (slots >= 0)):
            histories[r].append(int(tokens[r]))
    for r in (0, 2, 3):
        np.testing.assert_array_equal(counts[slots[r]], seeded_counts([histories[r]], [5], VOCAB, 1)[0])
    assert len(histories[2]) == 5 and not np.asarray(counts)[[1, 4, 5]].any()


def sparse(rows: list[list], width: int, pad, dtype) -> np.ndarray:
    out = np.full((len(rows), width), pad, dtype)
    for r, values in enumerate(rows):
        out[r, :len(values)] = values
    return out


def test_token_lists_equal_a_dense_bias_row():
    """allowed_token_ids, logit_bias and min_tokens' ban from sparse rows give what adding
    vLLM's dense [S, V] bias row (0 or -inf, plus the biases, -inf for banned ids) gives."""
    rng = np.random.default_rng(10)
    logits = rng.normal(size=(6, VOCAB)).astype(np.float32)
    allowed = [[], [3, 9, 11], [], [4, 5], [], []]
    bias = [{}, {9: 2.0, 30: 5.0}, {7: -1.5, 8: 100.0}, {}, {}, {2: 0.5}]
    stops = [[1, 2], [], [8], [4], [5], []]
    output_index, min_tokens = np.array([0, 0, 1, 3, 2, 0]), np.array([2, 0, 3, 3, 5, 0])
    dense = np.zeros((6, VOCAB), np.float32)
    for r in range(6):
        if allowed[r]:
            dense[r] = -np.inf
            dense[r, allowed[r]] = 0
        dense[r, list(bias[r])] += list(bias[r].values())
        if output_index[r] < min_tokens[r]:
            dense[r, stops[r]] = -np.inf
    got = jax.jit(apply_token_lists)(
        logits, sparse(allowed, 4, -1, np.int32), sparse([list(b) for b in bias], 3, -1, np.int32),
        sparse([list(b.values()) for b in bias], 3, 0, np.float32), sparse(stops, 2, -1, np.int32),
        output_index.astype(np.int32), min_tokens.astype(np.int32))
    np.testing.assert_array_equal(np.asarray(got), logits + dense)


def test_greedy_rows_see_token_lists_and_penalties():
    logits = np.zeros((4, VOCAB), np.float32)
    logits[:, 5] = 1.0
    counts = seeded_counts([[], [], [], [5, 5]], [0, 0, 0, 0], VOCAB, 4)  # row 3: token 5 output twice
    params = SamplingTensors.build(
        4, frequency_penalty=[0, 0, 0, 1.0], penalty_slots=[-1, -1, -1, 3],
        bias_ids=sparse([[], [7], [11], []], 1, -1, np.int32),            # row 1 lifts 7 above 5
        bias_values=sparse([[], [2.0], [0.5], []], 1, 0, np.float32),
        allowed_ids=sparse([[], [], [9, 11], []], 2, -1, np.int32))       # row 2: {9, 11}, 11 biased
    tokens = np.asarray(jax.jit(Sampler())(jnp.asarray(logits), params, counts).token_ids)
    assert tokens[0] == 5 and tokens[1] == 7 and tokens[2] == 11 and tokens[3] != 5


def test_beam_rows_candidates_obey_min_tokens_and_other_rows_report_raw_alternatives():
    logits = np.tile(np.linspace(0, 3, VOCAB, dtype=np.float32), (3, 1))   # token V-1 ranks first
    stop = VOCAB - 1
    params = SamplingTensors.build(3, num_logprobs=4, beam=[True, False, True], min_tokens=[2, 2, 2],
                                   output_index=[0, 0, 2], min_tokens_stop_ids=[[stop], [stop], [stop]])
    out = jax.jit(Sampler(max_logprobs=4))(jnp.asarray(logits), params)
    top = np.asarray(out.top_token_ids)
    assert stop not in top[0] and top[0, 0] == stop - 1       # a beam before min_tokens
    assert top[1, 0] == stop and top[2, 0] == stop            # raw alternatives; min_tokens reached
    raw = np_log_softmax(logits)[0]
    np.testing.assert_allclose(np.asarray(out.top_logprobs)[0], raw[[stop - 1, stop - 2, stop - 3, stop - 4]],
                               atol=1e-5)                     # not renormalised, as transformers


def test_top_logprobs_and_ranks_match_log_softmax():
    rng = np.random.default_rng(5)
    logits = (rng.normal(size=(ROWS, VOCAB)) * 3).astype(np.float32)
    num_logprobs = rng.choice([-1, 0, 3, 5], size=ROWS)
    params = SamplingTensors.build(ROWS, temperature=rng.choice([0.0, 1.0], size=ROWS),
                                   seeds=np.arange(ROWS), num_logprobs=num_logprobs)
    out = jax.jit(Sampler(max_logprobs=5))(jnp.asarray(logits), params)
    expected = np_log_softmax(logits)
    order = np.argsort(-expected, axis=-1)
    np.testing.assert_array_equal(out.top_token_ids, order[:, :5])
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(expected, order[:, :5], -1), atol=1e-5)
    chosen = np.asarray(out.token_ids)
    ranks = (expected > expected[np.arange(ROWS), chosen][:, None]).sum(-1) + 1
    np.testing.assert_array_equal(out.ranks, ranks)


def test_prompt_logprobs_score_the_next_prompt_token():
    rng = np.random.default_rng(6)
    all_logits = rng.normal(size=(10, VOCAB)).astype(np.float32)
    next_ids = np.array([3, 4, -1, 7, 0, 1, -1, -1, 2, 9], np.int32)
    out = jax.jit(Sampler(max_logprobs=4).score_prompt)(jnp.asarray(all_logits), next_ids)
    expected = np_log_softmax(all_logits)
    valid = next_ids >= 0
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid],
                               expected[np.arange(10), next_ids][valid], atol=1e-5)
    np.testing.assert_array_equal(out.top_token_ids, np.argsort(-expected, -1)[:, :4])


@pytest.mark.parametrize("name, warper, arg", [
    ("typical", "TypicalLogitsWarper", {"mass": 0.7}),
    ("epsilon", "EpsilonLogitsWarper", {"epsilon": 0.02}),
    ("eta", "EtaLogitsWarper", {"epsilon": 0.02}),
])
def test_example_strategies_match_transformers_warpers(name, warper, arg):
    import torch
    import transformers.generation.logits_process as lp

    register_examples()
    strategy = {s.name: s for s in registered_strategies()}[name]
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=(ROWS, VOCAB)) * 2).astype(np.float32)
    args = {k: jnp.full(ROWS, v, jnp.float32) for k, v in arg.items()}
    got = np.isfinite(np.asarray(jax.jit(strategy.fn)(jnp.asarray(logits), args)))
    hf_arg = arg.get("mass", arg.get("epsilon"))
    hf = getattr(lp, warper)(hf_arg, **({"device": "cpu"} if name == "eta" else {}))
    expected = np.isfinite(hf(None, torch.from_numpy(logits)).numpy())
    np.testing.assert_array_equal(got, expected)


def test_strategy_runs_only_on_its_rows_beside_builtins():
    def only_token_three(logits, args):
        keep = jnp.arange(logits.shape[-1])[None, :] == args["token"][:, None].astype(jnp.int32)
        return jnp.where(keep, logits, -jnp.inf)

    strategy = SamplingStrategy("only", only_token_three, (("token", 3.0),))
    params = SamplingTensors.build(ROWS, temperature=1.0, seeds=np.arange(ROWS),
                                   strategy_ids=np.arange(ROWS) % 2,
                                   strategy_args=np.full((ROWS, 1), 3.0))
    logits = jnp.zeros((ROWS, VOCAB))
    tokens = np.asarray(jax.jit(Sampler((strategy,)))(logits, params).token_ids)
    assert (tokens[1::2] == 3).all()
    assert len(set(tokens[0::2].tolist())) > 4          # the plain rows still sample uniformly


def test_host_logits_processor_changes_only_flagged_rows():
    def hook(logits, use):
        logits = np.array(logits)
        logits[use, :] = -1e9
        logits[use, 13] = 0.0
        return logits

    params = SamplingTensors.build(4, use_processors=[False, True, False, True])
    logits = jnp.asarray(np.random.default_rng(8).normal(size=(4, VOCAB)), jnp.float32)
    sampler = Sampler(host_logits_processor=hook)
    tokens = np.asarray(jax.jit(lambda x, p: sampler(x, p, host_processors=True))(logits, params).token_ids)
    assert tokens[1] == 13 and tokens[3] == 13
    np.testing.assert_array_equal(tokens[[0, 2]], np.argmax(np.asarray(logits), -1)[[0, 2]])


def test_register_strategy_validates_name_and_defaults():
    with pytest.raises(ValueError, match="name"):
        register_strategy("")
    with pytest.raises(ValueError, match="default"):
        register_strategy("bad", x="high")
    register_examples()
    strategy = {s.name: s for s in registered_strategies()}["typical"]
    with pytest.raises(ValueError, match="unknown argument 'nope'"):
        strategy.validate_args({"nope": 1.0})
    with pytest.raises(ValueError, match="finite"):
        strategy.validate_args({"mass": float("nan")})
    assert strategy.arg_values({"mass": 0.5}) == [0.5]
    assert strategy.arg_values(None) == [0.9]
