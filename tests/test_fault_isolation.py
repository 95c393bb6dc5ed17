"""Fault isolation: a request's own fault (its Python logits processor) fails that request only;
a broken sampling strategy is refused at registration or left out by an engine; when the
executor loop itself dies, every caller, in flight or later, hears why."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ENGINE_OPTIONS, random_prompts

from jaxllm import (Engine, EngineDeadError, LogitsProcessorError, RequestError, SamplingParams,
                    register_strategy, registered_strategies, unregister_strategy)
from jaxllm import strategies
from jaxllm.logits_processors import check_result
from jaxllm.strategies import SamplingStrategy, engine_strategies
from jaxllm.strategy_examples import register_examples

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
SEEDED = SamplingParams(temperature=1.0, top_k=20, seed=7, max_tokens=8, ignore_eos=True)


class Boom(Exception):
    pass


def raising_on_call(number: int, on_raise=lambda: None):
    """A processor that passes logits through and raises Boom on its ``number``-th call."""
    calls = []

    def processor(output_token_ids, logits):
        calls.append(len(output_token_ids))
        if len(calls) == number:
            on_raise()
            raise Boom(f"call {number}")
        return logits

    return processor


def _settled_stats(engine, timeout: float = 30.0) -> dict:
    """The engine's stats once no request runs or waits (aborts land at the loop's next turn)."""
    deadline = time.monotonic() + timeout
    while True:
        stats = engine.stats()
        if stats["num_running"] + stats["num_waiting"] == 0 or time.monotonic() > deadline:
            return stats
        time.sleep(0.01)


def _names() -> set[str]:
    return {s.name for s in registered_strategies()}


# ---- Python logits processors ----

def test_raising_processor_fails_its_request_and_the_batch_goes_on(tiny):
    engine, _ = tiny
    prompts = random_prompts([5, 9, 12, 7], seed=21)
    healthy = [GREEDY, SEEDED, GREEDY]
    alone = [engine.generate(p, sp).outputs[0].token_ids for p, sp in zip(prompts[1:], healthy)]
    failed_before = engine.stats()["num_failed_requests"]
    running_when_raised = []
    processor = raising_on_call(3, lambda: running_when_raised.append(len(engine.scheduler.running)))
    faulty = engine.generate_stream(prompts[0], SamplingParams(
        temperature=0, max_tokens=8, ignore_eos=True, logits_processors=[processor]), request_id="faulty")
    streams = [engine.generate_stream(p, sp) for p, sp in zip(prompts[1:], healthy)]
    with pytest.raises(LogitsProcessorError) as err:
        list(faulty)
    message = str(err.value)
    assert isinstance(err.value, RequestError) and isinstance(err.value.__cause__, Boom)
    assert str(err.value.__cause__) == "call 3"
    assert "raising_on_call.<locals>.processor" in message and "'faulty'" in message
    assert "Boom: call 3" in message and len(message) < 200
    assert running_when_raised == [4]          # the faulty row shared its step with the others
    assert [list(s)[-1].outputs[0].token_ids for s in streams] == alone
    stats = engine.stats()
    assert stats["kv_blocks_used"] == 0 and stats["num_failed_requests"] == failed_before + 1
    assert not stats["engine_dead"] and stats["error"] is None
    assert engine.generate(prompts[1], GREEDY).outputs[0].token_ids == alone[0]


@pytest.mark.parametrize("processor, problem", [
    (lambda ids, logits: None, "returned None"),
    (lambda ids, logits: np.full_like(logits, np.nan), "returned NaN at 256 of 256 tokens"),
    (lambda ids, logits: logits[:-1], r"returned shape \(255,\), expected \(256,\)"),
    (lambda ids, logits: logits.astype(np.int32), "returned dtype int32"),
    (lambda ids, logits: np.where(np.arange(256) == 3, np.inf, logits), r"\+inf at 1 tokens"),
    (lambda ids, logits: np.full_like(logits, -np.inf), "banned every token"),
])
def test_bad_processor_return_fails_the_request(tiny, processor, problem):
    engine, _ = tiny
    with pytest.raises(LogitsProcessorError, match=problem):
        engine.generate([1, 2, 3], SamplingParams(max_tokens=4, logits_processors=[processor]))
    assert engine.stats()["kv_blocks_used"] == 0


def test_processor_errors_reach_every_api(tiny):
    engine, _ = tiny
    params = SamplingParams(temperature=1.0, seed=3, n=2, max_tokens=6, ignore_eos=True,
                            logits_processors=[raising_on_call(3)])

    async def consume():
        async for _ in engine.generate_async([3, 4, 5], params):
            pass

    with pytest.raises(LogitsProcessorError) as err:
        asyncio.run(consume())
    assert isinstance(err.value.__cause__, Boom)
    # In a list, the first failure is raised and the call's other requests are aborted.
    with pytest.raises(LogitsProcessorError):
        engine.generate([[1, 2], [6, 7, 8]], [SamplingParams(
            max_tokens=4, logits_processors=[raising_on_call(1)]), GREEDY], use_tqdm=False)
    assert _settled_stats(engine)["kv_blocks_used"] == 0


@pytest.mark.parametrize("row, result, ok", [
    ([0.0, 1.0], [-np.inf, 1.0], True),                    # -inf bans a token
    ([np.inf, 1.0], [np.inf, 1.0], True),                  # +inf kept where it came in
    ([0.0, 1.0], np.array([0.5, 1.0], np.float64), True),  # any float dtype, stored as float32
    ([0.0, 1.0], [0.0, np.nan], False),
    ([0.0, 1.0], "logits", False),
])
def test_processor_results_are_checked(row, result, ok):
    problem, out = check_result(result, np.array(row, np.float32))
    assert (problem is None) == ok
    if ok:
        assert out.dtype == np.float32 and np.array_equal(out, np.asarray(result, np.float32))


# ---- sampling strategies ----

def _raises(logits, args):
    raise RuntimeError("nope")


@pytest.mark.parametrize("fn, problem", [
    (lambda logits, args: logits[:, :-1], r"returned float32\[3, 1023\]"),
    (lambda logits, args: jnp.max(logits, axis=-1, keepdims=True), r"returned float32\[3, 1\]"),
    (lambda logits, args: logits.astype(jnp.bfloat16), r"returned bfloat16\[3, 1024\]"),
    (lambda logits, args: (logits, logits), "returned tuple"),
    (lambda logits, args: logits * args["missing"][:, None], "KeyError"),
    (_raises, "failed on \\[3, 1024\\] float32 logits: RuntimeError: nope"),
])
def test_register_strategy_refuses_a_broken_function(fn, problem):
    with pytest.raises(ValueError, match=problem) as err:
        register_strategy("test_broken", floor=1.0)(fn)
    assert "'test_broken'" in str(err.value)
    assert "test_broken" not in _names()
    if fn is _raises:
        assert isinstance(err.value.__cause__, RuntimeError)


def test_unregister_strategy_removes_it():
    register_strategy("test_floor", floor=-5.0)(
        lambda logits, args: jnp.where(logits >= args["floor"][:, None], logits, -jnp.inf))
    assert "test_floor" in _names()
    unregister_strategy("test_floor")
    assert "test_floor" not in _names()
    with pytest.raises(ValueError, match="no strategy 'test_floor'"):
        unregister_strategy("test_floor")


def _wide_top_k(logits, args):
    """Fine at registration (1024 tokens), fails at the tiny models' 256."""
    kept = jax.lax.top_k(logits, 300)[0][:, -1:]
    return jnp.where(logits >= kept, logits, -jnp.inf)


def test_engine_leaves_out_strategies_that_fail_at_its_shape(tiny_llama_dir, caplog):
    path, _ = tiny_llama_dir
    register_strategy("test_wide_top_k")(_wide_top_k)
    # One that skipped register_strategy's check.
    strategies._REGISTRY["test_poked"] = SamplingStrategy("test_poked", lambda x, a: x[:, :1], ())
    try:
        with caplog.at_level(logging.WARNING, logger="jaxllm.strategies"):
            engine = Engine(str(path), **TINY_ENGINE_OPTIONS)
        with engine:
            warned = " ".join(r.getMessage() for r in caplog.records)
            assert "'test_wide_top_k'" in warned and "'test_poked'" in warned
            assert {"typical", "epsilon", "eta"} <= set(engine.strategies)
            assert not {"test_wide_top_k", "test_poked"} & set(engine.strategies)
            with pytest.raises(ValueError, match="'test_poked' is not served by this engine.*"
                                                 r"float32\[16, 1\]"):
                engine.generate([1, 2, 3], SamplingParams(strategy="test_poked"))
            with pytest.raises(ValueError, match="'test_wide_top_k' is not served"):
                engine.generate([1, 2, 3], SamplingParams(strategy="test_wide_top_k"))
            out = engine.generate([[1, 2, 3], [4, 5]], [GREEDY, SamplingParams(
                strategy="typical", seed=1, max_tokens=8, ignore_eos=True)], use_tqdm=False)
            assert [len(o.outputs[0].token_ids) for o in out] == [8, 8]
            assert not engine.stats()["engine_dead"]
        # Named explicitly, a failing or unknown strategy is an error at Engine().
        with pytest.raises(ValueError, match="'test_wide_top_k' failed on \\[16, 256\\]"):
            Engine(str(path), **TINY_ENGINE_OPTIONS, strategies=["typical", "test_wide_top_k"])
        with pytest.raises(ValueError, match="'no_such' is not registered"):
            Engine(str(path), **TINY_ENGINE_OPTIONS, strategies=["no_such"])
    finally:
        unregister_strategy("test_wide_top_k")
        unregister_strategy("test_poked")


def test_engine_strategies_serves_exactly_those_selected():
    register_examples()
    served, refused = engine_strategies(4, 256, ("epsilon", "typical"))
    in_registry_order = [s.name for s in registered_strategies() if s.name in ("epsilon", "typical")]
    assert list(served) == in_registry_order and not refused
    served, _ = engine_strategies(4, 256, ())
    assert served == {}


# ---- the loop's own failure ----

def test_dead_loop_reaches_callers_in_flight_with_its_cause(tiny_llama_dir):
    path, _ = tiny_llama_dir
    engine = Engine(str(path), **TINY_ENGINE_OPTIONS)
    cause = RuntimeError("device on fire\n" + "x" * 5000)
    dispatch = engine.model_runner.dispatch

    def failing(batch, prepared):
        if len(batch.scheduled) == 3:     # all three callers are in flight
            raise cause
        return dispatch(batch, prepared)

    engine.model_runner.dispatch = failing
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    errors = {}

    def record(name, call):
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - the test inspects whatever arrives
            errors[name] = exc

    async def consume():
        async for _ in engine.generate_async([4, 5, 6], params):
            pass

    stream = engine.generate_stream([7, 8, 9], params)
    calls = {"generate": lambda: engine.generate([1, 2, 3], params),
             "async": lambda: asyncio.run(consume()), "stream": lambda: list(stream)}
    threads = [threading.Thread(target=record, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert set(errors) == set(calls)
    for exc in errors.values():
        assert isinstance(exc, EngineDeadError) and exc.__cause__ is cause
        assert str(exc) == "the engine's executor loop failed: RuntimeError: device on fire..."
    stats = engine.stats()
    assert stats["engine_dead"] and stats["error"] == str(errors["generate"])
    with pytest.raises(EngineDeadError) as later:
        engine.generate([1, 2], params)
    assert later.value.__cause__ is cause and str(later.value) == stats["error"]
    engine.shutdown()
