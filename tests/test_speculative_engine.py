"""Speculative decoding through the whole engine: the same tokens as without it (greedy and
seeded sampling, across chunked prefill, preemption and stop conditions), no compilation
after warm-up, acceptance counters; then one sharp check on the real SmolLM2."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from conftest import make_tiny_llama, random_prompts
from test_no_recompile import CompileEvents

from jaxllm import Engine, SamplingParams
from jaxllm.draft_model import tokenizer_mismatch

PATTERN = [5, 17, 33, 92, 7, 61, 200, 3]
SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
# A pool of 13 usable blocks of 8 for 2 running sequences of up to 94 tokens: preemption; an
# 8-token budget: prompts are prefilled in chunks. 4 step shapes to warm up.
OPTIONS = dict(max_model_len=96, num_blocks=14, block_size=8, max_num_seqs=2,
               max_num_batched_tokens=8, max_logprobs=16, warmup=True)


@pytest.fixture(scope="module")
def spec_engine(tiny_llama_dir):
    path, _ = tiny_llama_dir
    with Engine(str(path), speculative_config=SPEC, **OPTIONS) as engine:
        yield engine


def _cycle_prompt(engine: Engine) -> list[int]:
    """The pattern and the start of the tiny model's own greedy continuation, which falls into
    a cycle: its continuation repeats n-grams of the prompt, so proposals get accepted."""
    first = engine.generate(PATTERN * 2, SamplingParams(temperature=0, max_tokens=48, ignore_eos=True))
    return PATTERN * 2 + first.outputs[0].token_ids


def _summary(outputs):
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason, o.outputs[0].stop_reason)
            for o in outputs]


def _workload(baseline: Engine) -> tuple[list, list, int]:
    """Prompts and params for every kind of row: greedy, ending inside a verified run, stop
    tokens, seeded sampling with penalties, top-p with bias and min_tokens, logprobs (never
    speculates); and the stop token of the third."""
    cycle = _cycle_prompt(baseline)
    greedy = baseline.generate(cycle, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    stop_id = greedy.outputs[0].token_ids[12]   # the greedy continuation stops there or before
    long_random = random_prompts([45], seed=7)[0]
    prompts = [cycle, cycle, cycle, PATTERN * 2, long_random, cycle[:-5], cycle, cycle[4:]]
    params = [
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=7, ignore_eos=True),   # ends inside a verified run
        SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, seed=1, max_tokens=30, repetition_penalty=1.2,
                       frequency_penalty=0.3, ignore_eos=True),
        SamplingParams(temperature=0.3, seed=2, max_tokens=30, presence_penalty=0.5, ignore_eos=True),
        SamplingParams(temperature=0.5, top_p=0.9, seed=3, max_tokens=25, logit_bias={stop_id: 1.5},
                       min_tokens=4, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=2),  # never speculates
    ]
    return prompts, params, stop_id


def test_speculation_gives_the_same_tokens_and_compiles_nothing(spec_engine, tiny):
    baseline, _ = tiny
    prompts, params, stop_id = _workload(baseline)
    expected = _summary(baseline.generate(prompts, params, use_tqdm=False))
    compiled = spec_engine.stats()["num_compilations"]
    with CompileEvents() as events:
        outputs = spec_engine.generate(prompts, params, use_tqdm=False)
        alone = spec_engine.generate(prompts[4], params[4])   # a seeded request alone
    assert events.names == [] and spec_engine.stats()["num_compilations"] == compiled
    assert _summary(outputs) == expected
    assert _summary([alone]) == expected[4:5]
    assert outputs[1].outputs[0].token_ids == expected[0][0][:7]
    assert expected[2][1:] == ("stop", stop_id)
    _check_counters(spec_engine, [*outputs, alone])
    assert outputs[0].metrics.num_accepted_tokens > 10        # the cycle is copied
    # fewer steps than tokens: some steps emitted several tokens of a row
    assert spec_engine.stats()["num_generated_tokens"] > spec_engine.stats()["num_steps"]


def _check_counters(engine: Engine, outputs: list) -> None:
    """Preemption happened, every block came back, and the counters add up (engine-wide,
    per request, per position); the request asking for logprobs (8th) never speculated."""
    stats = engine.stats()
    assert stats["num_preemptions"] > 0 and stats["kv_blocks_used"] == 0
    assert stats["spec_decode_num_drafts"] > 0
    assert 0 <= stats["spec_decode_num_accepted_tokens"] <= stats["spec_decode_num_draft_tokens"]
    assert sum(stats["spec_decode_num_accepted_tokens_per_pos"]) == stats["spec_decode_num_accepted_tokens"]
    metrics = [o.metrics for o in outputs]
    assert sum(m.num_draft_tokens for m in metrics) == stats["spec_decode_num_draft_tokens"]
    assert sum(m.num_accepted_tokens for m in metrics) == stats["spec_decode_num_accepted_tokens"]
    assert metrics[7].num_draft_tokens == 0


@pytest.fixture(scope="module")
def other_draft_dir(tmp_path_factory):
    """A different tiny random Llama (1 layer, narrower) with the tiny Llama's vocabulary."""
    path = tmp_path_factory.mktemp("tiny_draft")
    make_tiny_llama(path, seed=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1)
    return path


@pytest.mark.parametrize("draft", ["itself", "other", "layer_skip"])
def test_draft_model_gives_the_same_tokens_and_compiles_nothing(draft, tiny, tiny_llama_dir,
                                                                other_draft_dir):
    """A draft model run by the engine (its own KV cache, kept in sync across chunked
    catch-up, rollback and preemption): the tokens of plain decoding. The target as its own
    draft proposes the target's greedy tokens: greedy rows accept nearly all (a broken sync
    would feed it stale K/V)."""
    baseline, _ = tiny
    prompts, params, _ = _workload(baseline)
    expected = _summary(baseline.generate(prompts, params, use_tqdm=False))
    path = str(tiny_llama_dir[0])
    spec = {"num_speculative_tokens": 3, **(
        {"method": "layer_skip", "num_layers": 1} if draft == "layer_skip"
        else {"model": path if draft == "itself" else str(other_draft_dir)})}
    with Engine(path, speculative_config=spec, **OPTIONS) as engine:
        with CompileEvents() as events:
            outputs = engine.generate(prompts, params, use_tqdm=False)
        assert events.names == []
        assert _summary(outputs) == expected
        _check_counters(engine, outputs)
    if draft == "itself":
        greedy = [o.metrics for o in outputs[:4]]
        assert sum(m.num_accepted_tokens for m in greedy) >= 0.9 * sum(m.num_draft_tokens for m in greedy) > 0


COPY_SOURCE = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
'''


@pytest.mark.slow
def test_smollm2_greedy_with_speculation_equals_without_it():
    """The real default model copying a code block: most proposals are accepted, and the
    tokens equal those of plain decoding (a request asking for logprobs never speculates)."""
    prompt = ("Original file:\n```python\n" + COPY_SOURCE + "```\n\nThe same file with the "
              "function renamed to rolling_mean:\n```python\n")
    # The notebook's engine options: the two share their compiled steps.
    with Engine(max_model_len=256, max_num_seqs=1, max_num_batched_tokens=128,
                speculative_config={**SPEC, "num_speculative_tokens": 4}) as engine:
        plain = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40, logprobs=0))
        spec = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=40))
        stats = engine.stats()
    assert spec.outputs[0].token_ids == plain.outputs[0].token_ids
    assert plain.metrics.num_draft_tokens == 0
    assert spec.metrics.num_accepted_tokens >= 10
    assert stats["spec_decode_num_accepted_tokens"] == spec.metrics.num_accepted_tokens
    assert np.isclose(spec.outputs[0].cumulative_logprob, plain.outputs[0].cumulative_logprob, atol=1e-2)


def test_a_draft_with_another_vocabulary_is_refused_before_loading(tiny_llama_dir, tiny_chat_llama_dir):
    target, draft = str(tiny_llama_dir[0]), str(tiny_chat_llama_dir[0])
    with pytest.raises(ValueError) as info:
        Engine(target, speculative_config={"model": draft, "num_speculative_tokens": 2}, **OPTIONS)
    message = str(info.value)
    assert target in message and draft in message and "vocabulary sizes 256 vs 320" in message
    with pytest.raises(ValueError, match=r"'num_layers'\] must be in \[1, 1\]"):
        Engine(target, speculative_config={"method": "layer_skip", "num_layers": 2,
                                           "num_speculative_tokens": 2}, **OPTIONS)


def test_tokenizer_mismatch_compares_vocabularies_and_special_ids(tiny_chat_llama_dir):
    tokenizer = tiny_chat_llama_dir[2]
    assert tokenizer_mismatch(tokenizer, 320, copy.deepcopy(tokenizer), 320) == []
    extra = copy.deepcopy(tokenizer)
    extra.add_tokens(["<extra>"])
    assert tokenizer_mismatch(tokenizer, 320, extra, 320) == ["their tokenizers' vocabularies differ"]
    other_eos = copy.deepcopy(tokenizer)
    other_eos.eos_token = "a"
    assert tokenizer_mismatch(tokenizer, 320, other_eos, 320) == [
        f"eos_token_id {tokenizer.eos_token_id} vs {other_eos.eos_token_id}"]
    assert tokenizer_mismatch(tokenizer, 320, None, 320) == ["one has a tokenizer and the other none"]
