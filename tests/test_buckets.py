"""BucketPolicy: a fixed, small, reachable set of step shapes; warm-up of all of them on a tiny
engine; a 200-request mixed workload that compiles nothing after warm-up."""

from __future__ import annotations

import dataclasses
import itertools
import types

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hf_compare import hf_greedy

from jaxllm import Engine, SamplingParams
from jaxllm.buckets import BucketPolicy, ceil_bucket, ladder
from jaxllm.kv_cache import KVCache
from jaxllm.warmup import warmup

DEFAULTS = BucketPolicy(max_num_batched_tokens=512, max_num_seqs=64, max_blocks_per_seq=128)
OPTIONS = dict(max_model_len=96, num_blocks=64, block_size=8, max_num_seqs=8,
               max_num_batched_tokens=64, max_logprobs=5)


@st.composite
def policies(draw, max_tokens=700):
    max_seqs = draw(st.integers(1, min(96, max_tokens)))
    return BucketPolicy(
        max_num_batched_tokens=draw(st.integers(max_seqs, max_tokens)), max_num_seqs=max_seqs,
        max_blocks_per_seq=draw(st.integers(1, 200)), block_size=draw(st.sampled_from([1, 8, 16])),
        decode_row_growth=draw(st.sampled_from([1.5, 2, 3, 4])), token_growth=draw(st.integers(2, 8)),
        min_tokens=draw(st.integers(1, 32)), row_growth=draw(st.integers(2, 8)),
        block_growth=draw(st.integers(2, 8)), min_blocks=draw(st.integers(1, 8)),
        attention_slack=draw(st.sampled_from([0, 1024, 16384, 10**9])),
        speculative_tokens=draw(st.sampled_from([0, 1, 4, 7])), speculative_rows=draw(st.integers(0, 8)))


@st.composite
def policy_and_step(draw):
    policy = draw(policies())
    num_tokens = draw(st.integers(1, policy.max_num_batched_tokens))
    num_rows = draw(st.integers(1, min(num_tokens, policy.max_num_seqs)))
    blocks = draw(st.integers(0, policy.max_blocks_per_seq))
    return policy, num_tokens, num_rows, blocks


@settings(max_examples=150, deadline=None)
@given(policy_and_step())
def test_pick_returns_a_listed_key_that_covers_the_step(case):
    policy, num_tokens, num_rows, blocks = case
    key = policy.pick(num_tokens, num_rows, blocks)
    assert key in set(policy.keys())
    t, s, p = key
    assert t >= num_tokens and s >= num_rows and p >= max(1, blocks)
    assert s <= t and p <= policy.max_blocks_per_seq
    assert t <= policy.max_num_batched_tokens and s <= policy.max_num_seqs
    if num_tokens == num_rows:  # decode steps pad no token beyond their rows
        assert t == s


@settings(max_examples=100, deadline=None)
@given(policy_and_step(), st.integers(0, 3), st.integers(0, 3), st.integers(0, 3))
def test_pick_is_monotonic(case, more_tokens, more_rows, more_blocks):
    """More blocks never give a smaller key; within a step kind (decode, speculative verify,
    other), neither do more tokens or rows. (A verify pair may have fewer rows than the ladder
    pair of a step with fewer tokens: 4 rows of 9 tokens take (20, 4) at k = 4, of 8 (8, 8).)"""
    policy, num_tokens, num_rows, blocks = case
    t, s, p = policy.pick(num_tokens, num_rows, blocks)
    verify = set(policy.verify_pairs)
    bigger_blocks = min(blocks + more_blocks, policy.max_blocks_per_seq)
    assert policy.pick(num_tokens, num_rows, bigger_blocks) >= (t, s, p)
    assert policy.pick(num_tokens, num_rows, bigger_blocks)[2] >= p
    tokens2 = min(num_tokens + more_tokens, policy.max_num_batched_tokens)
    rows2 = min(num_rows + more_rows, policy.max_num_seqs, tokens2)
    if (tokens2 == rows2) == (num_tokens == num_rows) and rows2 >= num_rows:
        t2, s2, _ = policy.pick(tokens2, rows2, blocks)
        if ((t2, s2) in verify) == ((t, s) in verify):
            assert t2 >= t and s2 >= s


def _image(policy: BucketPolicy) -> set:
    """Every key pick() returns, over every step the limits allow (brute force)."""
    return {policy.pick(n, r, b)
            for n in range(1, policy.max_num_batched_tokens + 1)
            for r in range(1, min(n, policy.max_num_seqs) + 1)
            for b in range(policy.max_blocks_per_seq + 1)}


@pytest.mark.parametrize("policy", [
    BucketPolicy(64, 8, 12, block_size=8),
    BucketPolicy(64, 8, 12, block_size=8, attention_slack=0),
    BucketPolicy(50, 7, 9, block_size=4, token_growth=3, row_growth=2, min_tokens=3,
                 block_growth=3, min_blocks=1, attention_slack=40),
    BucketPolicy(16, 16, 3, decode_row_growth=3, min_tokens=1),
    BucketPolicy(64, 8, 12, block_size=8, decode_row_growth=1.5, speculative_tokens=4,
                 speculative_rows=4),
])
def test_keys_are_exactly_the_reachable_ones(policy):
    assert _image(policy) == set(policy.keys())
    assert len(policy) == len(set(policy.keys()))


@settings(max_examples=30, deadline=None)
@given(policies(max_tokens=160))
def test_keys_are_exactly_the_reachable_ones_on_pairs(policy):
    """(T, S) pairs of every listed key are reached, and only those (P is independent)."""
    reached = {policy.pick(n, r, 0)[:2] for n in range(1, policy.max_num_batched_tokens + 1)
               for r in range(1, min(n, policy.max_num_seqs) + 1)}
    assert reached == {k[:2] for k in policy.keys()}
    for t in {k[0] for k in policy.keys()}:
        verify_rows = dict(policy.verify_pairs)
        # a step of bucket t: a decode step, a verify step of its rows, else one row
        n, r = (t, t) if t in policy.decode_rows else (t, verify_rows.get(t, 1))
        blocks = {policy.pick(n, r, b)[2] for b in range(policy.max_blocks_per_seq + 1)}
        assert blocks == set(policy.blocks(t))


def test_default_set_is_a_few_dozen_keys():
    info = DEFAULTS.describe()
    assert info["num_keys"] == len(DEFAULTS.keys()) == 37
    assert info["num_decode_keys"] + info["num_prefill_keys"] == 37
    assert info["decode_rows"] == (1, 2, 4, 8, 16, 32, 64)
    assert info["tokens"] == (8, 32, 128, 512) and info["rows"] == (1, 8, 64)
    assert info["blocks"][512] == (2, 8, 32, 128) and info["blocks"][1] == (128,)
    # Knobs trade keys for padding; the all-power-of-two scheme is ten times bigger.
    assert len(dataclasses.replace(DEFAULTS, row_growth=4)) == 47
    pow2 = dataclasses.replace(DEFAULTS, token_growth=2, row_growth=2, block_growth=2,
                               min_tokens=1, min_blocks=1, attention_slack=0)
    assert len(pow2) == 392


def test_ladders():
    assert ladder(512, 4, 8) == (8, 32, 128, 512)
    assert ladder(128, 4, 2) == (2, 8, 32, 128)
    assert ladder(100, 4, 1) == (1, 2, 7, 25, 100)
    assert ladder(5, 2, 8) == (5,)
    assert ladder(64, 1.5) == (1, 2, 3, 4, 5, 7, 10, 14, 20, 29, 43, 64)   # each >= 1 below the last
    assert ceil_bucket(9, (8, 32)) == 32 and ceil_bucket(8, (8, 32)) == 8
    with pytest.raises(ValueError):
        ceil_bucket(33, (8, 32))


def test_rejects_impossible_steps_and_bad_settings():
    with pytest.raises(ValueError):
        DEFAULTS.pick(4, 5, 0)  # more rows than tokens
    with pytest.raises(ValueError):
        DEFAULTS.pick(513, 1, 0)
    with pytest.raises(ValueError):
        DEFAULTS.pick(64, 1, 129)
    with pytest.raises(ValueError):
        BucketPolicy(8, 16, 4)
    with pytest.raises(ValueError):
        BucketPolicy(64, 8, 4, token_growth=1)
    with pytest.raises(ValueError):
        BucketPolicy(64, 8, 4, decode_row_growth=1)


def test_from_config_on_cpu_uses_finer_decode_rows_and_one_block_bucket_with_the_cpu_kernel():
    config = types.SimpleNamespace(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=8192,
                                   block_size=16, attention="cpu", speculative_config=None)
    cpu = BucketPolicy.from_config(config, "cpu")
    assert cpu.decode_rows == (1, 2, 3, 4, 5, 7, 10, 14, 20, 29, 43, 64)
    assert {cpu.blocks(t) for t in {k[0] for k in cpu.keys()}} == {(512,)}
    assert len(cpu) == 23
    gpu = BucketPolicy.from_config(types.SimpleNamespace(**{**vars(config), "attention": "reference"}), "gpu")
    assert gpu.decode_rows == (1, 2, 4, 8, 16, 32, 64) and gpu.blocks(512) == (2, 8, 32, 128, 512)
    assert len(gpu) == 51


def test_speculation_adds_verify_steps_of_k_plus_one_tokens_per_row():
    """A row of its last token and k proposals is a verify step of S (k + 1) tokens, not the
    token ladder's next bucket (1 row, k = 4: 5 tokens, not 8), up to disable_by_batch_size rows."""
    from jaxllm.speculative import SpeculativeConfig

    spec = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 4})
    config = types.SimpleNamespace(max_num_batched_tokens=512, max_num_seqs=64, max_model_len=8192,
                                   block_size=16, attention="cpu", speculative_config=spec)
    policy = BucketPolicy.from_config(config, "cpu")
    assert policy.verify_pairs == ((5, 1), (10, 2), (15, 3), (20, 4))
    assert len(policy) == 23 + 4
    assert policy.pick(5, 1, 3)[:2] == (5, 1) and policy.pick(2, 1, 3)[:2] == (5, 1)
    assert policy.pick(9, 2, 3)[:2] == (10, 2) and policy.pick(20, 4, 3)[:2] == (20, 4)
    assert policy.pick(6, 1, 3)[:2] == (8, 1)       # past k + 1 tokens: the token ladder
    assert policy.pick(7, 2, 3)[:2] == (8, 8)       # the ladder pair has fewer tokens
    assert policy.pick(12, 5, 3)[:2] == (32, 8)     # more rows than speculate
    assert policy.pick(1, 1, 3)[:2] == (1, 1)       # decode steps as before


# ---- on a tiny engine ----

def _mixed_params(rng, index: int) -> SamplingParams:
    """Sampling features that ride in every step's shape (all but Python logits processors)."""
    max_tokens = int(rng.integers(1, 31))
    kinds = [
        dict(temperature=0),
        dict(temperature=0.8, seed=index, repetition_penalty=1.2),
        dict(temperature=1.0, top_p=0.9, logit_bias={5: 2.0}),
        dict(temperature=0.7, top_k=20, seed=index, frequency_penalty=0.5, presence_penalty=0.3),
        dict(temperature=1.2, min_p=0.1, logprobs=3, allowed_token_ids=list(range(100))),
        dict(temperature=0, logprobs=2, prompt_logprobs=1, min_tokens=min(max_tokens, 3), stop_token_ids=[7]),
    ]
    return SamplingParams(max_tokens=max_tokens, **kinds[index % len(kinds)])


@pytest.fixture(scope="module")
def warmed(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with Engine(str(path), **OPTIONS) as engine:
        yield engine, engine.bucket_policy


def test_warmup_compiles_every_key_and_only_touches_block_0(warmed, tiny_llama_dir):
    engine, policy = warmed
    runner = engine.model_runner
    assert runner.step.num_compilations == 0
    rng = np.random.default_rng(0)
    cache = runner.kv_cache
    runner.kv_cache = KVCache(*(jax.numpy.asarray(rng.standard_normal(a.shape), a.dtype)
                                for a in (cache.k, cache.v)))
    before = [np.asarray(a) for a in (runner.kv_cache.k, runner.kv_cache.v)]

    assert warmup(runner, policy, progress=False) == len(policy) == runner.step.num_compilations
    after = [np.asarray(a) for a in (runner.kv_cache.k, runner.kv_cache.v)]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a[:, 1:], b[:, 1:])  # only padding block 0 may change
    assert warmup(runner, policy, progress=False) == 0  # everything is compiled already

    # Generation afterwards, through the policy's shapes, gives what a fresh engine gives:
    # transformers' greedy tokens (test_llama_vs_hf holds a fresh engine to those; comparing
    # with transformers here saves compiling a second engine's steps).
    _, hf_model = tiny_llama_dir
    prompts = [np.random.default_rng(i).integers(0, 256, n).tolist() for i, n in enumerate((3, 17, 40))]
    lengths = (12, 9, 20)
    params = [SamplingParams(temperature=0, max_tokens=n) for n in lengths]
    got = engine.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [hf_greedy(hf_model, p, n) for p, n in zip(prompts, lengths)]
    assert engine.stats()["num_compilations"] == len(policy)


def test_steady_state_200_mixed_requests_compile_nothing_after_warmup(warmed):
    engine, policy = warmed
    if engine.stats()["num_compilations"] < len(policy):
        warmup(engine.model_runner, policy, progress=False)
    compiled = engine.stats()["num_compilations"]
    assert compiled == len(policy) == engine.stats()["num_step_shapes"]
    rng = np.random.default_rng(1)
    counter = itertools.count()
    for wave_size in (80, 50, 70):  # waves: ramp up, drain, ramp up again
        prompts = [rng.integers(0, 256, int(rng.integers(1, 61))).tolist() for _ in range(wave_size)]
        params = [_mixed_params(rng, next(counter)) for _ in prompts]
        outputs = engine.generate(prompts, params, use_tqdm=False)
        assert all(o.finished for o in outputs)
        assert engine.stats()["num_compilations"] == compiled
    assert next(counter) == 200


def test_engine_warmup_option_compiles_every_shape_at_start_up(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with Engine(str(path), warmup=True, **{**OPTIONS, "max_num_seqs": 2, "max_num_batched_tokens": 8}) as engine:
        assert engine.stats()["num_compilations"] == len(engine.bucket_policy)
        engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=4))
        assert engine.stats()["num_compilations"] == len(engine.bucket_policy)
