"""The speculative-decoding verifier (``jaxllm.rejection_sampler``) and proposer, without an engine."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxllm import rejection_sampler
from jaxllm.sampler import Sampler
from jaxllm.sampling_params import SamplingParams
from jaxllm.speculative import SpeculativeConfig, SpecState, ngram_proposal
from jaxllm.step_inputs import SamplingTensors

P_MIN = 1e-3   # chi-square p-value below which a distribution is declared different (fixed keys)


def test_ngram_proposal_takes_the_latest_longest_match():
    tokens = np.array([1, 2, 3, 9, 9, 1, 2, 3, 4, 5, 7, 2, 3])
    # suffix 2-gram [2, 3]: latest earlier occurrence at index 6 -> followed by 4, 5, 7
    assert ngram_proposal(tokens, 2, 4, 3).tolist() == [4, 5, 7]
    assert ngram_proposal(tokens, 2, 4, 1).tolist() == [4]
    # [7, 2, 3] never occurred before; with min 3 nothing matches
    assert ngram_proposal(tokens, 3, 4, 3).tolist() == []
    # a match right before the suffix proposes what follows, up to the end
    assert ngram_proposal(np.array([5, 6, 5, 6, 5, 6]), 2, 2, 4).tolist() == [5, 6]
    assert ngram_proposal(np.array([1, 2]), 2, 4, 3).tolist() == []


@pytest.mark.parametrize("config, message", [
    ({"method": "eagle", "num_speculative_tokens": 3}, "must be one of .*, got 'eagle'"),
    ({"method": "ngram"}, "needs 'num_speculative_tokens'"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 3.0}, "positive integer"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "at most 16"),
    ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 5}, "exceeds prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}, "unknown key"),
    ({"method": "ngram", "model": "some/draft", "num_speculative_tokens": 3}, r"\['model'\] goes with"),
    ({"method": "layer_skip", "num_speculative_tokens": 3}, r"\['num_layers'\] goes with"),
    ({"method": "layer_skip", "num_layers": 0, "num_speculative_tokens": 3}, "positive integer"),
    ("ngram", "must be a dict"),
])
def test_speculative_config_refuses_bad_input(config, message):
    from jaxllm.config import EngineConfig

    with pytest.raises(ValueError, match=message):
        EngineConfig(speculative_config=config)


def test_spec_state_backs_off_when_acceptance_stays_low_and_tries_again():
    state = SpecState()
    for _ in range(16):
        state.record(3, 0)
    assert state.backoff_steps == 32 and state.num_draft_tokens == 48
    fresh = SpecState()
    for _ in range(16):
        fresh.record(3, 2)
    assert fresh.backoff_steps == 0 and fresh.num_accepted_tokens == 32


def test_num_accepted_counts_leading_matches_only():
    drafts = jnp.array([[4, 5, 6], [4, 5, 6], [4, -1, -1], [-1, -1, -1]])
    target = jnp.array([[4, 5, 6, 1], [4, 0, 6, 1], [4, 7, 0, 0], [4, 5, 6, 1]])
    assert rejection_sampler.num_accepted(drafts, target).tolist() == [3, 1, 1, 0]


def _chi_square(draws: np.ndarray, probs: np.ndarray) -> float:
    counts = np.bincount(draws, minlength=len(probs))
    probs = np.asarray(probs, np.float64)
    keep = probs > 0
    assert counts[~keep].sum() == 0, "drew a token the target excludes"
    return stats.chisquare(counts[keep], probs[keep] / probs[keep].sum() * counts.sum()).pvalue


@jax.jit
def _verify_rows(logits: jax.Array, sampling: SamplingTensors, drafts: jax.Array
                 ) -> rejection_sampler.Verified:
    """``verify`` of rows [S] that all score the same 3 positions ``logits`` [3, V]."""
    return rejection_sampler.verify(Sampler(), lambda x: x, logits, jnp.full(drafts.shape[0], 2),
                                    drafts, sampling, jnp.zeros((1, logits.shape[1]), jnp.int32))


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
def test_point_mass_verification_draws_each_position_from_the_target(proposer):
    """Many seeded rows verify two proposals each: the same ones for every row (n-gram), or
    each row's own, drawn from a draft distribution q (a draft model's greedy tokens are a
    point mass per row). The first emitted token follows the target p_0 whatever the
    proposals; after an accepted first proposal, the next follows p_1; with top_k the target
    is the truncated distribution."""
    vocab, num_rows = 6, 20000
    logits = jnp.array([[2.0, 1.0, 0.5, 0.0, -1.0, 0.3],
                        [0.0, 1.5, 1.5, -0.5, 0.2, 1.0],
                        [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
    q = np.array([0.1, 0.4, 0.3, 0.1, 0.05, 0.05])
    if proposer == "ngram":
        drafts = np.tile(np.array([[1, 2]], np.int32), (num_rows, 1))
    else:
        drafts = np.random.default_rng(0).choice(vocab, (num_rows, 2), p=q).astype(np.int32)
    for top_k in (0, 4):
        sampling = SamplingTensors.build(num_rows, temperature=1.0, top_k=top_k,
                                         seeds=np.arange(num_rows), samples=True)
        verified = _verify_rows(logits, sampling, jnp.asarray(drafts))
        tokens, accepted = np.asarray(verified.token_ids), np.asarray(verified.num_accepted)
        target = np.asarray(jax.nn.softmax(logits, axis=-1))
        if top_k:
            target = np.where(np.argsort(np.argsort(-target, axis=-1), axis=-1) < top_k, target, 0)
        assert _chi_square(tokens[:, 0], target[0]) > P_MIN
        assert _chi_square(tokens[accepted >= 1, 1], target[1]) > P_MIN
        p_first = target[0] / target[0].sum()
        expected = p_first[1] if proposer == "ngram" else (q * p_first).sum()
        np.testing.assert_allclose(np.mean(accepted >= 1), expected, atol=0.01)
        # emitted tokens: proposals while accepted
        assert np.all(tokens[accepted >= 1, 0] == drafts[accepted >= 1, 0])


def test_rejection_sample_with_a_draft_distribution_keeps_the_target_distribution():
    """The general rule (draft models): proposals drawn from q, every emitted position ~ p."""
    rng = np.random.default_rng(0)
    num_rows, k, vocab = 40000, 2, 5
    p = rng.dirichlet(np.ones(vocab), size=k + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(vocab), size=k).astype(np.float32)
    drafts = np.stack([rng.choice(vocab, num_rows, p=q[j] / q[j].sum()) for j in range(k)], 1)
    tokens, accepted = jax.jit(rejection_sampler.rejection_sample)(
        jnp.broadcast_to(p, (num_rows, k + 1, vocab)), jnp.broadcast_to(q, (num_rows, k, vocab)),
        jnp.asarray(drafts, jnp.int32), jax.random.key(0))
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    assert _chi_square(tokens[:, 0], p[0]) > P_MIN
    assert _chi_square(tokens[accepted >= 1, 1], p[1]) > P_MIN
    assert _chi_square(tokens[accepted == 2, 2], p[2]) > P_MIN
    np.testing.assert_allclose(np.mean(accepted >= 1), np.minimum(p[0], q[0]).sum(), atol=0.01)


def _decoding(scheduler, prompts):
    """Admits ``prompts`` and runs their prefill, so each is a decode with its tokens known."""
    from jaxllm.groups import new_sequence
    from jaxllm.sequence import Request

    seqs = []
    for i, prompt in enumerate(prompts):
        request = Request(f"r{i}", None, tuple(prompt), SamplingParams(temperature=0, max_tokens=20),
                          seed=0, eos_token_ids=frozenset(), arrival_time=0.0)
        seqs.append(new_sequence(request))
        scheduler.add(seqs[-1])
    batch = scheduler.schedule()
    scheduler.advance(batch)
    for seq in seqs:
        seq.token_ids.append(prompts[0][0])
        scheduler.record_outputs(seq, True)
    return seqs


def test_scheduler_speculates_only_for_small_batches_and_rolls_back():
    from jaxllm.kv_cache_manager import KVCacheManager
    from jaxllm.scheduler import Scheduler
    from jaxllm.speculative import NgramProposer

    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 3,
                                          "disable_by_batch_size": 2})
    prompt = [1, 2, 3, 4, 5, 6, 7] * 2   # + token 1: proposals 2, 3, 4
    for num_seqs, proposes in ((3, False), (2, True)):
        scheduler = Scheduler(KVCacheManager(40, 4), 4, 64, proposer=NgramProposer(config, 64))
        seqs = _decoding(scheduler, [prompt] * num_seqs)
        batch = scheduler.schedule()
        rows = [(item.num_new_tokens, item.draft_token_ids) for item in batch.scheduled]
        assert rows == ([(4, (2, 3, 4))] if proposes else [(1, None)]) * num_seqs
    seq = seqs[0]
    scheduler.advance(batch)
    assert seq.num_computed_tokens == 18 and len(seq.block_ids) == 5 and seq.spec.in_flight
    assert all(item.seq is not seq for item in scheduler.schedule().scheduled)  # waits for its result
    seq.token_ids += [2, 9]            # proposal 2 accepted, 3 rejected: target token 9
    scheduler.rollback(seq, seq.num_tokens - 1)
    assert seq.num_computed_tokens == 16 and len(seq.block_ids) == 4   # the emptied block is freed
