"""OutputProcessor: sequences in, RequestOutputs out (final only, cumulative, delta), by hand.

Stop strings have their own file (test_stop_strings.py); this one covers what every request
gets: text and token ids as the output kind asks, logprobs, prompt logprobs, n > 1
completions, the hidden EOS text, and forgetting a request once its final output is made.
"""

from __future__ import annotations

import pytest

from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import Logprob
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.sequence import Request, Sequence, SequenceStatus

EOS = 0


class LetterTokenizer:
    """Token i decodes to the i-th letter ("a" is 1); EOS is special and decodes to "<eos>"."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join("<eos>" if i == EOS else chr(ord("a") + i - 1)
                       for i in ids if not (skip_special_tokens and i == EOS))


def _setup(kind, tokenizer=LetterTokenizer(), **params):
    params = SamplingParams(**{"temperature": 0, "max_tokens": 8, **params})
    request = Request("r", "prompt", (1, 2), params, 0, frozenset({EOS}), 0.0)
    processor = OutputProcessor(tokenizer)
    processor.add(request, kind)
    return processor, Sequence.from_request(request)


def _sample(seq, *tokens, logprob=-0.5):
    for token in tokens:
        seq.token_ids.append(token)
        seq.output_logprobs.append(logprob)
        seq.output_top_logprobs.append({token: Logprob(logprob, rank=1)})


def _finish(seq, reason):
    seq.status, seq.finish_reason = SequenceStatus.FINISHED, reason


def test_final_only_sends_one_output_then_forgets_the_request():
    processor, seq = _setup(RequestOutputKind.FINAL_ONLY)
    _sample(seq, 3, 4)
    assert processor.make_output([seq], finished=False) is None
    _sample(seq, 5)
    _finish(seq, "length")
    output = processor.make_output([seq], finished=True)
    assert (output.request_id, output.prompt, output.prompt_token_ids) == ("r", "prompt", [1, 2])
    completion, = output.outputs
    assert (completion.text, completion.token_ids, completion.finish_reason) == ("cde", [3, 4, 5], "length")
    assert completion.cumulative_logprob == pytest.approx(-1.5) and completion.logprobs is None
    assert output.finished and processor.make_output([seq], finished=True) is None


def test_cumulative_outputs_grow():
    processor, seq = _setup(RequestOutputKind.CUMULATIVE)
    texts = []
    for token in (3, 4, 5):
        _sample(seq, token)
        texts.append(processor.make_output([seq], finished=False).outputs[0].text)
    assert texts == ["c", "cd", "cde"]
    _finish(seq, "length")
    final = processor.make_output([seq], finished=True).outputs[0]
    assert (final.text, final.token_ids) == ("cde", [3, 4, 5])
    assert final.cumulative_logprob == pytest.approx(-1.5)


def test_delta_outputs_carry_only_news():
    processor, seq = _setup(RequestOutputKind.DELTA, logprobs=0)
    _sample(seq, 3, 4)
    first = processor.make_output([seq], finished=False).outputs[0]
    assert (first.text, first.token_ids) == ("cd", [3, 4])
    assert processor.make_output([seq], finished=False) is None      # nothing new
    _sample(seq, 5)
    second = processor.make_output([seq], finished=False).outputs[0]
    assert (second.text, second.token_ids) == ("e", [5])
    assert second.logprobs == [{5: Logprob(-0.5, rank=1)}]
    assert second.cumulative_logprob == pytest.approx(-1.5)           # of the whole completion
    _finish(seq, "abort")
    last = processor.make_output([seq], finished=True).outputs[0]
    assert (last.text, last.token_ids, last.finish_reason) == ("", [], "abort")


@pytest.mark.parametrize("kind, expected", [(RequestOutputKind.CUMULATIVE, [True, True]),
                                            (RequestOutputKind.DELTA, [True, False])])
def test_prompt_logprobs_go_with_every_output_but_only_the_first_delta(kind, expected):
    processor, seq = _setup(kind, prompt_logprobs=0)
    seq.prompt_logprobs.append({2: Logprob(-1.25, rank=3)})
    sent = []
    for finished in (False, True):
        _sample(seq, 3)
        if finished:
            _finish(seq, "length")
        output = processor.make_output([seq], finished)
        sent.append(output.prompt_logprobs is not None)
        if output.prompt_logprobs is not None:
            assert output.prompt_logprobs == [None, {2: Logprob(-1.25, rank=3)}]
    assert sent == expected


def test_the_text_of_the_eos_that_ended_generation_is_hidden():
    processor, seq = _setup(RequestOutputKind.FINAL_ONLY, skip_special_tokens=False)
    _sample(seq, 3, EOS)
    _finish(seq, "stop")
    completion = processor.make_output([seq], finished=True).outputs[0]
    assert (completion.text, completion.token_ids) == ("c", [3, EOS])
    # Run to length instead, the same token's text is shown.
    processor, seq = _setup(RequestOutputKind.FINAL_ONLY, skip_special_tokens=False)
    _sample(seq, 3, EOS)
    _finish(seq, "length")
    assert processor.make_output([seq], finished=True).outputs[0].text == "c<eos>"


def test_without_a_tokenizer_outputs_have_token_ids_and_no_text():
    processor, seq = _setup(RequestOutputKind.CUMULATIVE, tokenizer=None)
    _sample(seq, 3, 4)
    completion = processor.make_output([seq], finished=False).outputs[0]
    assert (completion.text, completion.token_ids) == ("", [3, 4])


def test_n_completions_are_reported_together_by_index():
    processor, first = _setup(RequestOutputKind.DELTA, n=2, temperature=1.0)
    second = first.fork(1, list(first.token_ids))
    _sample(first, 3)
    _sample(second, 4, 5)
    output = processor.make_output([first, second], finished=False)
    assert [(c.index, c.text) for c in output.outputs] == [(0, "c"), (1, "de")]
    _sample(second, 6)
    output = processor.make_output([first, second], finished=False)
    assert [(c.index, c.token_ids) for c in output.outputs] == [(1, [6])]   # only the news


def test_unknown_requests_get_no_output():
    processor, seq = _setup(RequestOutputKind.FINAL_ONLY)
    stranger = Sequence.from_request(Request("other", None, (1,), SamplingParams(), 0, frozenset(), 0.0))
    _finish(stranger, "length")
    assert processor.make_output([stranger], finished=True) is None
    assert processor.check_stop(stranger) is None
