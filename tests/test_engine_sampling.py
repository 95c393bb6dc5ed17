"""Every SamplingParams field through the whole engine on a tiny random model, against
transformers where it has the same feature, and the compile counter under changing values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ENGINE_OPTIONS as OPTIONS
from conftest import random_prompts

from jaxllm import Engine, SamplingParams, register_strategy


@register_strategy("test_force_token", token=7.0)
def force_token(logits, args):
    """A strategy defined by a user: only the token named in its argument survives."""
    keep = jnp.arange(logits.shape[-1])[None, :] == args["token"][:, None].astype(jnp.int32)
    return jnp.where(keep, logits, -jnp.inf)


def _hf_log_softmax(hf_model, token_ids):
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0].double()
    return torch.log_softmax(logits, -1).numpy()


def test_changing_sampling_values_never_recompiles(tiny):
    engine, _ = tiny
    prompts = random_prompts([5, 9, 12, 7, 3, 10, 6, 8], seed=1)

    def batch(shift):
        return [SamplingParams(temperature=0.3 + shift + 0.1 * i, top_k=i + int(shift * 6), top_p=0.5 + 0.05 * i,
                               min_p=0.01 * i, seed=i + int(10 * shift), max_tokens=6, ignore_eos=True,
                               logprobs=i % 3, strategy=("typical" if i % 2 else "eta"),
                               strategy_args={"mass": 0.8} if i % 2 else {"epsilon": 1e-3 * (i + 1)})
                for i in range(len(prompts))]

    engine.generate(prompts, batch(0.0), use_tqdm=False)
    compiled = engine.stats()["num_compilations"]
    outputs = engine.generate(prompts, batch(0.5), use_tqdm=False)
    assert engine.stats()["num_compilations"] == compiled
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)


@pytest.fixture(scope="module")
def chunked(tiny_llama_dir):
    """The tiny Llama with a 16-token step budget: long prompts prefill in chunks."""
    with Engine(str(tiny_llama_dir[0]), **{**OPTIONS, "max_num_batched_tokens": 16}) as engine:
        yield engine


def test_seeded_request_same_tokens_alone_in_a_batch_chunked_and_preempted(tiny, chunked, tiny_llama_dir):
    engine, _ = tiny
    path, _ = tiny_llama_dir
    prompt = random_prompts([40], seed=2)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=1234, max_tokens=24,
                            ignore_eos=True, repetition_penalty=1.1)
    others = [SamplingParams(temperature=t, seed=s, max_tokens=24, ignore_eos=True)
              for t, s in ((0.0, 1), (1.5, 2), (0.7, 3))]
    alone = engine.generate(prompt, params).outputs[0].token_ids
    mixed = engine.generate(random_prompts([7, 30, 11], seed=3) + [prompt], others + [params], use_tqdm=False)
    assert mixed[-1].outputs[0].token_ids == alone
    # 16-token budget: the 40-token prompt is prefilled in chunks beside the others' decodes.
    out = chunked.generate([prompt] + random_prompts([20, 25], seed=4), [params] + others[:2], use_tqdm=False)
    assert out[0].outputs[0].token_ids == alone
    # A pool too small for all at once: someone is preempted and recomputed.
    with Engine(str(path), **{**OPTIONS, "num_blocks": 13, "enable_prefix_caching": False}) as tight:
        out = tight.generate(random_prompts([30, 30], seed=5) + [prompt], others[1:] + [params], use_tqdm=False)
        assert tight.stats()["num_preemptions"] > 0
        assert out[-1].outputs[0].token_ids == alone


def test_logprobs_and_prompt_logprobs_equal_transformers(tiny):
    engine, hf_model = tiny
    prompt = random_prompts([11], seed=6)[0]
    out = engine.generate(prompt, SamplingParams(temperature=0.8, seed=3, max_tokens=6, ignore_eos=True,
                                                 logprobs=3, prompt_logprobs=2))
    completion = out.outputs[0]
    expected = _hf_log_softmax(hf_model, prompt + completion.token_ids)
    assert len(completion.logprobs) == 6
    for i, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = expected[len(prompt) - 1 + i]
        assert token in entry and len(entry) in (3, 4)          # the sampled one + the top 3
        assert abs(entry[token].logprob - row[token]) < 1e-4
        assert entry[token].rank == int((row > row[token]).sum()) + 1
        for t in np.argsort(-row)[:3]:
            assert abs(entry[int(t)].logprob - row[t]) < 1e-4
    assert completion.cumulative_logprob == pytest.approx(
        sum(entry[t].logprob for t, entry in zip(completion.token_ids, completion.logprobs)), abs=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for p in range(1, len(prompt)):
        entry, row = out.prompt_logprobs[p], expected[p - 1]
        assert abs(entry[prompt[p]].logprob - row[prompt[p]]) < 1e-4
        for t in np.argsort(-row)[:2]:
            assert abs(entry[int(t)].logprob - row[t]) < 1e-4


def test_prompt_logprobs_across_chunks_and_with_a_cached_prefix(chunked, tiny_llama_dir):
    hf_model = tiny_llama_dir[1]
    prompt = random_prompts([45], seed=7)[0]
    expected = _hf_log_softmax(hf_model, prompt)
    chunked.generate(prompt, SamplingParams(temperature=0, max_tokens=2))     # fills the prefix cache
    out = chunked.generate(prompt, SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=0))
    got = [entry[prompt[p]].logprob for p, entry in enumerate(out.prompt_logprobs) if p > 0]
    np.testing.assert_allclose(got, expected[np.arange(44), prompt[1:]], atol=1e-4)


def test_repetition_penalty_greedy_equals_transformers(tiny):
    import torch

    engine, hf_model = tiny
    prompts = random_prompts([6, 13], seed=8)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, repetition_penalty=1.8)
    outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, out in zip(prompts, outputs):
        hf = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                               repetition_penalty=1.8, pad_token_id=0)
        assert out.outputs[0].token_ids == hf[0, len(prompt):].tolist()


def test_frequency_and_presence_penalties_stop_a_repeating_greedy_loop(tiny):
    engine, _ = tiny
    prompt = random_prompts([8], seed=9)[0]
    plain = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    penalised = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True,
                                                       frequency_penalty=2.0, presence_penalty=2.0))
    plain_ids, penal_ids = plain.outputs[0].token_ids, penalised.outputs[0].token_ids
    assert max(np.bincount(penal_ids)) <= max(np.bincount(plain_ids))
    assert len(set(penal_ids)) > len(set(plain_ids)) or len(set(plain_ids)) == 30


def test_logit_bias_allowed_token_ids_and_min_tokens(tiny):
    engine, _ = tiny
    prompt = random_prompts([9], seed=10)[0]
    allowed = engine.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=20, ignore_eos=True,
                                                     allowed_token_ids=[3, 70, 200]))
    assert set(allowed.outputs[0].token_ids) <= {3, 70, 200}
    biased = engine.generate(prompt, SamplingParams(temperature=1.0, seed=0, max_tokens=8, ignore_eos=True,
                                                    logit_bias={42: 100.0}))
    assert biased.outputs[0].token_ids == [42] * 8
    # Token 42 would stop at once; min_tokens bans it until 5 tokens are out.
    early = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[42],
                                                   logit_bias={42: 100.0}, min_tokens=5))
    assert early.outputs[0].token_ids[-1] == 42 and len(early.outputs[0].token_ids) == 6
    assert 42 not in early.outputs[0].token_ids[:5]
    assert early.outputs[0].finish_reason == "stop"


def test_registered_strategy_runs_beside_builtins_in_one_engine(tiny_llama_dir):
    path, _ = tiny_llama_dir
    prompts = random_prompts([5, 8, 6], seed=11)
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    forced = SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                            strategy="test_force_token", strategy_args={"token": 99})
    typical = SamplingParams(temperature=1.0, seed=5, max_tokens=10, ignore_eos=True,
                             strategy="typical", strategy_args={"mass": 0.5})
    with Engine(str(path), **OPTIONS) as engine:
        alone = engine.generate(prompts[0], greedy).outputs[0].token_ids
        typical_alone = engine.generate(prompts[2], typical).outputs[0].token_ids
        out = engine.generate(prompts, [greedy, forced, typical], use_tqdm=False)
    assert out[0].outputs[0].token_ids == alone
    assert out[1].outputs[0].token_ids == [99] * 10
    assert out[2].outputs[0].token_ids == typical_alone


def test_python_logits_processor_is_applied_per_request(tiny):
    engine, _ = tiny
    seen_lengths = []

    def ban_all_but_next(output_token_ids, logits):
        seen_lengths.append(len(output_token_ids))
        logits = np.full_like(logits, -np.inf)
        logits[(len(output_token_ids) + 10) % 256] = 0.0
        return logits

    prompts = random_prompts([7, 7], seed=12)
    out = engine.generate(prompts, [SamplingParams(temperature=0, max_tokens=5, ignore_eos=True,
                                                   logits_processors=[ban_all_but_next]),
                                    SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                          use_tqdm=False)
    assert out[0].outputs[0].token_ids == [10, 11, 12, 13, 14]
    assert seen_lengths == [0, 1, 2, 3, 4]
    assert out[1].outputs[0].token_ids == engine.generate(prompts[1], SamplingParams(
        temperature=0, max_tokens=5, ignore_eos=True)).outputs[0].token_ids


@pytest.mark.parametrize("kwargs, message", [
    ({"logit_bias": {256: 1.0}}, "logit_bias"),
    ({"allowed_token_ids": [1, 999]}, "allowed_token_ids"),
    ({"stop_token_ids": [300]}, "stop_token_ids"),
    ({"logprobs": 17}, "max_logprobs"),
    ({"prompt_logprobs": 17}, "max_logprobs"),
    ({"strategy": "no_such_strategy"}, "not registered"),
    ({"strategy": "typical", "strategy_args": {"p": 0.5}}, "unknown argument"),
])
def test_vocabulary_and_engine_limits_are_checked_at_submission(tiny, kwargs, message):
    engine, _ = tiny
    with pytest.raises(ValueError, match=message):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=2, **kwargs))
    assert len(engine.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=2)).outputs[0].token_ids) == 2
