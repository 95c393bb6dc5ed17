"""Aborts as vLLM reports them, through the real engine: exactly n completions (those never
started empty, ``finish_reason="abort"``), and an aborted beam search's n best beams so far,
best first, whether the abort comes from ``abort()``, a KeyboardInterrupt or a closed stream."""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import random_prompts
from test_postprocess import EOS, Host, _request, _top

from jaxllm import RequestOutputKind, SamplingParams
from jaxllm.request_handle import RequestHandle


def _params(max_tokens=30, **kwargs):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _assert_idle(engine):
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0 and stats["kv_blocks_used"] == 0


def _wait_for(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_n2_aborted_before_its_prompt_ran_reports_two_empty_completions(tiny):
    engine, _ = tiny
    # Fill every sequence slot, so the n=2 request waits behind them until it is aborted.
    slots = engine.config.max_num_seqs
    busy = [engine.generate_stream(p, _params()) for p in random_prompts([2] * slots, seed=3)]
    for stream in busy:
        assert len(next(stream).outputs[0].token_ids) == 1   # running
    waiting = engine.generate_stream([5, 6, 7], _params(n=2), request_id="waiting-n2")
    engine.abort("waiting-n2")
    outputs = list(waiting)
    assert len(outputs) == 1 and outputs[0].finished
    assert [(c.index, c.token_ids, c.text, c.finish_reason) for c in outputs[0].outputs] == [
        (0, [], "", "abort"), (1, [], "", "abort")]
    for stream in busy:   # the others are untouched
        final = list(stream)[-1]
        assert final.outputs[0].finish_reason == "length" and len(final.outputs[0].token_ids) == 30
    _assert_idle(engine)


def test_n2_aborted_mid_stream_reports_both_completions_so_far(tiny):
    engine, _ = tiny
    stream = engine.generate_stream([9, 8, 7], _params(max_tokens=60, n=2), request_id="mid-n2")
    for output in stream:
        if len(output.outputs) == 2 and all(c.token_ids for c in output.outputs):
            break
    engine.abort("mid-n2")
    final = list(stream)[-1]
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    assert all(c.finish_reason == "abort" and 0 < len(c.token_ids) < 60 for c in final.outputs)
    _assert_idle(engine)


def test_keyboard_interrupt_in_generate_aborts_with_n_completions(tiny, monkeypatch):
    """A notebook's stop button: generate raises, and its aborted request still ends with n
    completions (read here from the handle the interrupted caller left)."""
    engine, _ = tiny
    interrupted = []

    def interrupt(self):
        interrupted.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(RequestHandle, "result", interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([4, 5, 6], _params(max_tokens=60, n=2), use_tqdm=False)
    monkeypatch.undo()
    final = interrupted[0].result()
    assert final.finished and len(final.outputs) == 2
    assert all(c.finish_reason == "abort" for c in final.outputs)
    _assert_idle(engine)


def test_a_disconnected_async_consumer_of_n2_frees_every_completion(tiny):
    engine, _ = tiny

    async def disconnect():
        agen = engine.generate_async([1, 2, 3], _params(max_tokens=60, n=2))
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(disconnect())
    _wait_for(lambda: engine.stats()["num_running"] == 0)
    _assert_idle(engine)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_aborted_beam_search_reports_the_n_best_beams_so_far_best_first(tiny, n):
    engine, _ = tiny
    params = _params(max_tokens=60, use_beam_search=True, beam_width=3, n=n,
                     output_kind=RequestOutputKind.FINAL_ONLY)
    stream = engine.generate_stream([3, 1, 4, 1, 5], params, request_id=f"beams-{n}")
    # Three running beams, and a few steps done with them.
    _wait_for(lambda: engine.stats()["num_running"] == 3)
    steps = engine.stats()["num_steps"]
    _wait_for(lambda: engine.stats()["num_steps"] >= steps + 3)
    engine.abort(f"beams-{n}")
    outputs = list(stream)
    assert len(outputs) == 1 and outputs[0].finished
    beams = outputs[0].outputs
    assert len(beams) == n and [c.index for c in beams] == list(range(n))
    assert all(c.finish_reason == "abort" for c in beams)   # no EOS: every beam was running
    lengths = {len(c.token_ids) for c in beams}
    assert len(lengths) == 1 and 3 <= lengths.pop() < 60
    scores = [c.cumulative_logprob for c in beams]
    assert scores == sorted(scores, reverse=True)
    assert len({tuple(c.token_ids) for c in beams}) == n
    _assert_idle(engine)


def test_aborted_beam_search_ranks_finished_hypotheses_with_running_beams():
    """A hypothesis that ended on EOS outranks the running beams that score worse (vLLM ranks
    every beam of an aborted search by its beam score: logprob / length ** length_penalty)."""
    host = Host()
    first = host.add(_request(use_beam_search=True, beam_width=2, n=2))
    host.step(top={0: _top((EOS, -0.1), (8, -0.5), (9, -0.7), (10, -3.0))})
    assert [b.output_token_ids for b in first.group.seqs] == [[8], [9]]
    host.postprocessor.abort("r")
    output = host.report(first)
    assert [(c.index, c.token_ids, c.finish_reason) for c in output.outputs] == [
        (0, [EOS], "stop"), (1, [8], "abort")]
    assert [c.cumulative_logprob for c in output.outputs] == pytest.approx([-0.1, -0.5])


def test_aborted_beam_search_puts_a_long_running_beam_above_a_worse_hypothesis():
    host = Host()
    first = host.add(_request(use_beam_search=True, beam_width=2, n=2, length_penalty=1.0))
    host.step(top={0: _top((8, -0.1), (EOS, -1.5), (9, -2.0), (10, -3.0))})
    # Beam [8] runs on; EOS at rank 1 (< width) finished a hypothesis scoring -1.5.
    host.step(top={0: _top((11, -0.2), (12, -0.4), (EOS, -5.0), (13, -6.0)),
                   1: _top((14, -4.0), (15, -5.0), (EOS, -6.0), (16, -7.0))})
    host.postprocessor.abort("r")
    output = host.report(first)
    # Running [8, 11]: -0.3 / 2 = -0.15 and [8, 12]: -0.5 / 2 = -0.25, both above -1.5.
    assert [(c.token_ids, c.finish_reason) for c in output.outputs] == [([8, 11], "abort"),
                                                                        ([8, 12], "abort")]
