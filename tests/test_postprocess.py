"""The Postprocessor on hand-made step results: no model, no executor thread.

Each step is scheduled and advanced by a real Scheduler as the executor does, and the row
results are written by hand, so every stop decision, fork and abort can be checked exactly.
"""

from __future__ import annotations

import pytest

from jaxllm.groups import child_seed, completions_to_report, new_sequence
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import Logprob
from jaxllm.postprocess import Postprocessor, finish_reason
from jaxllm.row_results import RowResults
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request, Sequence

EOS = 0


class CharTokenizer:
    """Token i decodes to chr(ord('a') + i - 1); token 0 (EOS) is special."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(ord("a") + i - 1) for i in ids if not (skip_special_tokens and i == EOS))


def _request(request_id="r", prompt=(1, 2, 3), seed=0, **params) -> Request:
    params = SamplingParams(**{"temperature": 0, "max_tokens": 8, **params})
    return Request(request_id, None, tuple(prompt), params, seed, frozenset({EOS}), 0.0)


class Host:
    """A scheduler, an output processor and the Postprocessor between them."""

    def __init__(self, num_blocks=32, block_size=4, max_model_len=64, tokenizer=None):
        self.scheduler = Scheduler(KVCacheManager(num_blocks, block_size), 8, 64)
        self.kv = self.scheduler.kv_cache_manager
        self.output_processor = OutputProcessor(tokenizer)
        self.postprocessor = Postprocessor(self.scheduler, self.output_processor, max_model_len)

    def add(self, request: Request) -> Sequence:
        self.output_processor.add(request, RequestOutputKind.FINAL_ONLY)
        seq = new_sequence(request)
        self.scheduler.add(seq)
        return seq

    def dispatch(self):
        batch = self.scheduler.schedule()
        self.scheduler.advance(batch)
        return batch

    def process(self, batch, tokens=None, top=None, prompt_logprobs=None):
        """Rows sample ``tokens[row]`` (default 7) with logprob -0.5."""
        tokens = tokens or [7] * len(batch.scheduled)
        return self.postprocessor.process(
            batch, RowResults(list(tokens), [-0.5] * len(tokens), top or {}, prompt_logprobs or {}))

    def step(self, tokens=None, top=None):
        return self.process(self.dispatch(), tokens, top)

    def report(self, seq):
        seqs, finished = completions_to_report(seq)
        return self.output_processor.make_output(seqs, finished)


def _seq_with_outputs(output_ids, max_model_len=64, processor=None, **params):
    request = _request(**params)
    seq = Sequence.from_request(request)
    seq.token_ids += output_ids
    return finish_reason(seq, processor or OutputProcessor(None), max_model_len)


@pytest.mark.parametrize("output_ids, params, expected", [
    ([5, EOS], {}, ("stop", None)),
    ([5, EOS], {"ignore_eos": True}, None),
    ([EOS], {"min_tokens": 1}, None),                          # EOS counts after min_tokens
    ([5, EOS], {"min_tokens": 1}, ("stop", None)),
    ([5, 9], {"stop_token_ids": [9]}, ("stop", 9)),
    ([9], {"stop_token_ids": [9], "min_tokens": 1}, None),
    ([5, 6], {"max_tokens": 2}, ("length", None)),
    ([5, EOS], {"max_tokens": 2}, ("stop", None)),             # a stop at max_tokens is a stop
    ([5, 6, 7], {"max_tokens": 2}, ("length", None)),
])
def test_finish_reason_without_text(output_ids, params, expected):
    assert _seq_with_outputs(output_ids, **params) == expected


def test_finish_reason_at_max_model_len():
    assert _seq_with_outputs([5], max_model_len=5) is None
    assert _seq_with_outputs([5, 6], max_model_len=5) == ("length", None)


def test_finish_reason_stop_string_beats_length():
    processor = OutputProcessor(CharTokenizer())
    request = _request(stop=["bc"], max_tokens=2)
    processor.add(request, RequestOutputKind.FINAL_ONLY)
    seq = Sequence.from_request(request)
    seq.token_ids += [2, 3]                                    # "bc"
    assert finish_reason(seq, processor, 64) == ("stop", "bc")


def test_process_appends_tokens_and_finishes_through_the_scheduler():
    host = Host()
    stops, runs = host.add(_request("stops", (1, 2))), host.add(_request("runs", (3,)))
    news = host.step([5, 6])                                   # both prefills sample
    assert [s.request_id for s in news.seqs] == ["stops", "runs"] and news.num_new_tokens == 2
    news = host.step([EOS, 7])
    assert stops.is_finished and (stops.finish_reason, stops.stop_reason) == ("stop", None)
    assert stops.block_ids == [] and not runs.is_finished
    assert runs.output_token_ids == [6, 7] and runs.output_logprobs == [-0.5, -0.5]
    assert runs.num_pending_tokens == 0 and runs.num_computed_tokens == 2
    assert runs.metrics.num_generated_tokens == 2 and runs.metrics.first_token_time is not None
    assert host.scheduler.running == [runs]


def test_rows_of_a_sequence_that_stopped_meanwhile_are_dropped():
    """Async scheduling: the next step is dispatched before this one's token is known; when
    that token ends the sequence, its row in the next step is wasted, its token dropped."""
    host = Host()
    seq = host.add(_request(prompt=(1, 2, 3)))
    first = host.dispatch()
    second = host.dispatch()                                   # computes the pending token
    assert [i.num_new_tokens for i in second.scheduled] == [1] and seq.num_pending_tokens == 2
    host.process(first, [EOS])
    assert seq.is_finished and seq.num_pending_tokens == 0
    news = host.process(second, [9])
    assert news.seqs == [] and news.num_new_tokens == 0
    assert seq.output_token_ids == [EOS] and host.kv.num_used_blocks == 0


def test_blocks_filled_by_the_last_step_are_cached():
    host = Host(block_size=4)
    host.add(_request("one", tuple(range(1, 10)), max_tokens=1))
    host.step()
    assert host.kv.num_used_blocks == 0 and host.kv.num_cached_blocks == 2
    again = host.add(_request("again", tuple(range(1, 10)), max_tokens=1))
    host.dispatch()
    assert again.metrics.num_cached_tokens == 8


def test_prompt_logprobs_are_taken_once_per_position():
    host = Host()
    seq = host.add(_request(prompt=(1, 2, 3), prompt_logprobs=0))
    entries = [(1, {2: Logprob(-1.0, 1)}), (2, {3: Logprob(-2.0, 1)})]
    batch = host.dispatch()
    host.process(batch, prompt_logprobs={0: entries})
    host.process(batch, prompt_logprobs={0: entries})          # a recompute sends them again
    assert seq.prompt_logprobs == [e for _, e in entries]


def test_n_completions_fork_off_the_first_once_its_prompt_is_computed():
    host = Host(block_size=4)
    first = host.add(_request(prompt=(1, 2, 3, 4, 5, 6), n=3, seed=11, temperature=1.0))
    news = host.step([20])
    group = first.group
    children = group.seqs[1:]
    assert news.seqs == [first] and [s.index for s in group.seqs] == [0, 1, 2]
    assert [c.request.seed for c in children] == [child_seed(11, 1), child_seed(11, 2)]
    for child in children:
        # The prompt only, sharing its blocks; the last prompt token is computed again.
        assert child.token_ids == [1, 2, 3, 4, 5, 6] and child.output_logprobs == []
        assert child.block_ids == first.block_ids[:2] and child.num_computed_tokens == 5
        assert child in host.scheduler.running
    assert [host.kv.ref_count(b) for b in first.block_ids] == [3, 3]
    batch = host.dispatch()
    assert [i.num_new_tokens for i in batch.scheduled] == [1, 1, 1]
    assert len(batch.block_copies) == 2                        # copy-on-write of the shared tail
    host.process(batch, [21, 30, 40])
    assert [s.output_token_ids for s in group.seqs] == [[20, 21], [30], [40]]


def test_abort_before_the_prompt_ran_reports_n_empty_completions():
    host = Host()
    first = host.add(_request(n=2, temperature=1.0))
    assert host.postprocessor.abort("r") is first
    output = host.report(first)
    assert output.finished and [c.index for c in output.outputs] == [0, 1]
    assert all(c.token_ids == [] and c.finish_reason == "abort" for c in output.outputs)
    assert host.postprocessor.abort("r") is None and host.postprocessor.abort("unknown") is None


def test_abort_keeps_the_finish_reason_of_completions_already_done():
    host = Host()
    first = host.add(_request(n=2, temperature=1.0, max_tokens=3))
    host.step([5])
    host.step([EOS, 6])                                        # completion 0 stops, 1 runs on
    host.postprocessor.abort("r")
    output = host.report(first)
    assert [(c.token_ids, c.finish_reason) for c in output.outputs] == [([5, EOS], "stop"), ([6], "abort")]
    assert host.kv.num_used_blocks == 0


def _top(*candidates):
    """A row's top logprobs: (token id, logprob) pairs, best first."""
    return {t: Logprob(lp, rank=i + 1) for i, (t, lp) in enumerate(candidates)}


def test_beam_search_steps_fork_and_drop_beams_through_the_scheduler():
    host = Host(block_size=4)
    first = host.add(_request(prompt=(1, 2, 3, 4, 5), use_beam_search=True, beam_width=2, n=2,
                              max_tokens=4, ignore_eos=True))
    host.step(top={0: _top((7, -0.1), (8, -0.2), (9, -3.0), (10, -4.0))})
    group = first.group
    assert [(b.output_token_ids, b.index) for b in group.seqs] == [([7], 0), ([8], 1)]
    second = group.seqs[1]
    assert second.block_ids[:1] == first.block_ids[:1] and second.num_computed_tokens == 5
    # Both continuations of beam 0 beat beam 1's: beam 1 is dropped, beam 0 forks.
    news = host.step(top={0: _top((11, -0.1), (12, -0.2), (13, -5.0), (14, -6.0)),
                          1: _top((15, -4.0), (16, -5.0), (17, -6.0), (18, -7.0))})
    assert news.seqs == [second] and news.num_new_tokens == 2
    assert second.is_finished and second.block_ids == []
    assert [b.output_token_ids for b in group.seqs] == [[7, 11], [7, 12]]
    assert group.seqs[0] is first and group.final is None
    host.postprocessor.abort("r")
    output = host.report(first)
    assert [c.token_ids for c in output.outputs] == [[7, 11], [7, 12]]
    assert [c.finish_reason for c in output.outputs] == ["abort", "abort"]
    assert host.kv.num_used_blocks == 0


def test_beam_search_waits_for_every_beam_and_reports_once_at_the_end():
    host = Host()
    first = host.add(_request(prompt=(1, 2), use_beam_search=True, beam_width=2, max_tokens=2,
                              ignore_eos=True))
    host.step(top={0: _top((7, -0.1), (8, -0.2), (9, -3.0), (10, -4.0))})
    beams = list(first.group.seqs)
    batch = host.dispatch()
    news = host.process(batch, top={0: _top((11, -0.1), (12, -0.2), (13, -5.0), (14, -6.0)),
                                    1: _top((15, -0.3), (16, -5.0), (17, -6.0), (18, -7.0))})
    assert news.seqs == [beams[1]] and all(b.is_finished for b in beams)
    output = host.report(first)
    assert output.finished and [c.token_ids for c in output.outputs] == [[7, 11]]
    assert output.outputs[0].finish_reason == "length"


def test_beam_search_abort_before_the_prompt_ran_reports_n_empty_completions():
    host = Host()
    first = host.add(_request(use_beam_search=True, beam_width=3, n=2))
    host.postprocessor.abort("r")
    output = host.report(first)
    assert [(c.index, c.token_ids, c.finish_reason) for c in output.outputs] == [(0, [], "abort"),
                                                                                 (1, [], "abort")]


def test_beam_search_abort_reports_the_best_n_running_beams_best_first():
    host = Host()
    first = host.add(_request(use_beam_search=True, beam_width=3, n=1, ignore_eos=True))
    host.step(top={0: _top((8, -0.1), (9, -0.2), (7, -0.3), (10, -4.0), (11, -5.0), (12, -6.0))})
    assert [b.output_token_ids for b in first.group.seqs] == [[8], [9], [7]]
    host.postprocessor.abort("r")
    output = host.report(first)
    assert [(c.token_ids, c.finish_reason) for c in output.outputs] == [([8], "abort")]
    assert output.outputs[0].cumulative_logprob == pytest.approx(-0.1)

