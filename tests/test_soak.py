"""A soak test of fault isolation, short enough for CI: 500 mixed requests from threads and an
asyncio loop, with random aborts, a faulty logits processor and a request for a broken
strategy among them. Nothing is lost, no KV block leaks, and every healthy request's tokens
equal a clean run's (seeded sampling is batch-independent)."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
from conftest import random_prompts

from jaxllm import LogitsProcessorError, SamplingParams

NUM_REQUESTS = 500
NUM_THREADS = 6


def _params(i: int, rng: np.random.Generator) -> SamplingParams:
    extras = [{}, {"repetition_penalty": 1.2}, {"logit_bias": {5: 3.0, 9: -2.0}}, {"logprobs": 2},
              {"stop_token_ids": [int(rng.integers(0, 256))]}, {"n": 2}, {"min_tokens": 2}]
    return SamplingParams(temperature=float(rng.choice([0.0, 0.9])), seed=i,
                          max_tokens=int(rng.integers(2, 10)), **extras[i % len(extras)])


def _faulty_processor(token_ids, logits):
    if len(token_ids) >= 1:
        raise RuntimeError("soak processor fault")
    return logits


def test_soak_mixed_traffic_with_faults_and_aborts(tiny):
    engine, _ = tiny
    rng = np.random.default_rng(0)
    prompts = random_prompts(rng.integers(2, 40, NUM_REQUESTS), seed=21)
    params = [_params(i, rng) for i in range(NUM_REQUESTS)]
    faulty = set(range(17, NUM_REQUESTS, 97))                       # a processor raising
    broken_strategy = set(range(31, NUM_REQUESTS, 113))             # refused at submission
    aborted_after = {i: int(rng.integers(0, 3)) for i in rng.choice(NUM_REQUESTS, 60, replace=False)
                     if i not in faulty | broken_strategy}
    for i in faulty:
        params[i] = SamplingParams(max_tokens=6, seed=i, logits_processors=[_faulty_processor])
    for i in broken_strategy:
        params[i] = SamplingParams(max_tokens=6, seed=i, strategy="soak_never_registered")
    outcomes: dict[int, object] = {}
    lock = threading.Lock()

    def record(i, value):
        with lock:
            assert i not in outcomes
            outcomes[i] = value

    def run_one_sync(i):
        try:
            stream = engine.generate_stream(prompts[i], params[i], request_id=f"soak-{i}")
        except ValueError as exc:
            return record(i, exc)
        last = None
        try:
            for k, last in enumerate(stream):
                if i in aborted_after and k >= aborted_after[i]:
                    stream.close()                                  # abandon: aborts the request
                    return record(i, ("aborted", last))
        except LogitsProcessorError as exc:
            return record(i, exc)
        record(i, last)

    async def run_one_async(i):
        try:
            agen = engine.generate_async(prompts[i], params[i], request_id=f"soak-{i}")
            last = None
            async for k, last in _enumerate(agen):
                if i in aborted_after and k >= aborted_after[i]:
                    await agen.aclose()
                    return record(i, ("aborted", last))
            record(i, last)
        except (ValueError, LogitsProcessorError) as exc:
            record(i, exc)

    sync_ids = [i for i in range(NUM_REQUESTS) if i % 2 == 0]
    async_ids = [i for i in range(NUM_REQUESTS) if i % 2 == 1]

    def sync_worker(ids):
        for i in ids:
            run_one_sync(i)

    async def async_main():
        await asyncio.gather(*(run_one_async(i) for i in async_ids))

    threads = [threading.Thread(target=sync_worker, args=(sync_ids[w::NUM_THREADS],))
               for w in range(NUM_THREADS)]
    threads.append(threading.Thread(target=lambda: asyncio.run(async_main())))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=500)
    assert not any(t.is_alive() for t in threads)

    assert sorted(outcomes) == list(range(NUM_REQUESTS))            # nobody lost
    for i in faulty:
        assert isinstance(outcomes[i], LogitsProcessorError) and "soak processor fault" in str(
            outcomes[i].__cause__)
    for i in broken_strategy:
        assert isinstance(outcomes[i], ValueError) and "soak_never_registered" in str(outcomes[i])
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_running"] == 0 and stats["num_waiting"] == 0
    assert not stats["engine_dead"]

    healthy = [i for i in range(NUM_REQUESTS) if i not in faulty | broken_strategy]
    clean = engine.generate([prompts[i] for i in healthy], [params[i] for i in healthy], use_tqdm=False)
    num_aborted = 0
    for i, reference in zip(healthy, clean):
        outcome = outcomes[i]
        if isinstance(outcome, tuple):                               # aborted: a prefix so far
            num_aborted += 1
            _, last = outcome
            for got, want in zip(last.outputs, reference.outputs):
                assert want.token_ids[:len(got.token_ids)] == got.token_ids
            continue
        assert outcome.finished
        assert [c.token_ids for c in outcome.outputs] == [c.token_ids for c in reference.outputs], i
    assert num_aborted > 0
    assert engine.stats()["kv_blocks_used"] == 0


async def _enumerate(agen):
    k = 0
    async for item in agen:
        yield k, item
        k += 1
