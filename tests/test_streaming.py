"""Streaming, async, abort and many concurrent callers on a tiny random model."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from jaxllm import SamplingParams
from jaxllm.sampling_params import RequestOutputKind


@pytest.fixture
def engine(tiny):
    return tiny[0]


def _params(max_tokens=10, **kwargs):
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def _assert_idle(engine):
    stats = engine.stats()
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert stats["kv_blocks_used"] == 0


def test_stream_cumulative_grows_token_by_token_and_ends_as_generate(engine):
    prompt = [3, 1, 4, 1, 5]
    outputs = list(engine.generate_stream(prompt, _params()))
    final = engine.generate(prompt, _params())
    assert [len(o.outputs[0].token_ids) for o in outputs] == list(range(1, 11))
    assert [o.finished for o in outputs] == [False] * 9 + [True]
    assert outputs[-1].outputs[0].token_ids == final.outputs[0].token_ids
    for earlier, later in zip(outputs, outputs[1:]):
        assert later.outputs[0].token_ids[:-1] == earlier.outputs[0].token_ids


def test_stream_delta_concatenates_to_final(engine):
    prompt = [2, 7, 1, 8]
    deltas = list(engine.generate_stream(prompt, _params(output_kind=RequestOutputKind.DELTA)))
    tokens = [t for o in deltas for t in o.outputs[0].token_ids]
    assert tokens == engine.generate(prompt, _params()).outputs[0].token_ids
    assert all(len(o.outputs[0].token_ids) == 1 for o in deltas)


def test_stream_final_only_sends_one_output(engine):
    outputs = list(engine.generate_stream([1, 2], _params(output_kind=RequestOutputKind.FINAL_ONLY)))
    assert len(outputs) == 1 and outputs[0].finished


def test_abort_mid_stream_frees_blocks(engine):
    stream = engine.generate_stream([5, 6, 7], _params(max_tokens=80), request_id="to-abort")
    first = [next(stream), next(stream)]
    engine.abort("to-abort")
    rest = list(stream)
    assert rest and rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
    assert len(rest[-1].outputs[0].token_ids) < 80
    assert first[0].request_id == "to-abort"
    assert engine.generate([1], _params(max_tokens=2)).finished
    _assert_idle(engine)


def test_closing_a_stream_early_aborts_it(engine):
    stream = engine.generate_stream([9, 9, 9], _params(max_tokens=80))
    next(stream)
    stream.close()
    assert engine.generate([1], _params(max_tokens=2)).finished
    _assert_idle(engine)


def test_duplicate_request_id_in_flight_is_rejected(engine):
    stream = engine.generate_stream([1, 2, 3], _params(max_tokens=40), request_id="dup")
    next(stream)
    with pytest.raises(ValueError, match="dup"):
        engine.generate_stream([1, 2, 3], _params(), request_id="dup")
    stream.close()


def test_generate_async_matches_sync_for_concurrent_coroutines(engine):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, n).tolist() for n in (2, 9, 17, 30)]

    async def collect(prompt):
        outputs = [o async for o in engine.generate_async(prompt, _params())]
        assert outputs[-1].finished and not any(o.finished for o in outputs[:-1])
        return outputs[-1].outputs[0].token_ids

    async def main():
        return await asyncio.gather(*(collect(p) for p in prompts))

    got = asyncio.run(main())
    assert got == [o.outputs[0].token_ids for o in engine.generate(prompts, _params(), use_tqdm=False)]


def test_cancelled_async_consumer_aborts_its_request(engine):
    async def main():
        agen = engine.generate_async([4, 4, 4], _params(max_tokens=80))
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(main())
    assert engine.generate([1], _params(max_tokens=2)).finished
    _assert_idle(engine)


def test_200_requests_from_8_threads_and_an_event_loop_all_finish(engine):
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, 256, int(n)).tolist() for n in rng.integers(1, 40, 200)]
    lengths = [int(n) for n in rng.integers(1, 12, 200)]
    results: dict[int, list[int]] = {}
    lock = threading.Lock()

    def worker(indices):
        for i in indices:
            out = engine.generate(prompts[i], _params(max_tokens=lengths[i]))
            with lock:
                results[i] = out.outputs[0].token_ids

    async def async_part(indices):
        async def one(i):
            final = None
            async for final in engine.generate_async(prompts[i], _params(max_tokens=lengths[i])):
                pass
            results[i] = final.outputs[0].token_ids
        await asyncio.gather(*(one(i) for i in indices))

    threads = [threading.Thread(target=worker, args=(range(k, 160, 8),)) for k in range(8)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_part(range(160, 200)))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert sorted(results) == list(range(200))
    assert all(len(results[i]) == lengths[i] for i in range(200))
    _assert_idle(engine)


def test_outputs_of_a_step_go_out_while_the_next_step_runs(engine):
    """Host/device overlap: step N+1 is dispatched before step N's tokens are fetched (the
    device feeds the new token back itself), and step N's news goes out while N+1 runs."""
    events = []
    runner, executor = engine.model_runner, engine._executor
    dispatch, fetch, deliver = runner.dispatch, runner.fetch, executor._deliver

    def logged(name, fn):
        def wrapper(*args):
            events.append(name)
            return fn(*args)
        return wrapper

    runner.dispatch, runner.fetch = logged("dispatch", dispatch), logged("fetch", fetch)
    executor._deliver = logged("deliver", deliver)
    try:
        outputs = list(engine.generate_stream([1, 2, 3, 4], _params(max_tokens=6)))
    finally:
        del runner.dispatch, runner.fetch, executor._deliver
    assert len(outputs) == 6 and outputs[-1].finished
    steps = "".join({"dispatch": "D", "fetch": "F", "deliver": "d"}[e] for e in events)
    # The prefill step, then 5 decode steps each dispatched before the previous step's fetch
    # and delivery; 6 tokens in 6 steps (the last token is known to be the last: no 7th step).
    assert steps == "D" + "DFd" * 5 + "Fd"
    stats = engine.stats()
    assert stats["overlapped_host_time_s"] > 0 and stats["device_time_s"] > 0
    assert stats["device_wait_time_s"] > 0
