"""n > 1 (parallel sampling with copy-on-write prompt blocks) and beam search against
transformers' ``num_beams`` search on the same weights (the host bookkeeping alone is in
test_beam_search.py and test_postprocess.py)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TINY_ENGINE_OPTIONS as OPTIONS
from conftest import make_tiny_llama, random_prompts

from jaxllm import Engine, RequestOutputKind, SamplingParams


def _prompt(n, seed=0):
    return random_prompts([n], seed)[0]


def test_n_completions_share_the_prompt_blocks_and_differ(tiny):
    engine, _ = tiny
    prompt = _prompt(37, seed=1)                       # 4 full blocks + 5 tokens
    before = engine.stats()["num_tokens_computed"]
    out = engine.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    computed = engine.stats()["num_tokens_computed"] - before
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    # The prompt once, then 1 recomputed prompt token per child, then the decodes.
    assert computed == 37 + 3 + 4 * 9
    single = engine.generate(prompt, SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert out.outputs[0].token_ids == single.outputs[0].token_ids
    again = engine.generate(prompt, SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True))
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    assert engine.stats()["kv_blocks_used"] == 0


def test_n_greedy_completions_are_identical_to_one(tiny):
    engine, _ = tiny
    prompt = _prompt(16, seed=2)                       # the last prompt token starts no new block
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = engine.generate(prompt, params).outputs[0].token_ids
    out = engine.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=12, ignore_eos=True))
    assert [c.token_ids for c in out.outputs] == [expected] * 3


def test_n_streams_deltas_for_every_completion(tiny):
    engine, _ = tiny
    params = SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6, ignore_eos=True,
                            output_kind=RequestOutputKind.DELTA)
    tokens = {0: [], 1: []}
    outputs = list(engine.generate_stream(_prompt(9, seed=3), params))
    for output in outputs:
        for completion in output.outputs:
            tokens[completion.index] += completion.token_ids
    assert outputs[-1].finished and sum(o.finished for o in outputs) == 1
    final = engine.generate(_prompt(9, seed=3), SamplingParams(n=2, temperature=0.8, seed=3, max_tokens=6,
                                                               ignore_eos=True))
    assert [tokens[0], tokens[1]] == [c.token_ids for c in final.outputs]


def _hf_beams(hf_model, prompt, width, n, max_tokens, length_penalty=1.0, early_stopping=False, eos=None):
    import torch

    out = hf_model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                            max_new_tokens=max_tokens, length_penalty=length_penalty,
                            early_stopping=early_stopping, eos_token_id=eos, pad_token_id=eos if eos else 0,
                            return_dict_in_generate=True, output_scores=True)
    rows = out.sequences[:, len(prompt):].tolist()
    if eos is not None:   # drop the padding after EOS
        rows = [row[:row.index(eos) + 1] if eos in row else row for row in rows]
    return rows, out.sequences_scores.tolist()


@pytest.mark.parametrize("width, n, max_tokens", [(2, 1, 8), (4, 4, 10), (3, 2, 12)])
def test_beam_search_equals_transformers(tiny, width, n, max_tokens):
    engine, hf_model = tiny
    prompt = _prompt(11, seed=4 + width)
    out = engine.generate(prompt, SamplingParams(use_beam_search=True, beam_width=width, n=n, temperature=0,
                                                 max_tokens=max_tokens, ignore_eos=True))
    expected, scores = _hf_beams(hf_model, prompt, width, n, max_tokens)
    assert [c.token_ids for c in out.outputs] == expected
    for completion, score in zip(out.outputs, scores):
        assert completion.cumulative_logprob / max_tokens == pytest.approx(score, abs=1e-4)
    assert engine.stats()["kv_blocks_used"] == 0


@pytest.mark.parametrize("early_stopping, length_penalty", [(False, 1.0), (True, 1.0), ("never", 2.0),
                                                            (False, -0.5)])
def test_beam_search_with_eos_equals_transformers(tiny, early_stopping, length_penalty):
    """A frequent token as EOS makes beams finish at different lengths."""
    engine, hf_model = tiny
    prompt = _prompt(10, seed=9)
    greedy = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    eos = int(np.bincount(greedy.outputs[0].token_ids).argmax())
    out = engine.generate(prompt, SamplingParams(use_beam_search=True, beam_width=3, n=3, temperature=0,
                                                 max_tokens=16, stop_token_ids=[eos], ignore_eos=True,
                                                 length_penalty=length_penalty, early_stopping=early_stopping))
    expected, _ = _hf_beams(hf_model, prompt, 3, 3, 16, length_penalty, early_stopping, eos)
    assert [c.token_ids for c in out.outputs] == expected
    assert any(c.finish_reason == "stop" for c in out.outputs)


def test_beam_search_on_a_batch_with_a_small_pool_and_other_requests(tiny_llama_dir):
    """Beams of several requests, plain requests beside them, and preemption in between."""
    path, hf_model = tiny_llama_dir
    prompts = [_prompt(n, seed=20 + n) for n in (9, 14, 30)]
    beam = SamplingParams(use_beam_search=True, beam_width=3, n=2, temperature=0, max_tokens=10, ignore_eos=True)
    plain = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with Engine(str(path), **{**OPTIONS, "num_blocks": 14, "enable_prefix_caching": False}) as engine:
        outs = engine.generate(prompts + [prompts[0]], [beam, beam, beam, plain], use_tqdm=False)
        assert engine.stats()["num_preemptions"] > 0
        assert engine.stats()["kv_blocks_used"] == 0
    for prompt, out in zip(prompts, outs):
        expected, _ = _hf_beams(hf_model, prompt, 3, 2, 10)
        assert [c.token_ids for c in out.outputs] == expected


def test_beam_search_bad_settings_are_refused(tiny):
    engine, _ = tiny
    for kwargs, message in [({"stop": ["x"]}, "stop"), ({"repetition_penalty": 1.2}, "penalties"),
                            ({"beam_width": 17}, "max_num_seqs")]:
        with pytest.raises(ValueError, match=message):
            engine.generate([1, 2], SamplingParams(use_beam_search=True, beam_width=kwargs.pop("beam_width", 2),
                                                   temperature=0, **kwargs))
    with pytest.raises(ValueError, match="max_logprobs"):
        engine.generate([1, 2], SamplingParams(use_beam_search=True, beam_width=8, temperature=0,
                                               stop_token_ids=[5, 6]))


def test_beam_search_stops_at_the_models_own_eos(tmp_path):
    """EOS from the model's generation config ends beams, as in transformers."""
    hf_model = make_tiny_llama(tmp_path, seed=5, eos_token_id=7)
    prompt = _prompt(6)
    with Engine(str(tmp_path), **OPTIONS) as engine:
        greedy = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
        out = engine.generate(prompt, SamplingParams(use_beam_search=True, beam_width=2, n=2, temperature=0,
                                                     max_tokens=12))
    expected, _ = _hf_beams(hf_model, prompt, 2, 2, 12, eos=7)
    assert [c.token_ids for c in out.outputs] == expected
    assert len(greedy.outputs[0].token_ids) == 12
