"""Scheduling through the whole engine: preemption, chunked prefill, prefix caching."""

from __future__ import annotations

import numpy as np
import pytest

from jaxllm import Engine, SamplingParams

from conftest import make_tiny_llama

BLOCK = 8


@pytest.fixture(scope="module")
def long_context_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_long")
    make_tiny_llama(path, seed=3, max_position_embeddings=2048)
    return str(path)


def _greedy(max_tokens):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def _token_ids(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_engine_preemption_with_a_quarter_size_pool_gives_the_same_tokens(long_context_model):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(8, 40, 12)]
    params = _greedy(40)
    peak_blocks = sum(-(-(len(p) + 40) // BLOCK) for p in prompts)
    options = dict(max_model_len=128, block_size=BLOCK, max_num_seqs=12, max_num_batched_tokens=64)
    with Engine(long_context_model, num_blocks=peak_blocks + 1, **options) as roomy:
        expected = _token_ids(roomy.generate(prompts, params, use_tqdm=False))
        assert roomy.stats()["num_preemptions"] == 0
    with Engine(long_context_model, num_blocks=peak_blocks // 4 + 1, enable_prefix_caching=False,
                **options) as tight:
        got = _token_ids(tight.generate(prompts, params, use_tqdm=False))
        stats = tight.stats()
    assert got == expected
    assert stats["num_preemptions"] > 0
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0


def test_engine_chunked_prefill_of_1000_tokens_equals_unchunked(long_context_model):
    prompt = np.random.default_rng(1).integers(0, 256, 1000).tolist()
    options = dict(max_model_len=1100, block_size=16, num_blocks=80, max_num_seqs=4,
                   enable_prefix_caching=False)
    with Engine(long_context_model, max_num_batched_tokens=1024, **options) as whole:
        expected = whole.generate(prompt, _greedy(16))
        assert whole.stats()["num_steps"] == 16  # one prefill step, then 15 decodes
    with Engine(long_context_model, max_num_batched_tokens=64, **options) as chunked:
        got = chunked.generate(prompt, _greedy(16))
        assert chunked.stats()["num_steps"] == 16 + 15  # ceil(1000 / 64) chunks, then 15 decodes
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids
    assert got.outputs[0].cumulative_logprob == pytest.approx(expected.outputs[0].cumulative_logprob, abs=1e-3)


def test_engine_prefix_cache_computes_only_new_tokens_and_keeps_tokens(long_context_model):
    rng = np.random.default_rng(2)
    prefix = rng.integers(0, 256, 256).tolist()
    first, second = prefix + [1, 2, 3], prefix + rng.integers(0, 256, 20).tolist()
    options = dict(max_model_len=512, block_size=16, num_blocks=80, max_num_seqs=4,
                   max_num_batched_tokens=512)
    with Engine(long_context_model, enable_prefix_caching=False, **options) as plain:
        expected = _token_ids(plain.generate([first, second], _greedy(8), use_tqdm=False))
    with Engine(long_context_model, **options) as cached:
        out_first = cached.generate(first, _greedy(8))
        before = cached.stats()
        out_second = cached.generate(second, _greedy(8))
        after = cached.stats()
    assert [out_first.outputs[0].token_ids, out_second.outputs[0].token_ids] == expected
    assert out_first.metrics.num_cached_tokens == 0
    assert out_second.metrics.num_cached_tokens == 256
    # Only the 20 new prompt tokens are prefilled, then 7 decode steps of one token each.
    assert after["num_tokens_computed"] - before["num_tokens_computed"] == 20 + 7
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == 256
    assert after["prefix_cache_hit_rate"] > 0
    assert after["kv_blocks_used"] == 0 and after["kv_blocks_cached"] > 0


def test_engine_priority_orders_waiting_requests(long_context_model):
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10, 11, 12]]
    options = dict(max_model_len=64, block_size=BLOCK, num_blocks=32, max_num_seqs=1,
                   max_num_batched_tokens=16)
    with Engine(long_context_model, **options) as engine:
        outputs = engine.generate(prompts, _greedy(3), use_tqdm=False, priority=[2, 0, 1, 0])
        with pytest.raises(ValueError, match="priority"):
            engine.generate(prompts, _greedy(3), priority=[0])
    order = sorted(range(4), key=lambda i: outputs[i].metrics.first_scheduled_time)
    assert order == [1, 3, 2, 0]
