"""The executor loop with a fake, hand-calculable model: next token = (last token + 1) % 100.

No jax and no model: this checks the loop's bookkeeping (chunked prefill, preemption, stop
conditions, streaming order) against answers computed by hand.
"""

from __future__ import annotations

import threading
import time

import pytest

from jaxllm.executor import EngineDeadError, Executor
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.output_processor import OutputProcessor
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request

from conftest import FakeModelRunner


class FakeRunner(FakeModelRunner):
    """Stands in for ModelRunner: 'computes' each row's next token from its last token.

    Like the device, it takes a token the host has not seen yet (the sequence's pending token)
    from the previous step's outputs.
    """

    def __init__(self):
        self.batches = []
        self.last_tokens = []

    def prepare_inputs(self, batch, previous=None):
        return {id(item.seq): token for item, token in zip(previous.scheduled, self.last_tokens)} if previous else {}

    def dispatch(self, batch, fed_back):
        self.batches.append([(item.seq.request_id, item.num_new_tokens) for item in batch.scheduled])
        lasts = [item.start + item.num_new_tokens - 1 for item in batch.scheduled]
        self.last_tokens = [((item.seq.token_ids[last] if last < item.seq.num_tokens else fed_back[id(item.seq)]) + 1) % 100
                            for item, last in zip(batch.scheduled, lasts)]
        return self.last_tokens


def _executor(num_blocks=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=16):
    runner = FakeRunner()
    scheduler = Scheduler(KVCacheManager(num_blocks, block_size, enable_prefix_caching=False),
                          max_num_seqs, max_num_batched_tokens)
    return Executor(scheduler, runner, OutputProcessor(None), max_model_len=200), runner


def _request(request_id, prompt, eos=(), **params):
    return Request(request_id, None, tuple(prompt), SamplingParams(temperature=0, **params), 0,
                   frozenset(eos), time.monotonic())


def test_executor_chunked_prefill_then_decodes_by_hand():
    executor, runner = _executor(max_num_batched_tokens=8)
    try:
        out = executor.submit(_request("a", range(20), max_tokens=3)).result()
    finally:
        executor.shutdown()
    assert out.outputs[0].token_ids == [20, 21, 22]
    assert out.outputs[0].cumulative_logprob == pytest.approx(-1.5)
    assert runner.batches == [[("a", 8)], [("a", 8)], [("a", 4)], [("a", 1)], [("a", 1)]]


def test_executor_stop_conditions():
    executor, _ = _executor()
    try:
        handles = executor.submit_all([
            _request("eos", [5], eos={8}, max_tokens=10),
            _request("ignore", [5], eos={8}, ignore_eos=True, max_tokens=5),
            _request("stop-id", [5], stop_token_ids=[7], max_tokens=10),
            _request("length", [95], max_tokens=6),
        ])
        outs = {h.request.request_id: h.result() for h in handles}
    finally:
        executor.shutdown()
    assert outs["eos"].outputs[0].token_ids == [6, 7, 8]
    assert (outs["eos"].outputs[0].finish_reason, outs["eos"].outputs[0].stop_reason) == ("stop", None)
    assert outs["ignore"].outputs[0].token_ids == [6, 7, 8, 9, 10]
    assert outs["ignore"].outputs[0].finish_reason == "length"
    assert outs["stop-id"].outputs[0].token_ids == [6, 7]
    assert outs["stop-id"].outputs[0].stop_reason == 7
    assert outs["length"].outputs[0].token_ids == [96, 97, 98, 99, 0, 1]


def test_executor_preemption_keeps_every_answer():
    # 6 usable blocks of 4 tokens; four requests each growing to 12 tokens need 12 blocks.
    executor, runner = _executor(num_blocks=7, block_size=4)
    try:
        handles = executor.submit_all([_request(str(i), [10 * i], max_tokens=11) for i in range(4)])
        outs = [h.result() for h in handles]
        num_preemptions = executor.scheduler.num_preemptions
        free = executor.scheduler.kv_cache_manager.num_free_blocks
    finally:
        executor.shutdown()
    for i, out in enumerate(outs):
        assert out.outputs[0].token_ids == [(10 * i + k) % 100 for k in range(1, 12)]
    assert num_preemptions > 0
    assert free == 6


def test_executor_streams_cumulative_outputs_in_order():
    executor, _ = _executor()
    try:
        handle = executor.submit(_request("s", [1, 2], max_tokens=4), RequestOutputKind.CUMULATIVE)
        outputs = list(handle)
    finally:
        executor.shutdown()
    assert [o.outputs[0].token_ids for o in outputs] == [[3], [3, 4], [3, 4, 5], [3, 4, 5, 6]]
    assert [o.finished for o in outputs] == [False, False, False, True]


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_executor_dispatches_the_next_step_before_the_last_tokens_are_back(async_scheduling):
    """Async scheduling: each decode row computes the token that the step before is still
    sampling (the runner feeds it back); a sequence that stops on EOS costs one wasted row,
    never a wrong token. One step at a time, that row is not computed."""
    executor, runner = _executor()
    executor.async_scheduling = async_scheduling
    try:
        eos = executor.submit(_request("eos", [5], eos={8}, max_tokens=10))
        out = eos.result()
        free = executor.scheduler.kv_cache_manager.num_free_blocks
    finally:
        executor.shutdown()
    assert out.outputs[0].token_ids == [6, 7, 8] and out.outputs[0].finish_reason == "stop"
    # Prefill of [5] samples 6, decodes sample 7 and 8 (EOS); in flight meanwhile: a 4th step.
    assert runner.batches == [[("eos", 1)]] * (4 if async_scheduling else 3)
    assert free == 63


class GatedRunner(FakeRunner):
    """Holds its first dispatch until ``gate`` is set, so a test can act while a step is out."""

    def __init__(self):
        super().__init__()
        self.dispatching, self.gate = threading.Event(), threading.Event()

    def dispatch(self, batch, fed_back):
        self.dispatching.set()
        assert self.gate.wait(timeout=30)
        return super().dispatch(batch, fed_back)


def test_executor_abort_before_the_prompt_ran_returns_n_completions():
    """vLLM's abort: n completions, those never started empty with finish_reason "abort"."""
    runner = GatedRunner()
    scheduler = Scheduler(KVCacheManager(64, 4, enable_prefix_caching=False), 4, 16)
    executor = Executor(scheduler, runner, OutputProcessor(None), max_model_len=200)
    try:
        handle = executor.submit(_request("a", [1, 2, 3], n=2, max_tokens=5))
        assert runner.dispatching.wait(timeout=30)
        executor.abort("a")   # queued before the prompt's step is even dispatched
        runner.gate.set()
        out = handle.result()
        free = scheduler.kv_cache_manager.num_free_blocks
    finally:
        runner.gate.set()
        executor.shutdown()
    assert [(c.index, c.token_ids, c.finish_reason) for c in out.outputs] == [(0, [], "abort"),
                                                                              (1, [], "abort")]
    assert free == 63


def test_executor_loop_error_reaches_waiting_callers_with_its_cause():
    class Broken(FakeRunner):
        def dispatch(self, batch, prepared):
            raise RuntimeError("device on fire")

    scheduler = Scheduler(KVCacheManager(16, 4), 4, 16)
    executor = Executor(scheduler, Broken(), OutputProcessor(None), max_model_len=200)
    handle = executor.submit(_request("a", [1, 2]))
    with pytest.raises(EngineDeadError, match="device on fire") as err:
        handle.result()
    assert isinstance(err.value.__cause__, RuntimeError)
    with pytest.raises(EngineDeadError) as later:
        executor.submit(_request("b", [1, 2]))
    assert later.value.__cause__ is err.value.__cause__
    executor.shutdown()
