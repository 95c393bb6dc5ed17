"""Beam search with min_tokens equals transformers' ``generate(num_beams=..., min_new_tokens=...)``:
EOS (here a stop token id) is masked in every beam's candidates until min_tokens are out."""

from __future__ import annotations

import pytest
from conftest import random_prompts

from jaxllm import SamplingParams


def hf_beams(hf_model, prompt, width, n, max_tokens, eos, min_tokens, length_penalty):
    """transformers' best n beams (EOS padding dropped) and their scores."""
    import torch

    out = hf_model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=n, do_sample=False,
                            max_new_tokens=max_tokens, min_new_tokens=min_tokens, eos_token_id=eos,
                            length_penalty=length_penalty,
                            pad_token_id=eos, return_dict_in_generate=True, output_scores=True)
    rows = [row[:row.index(eos) + 1] if eos in row else row
            for row in out.sequences[:, len(prompt):].tolist()]
    return rows, out.sequences_scores.tolist()


# A negative length penalty favours short hypotheses, so min_tokens changes which ones win.
@pytest.mark.parametrize("width, n, min_tokens, length_penalty", [(3, 3, 4, -1.0), (2, 1, 6, -0.5),
                                                                  (4, 2, 3, -1.0)])
def test_beam_search_min_tokens_equals_transformers(tiny, width, n, min_tokens, length_penalty):
    engine, hf_model = tiny
    prompt = random_prompts([10], seed=9)[0]
    params = dict(use_beam_search=True, beam_width=width, n=n, temperature=0, max_tokens=12, ignore_eos=True,
                  length_penalty=length_penalty)
    best = engine.generate(prompt, SamplingParams(**params)).outputs[0].token_ids
    eos = best[1]                        # as EOS, it ends the best beam at 2 tokens
    params["stop_token_ids"] = [eos]
    out = engine.generate(prompt, SamplingParams(min_tokens=min_tokens, **params))
    expected, scores = hf_beams(hf_model, prompt, width, n, 12, eos, min_tokens, length_penalty)
    assert [c.token_ids for c in out.outputs] == expected
    for completion, score in zip(out.outputs, scores):
        length = len(completion.token_ids)
        assert completion.cumulative_logprob / length ** length_penalty == pytest.approx(score, abs=1e-4)
    assert all(eos not in c.token_ids[:min_tokens] for c in out.outputs)
    # Without min_tokens a 2-token hypothesis wins: the mask is what made the difference.
    unmasked = [c.token_ids for c in engine.generate(prompt, SamplingParams(**params)).outputs]
    assert unmasked == hf_beams(hf_model, prompt, width, n, 12, eos, 0, length_penalty)[0]
    assert best[:2] in unmasked and unmasked != expected
    assert engine.stats()["kv_blocks_used"] == 0
