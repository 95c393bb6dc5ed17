"""The executor: a background thread that turns queued requests into tokens.

One iteration of the loop, with step N - 1 still running on the device:
  1. fetch        drain the request queue (new sequences join the scheduler, aborts end
                  theirs); block when there is no work at all.
  2. schedule     the Scheduler picks step N's rows and allocates their KV blocks. A decode row
                  may compute the token step N - 1 is still sampling (a pending token): the
                  device feeds it from step N - 1's outputs.
  3. dispatch     the ModelRunner packs and dispatches step N, which returns at once; the
                  Scheduler advances its sequences as if it had run.
  4. postprocess  wait for step N - 1's outputs (one transfer); the Postprocessor appends its
                  tokens, ends and forks sequences, while the device runs step N.
  5. deliver      send the callers their news (incremental text, RequestOutputs).
So the host's work hides behind the device's. The price is one wasted row per sequence that
stops on EOS, a stop token or a stop string: it was already in step N when step N - 1's token
ended it (its K/V write is harmless, its token is dropped). Sequences whose next step needs
every token on the host (beam search, Python logits processors) wait for their
pending token instead, and a step with Python logits processors is finished before the next is
prepared (as every step is with ``async_scheduling=False``). Speculative decoding
(``jaxllm.speculative``): a row that may speculate waits for its last token too (the proposer
looks up n-grams ending with it), and a row verifying proposals waits until its step's outputs
say how many were accepted; other rows in the same steps overlap as above.

Callers hold a RequestHandle. A request's own fault (its Python logits processor raised or
returned a bad value) fails that request's handle with a RequestError, and the loop goes on.
Any exception in the loop itself fails every pending handle with EngineDeadError (never a
hang; a short message naming the error, which is chained as ``__cause__``), and the engine
refuses new work from then on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import TYPE_CHECKING, Callable, NamedTuple

from jaxllm import groups
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.postprocess import Postprocessor
from jaxllm.request_handle import EngineDeadError, RequestHandle, RequestHandles, short_error
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.scheduler import ScheduledBatch, Scheduler
from jaxllm.sequence import Request, Sequence

if TYPE_CHECKING:   # the runner's module imports jax; the loop only passes its values on
    from jaxllm.model_runner import ModelRunner
    from jaxllm.step_inputs import StepOutputs

__all__ = ["EngineDeadError", "Executor", "ExecutorStats", "RequestHandle"]


@dataclasses.dataclass
class ExecutorStats:
    num_steps: int = 0
    num_generated_tokens: int = 0
    num_tokens_computed: int = 0
    host_time_s: float = 0.0         # schedule, prepare, dispatch, postprocess, deliver outputs
    device_wait_time_s: float = 0.0  # the host blocked on a step's outputs
    # Per step, from when the device could start it (its dispatch, or the previous step's
    # outputs arriving, whichever is later) until its outputs are on the host.
    device_time_s: float = 0.0
    overlapped_host_time_s: float = 0.0  # host work done while a step was on the device
    num_failed_requests: int = 0     # requests ended by their own fault (a RequestError)
    # speculative decoding (vLLM's names): rows with proposals, proposed and accepted tokens,
    # and accepted tokens by proposal position
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_accepted_tokens_per_pos: list[int] = dataclasses.field(default_factory=list)


class _InFlight(NamedTuple):
    """A dispatched step whose outputs the host has not read yet."""

    batch: ScheduledBatch
    outputs: StepOutputs
    dispatched: float  # perf_counter time of its dispatch


class Executor:
    def __init__(self, scheduler: Scheduler, model_runner: ModelRunner,
                 output_processor: OutputProcessor, max_model_len: int,
                 async_scheduling: bool = True) -> None:
        self.scheduler = scheduler
        self.async_scheduling = async_scheduling
        self.model_runner = model_runner
        self.output_processor = output_processor
        self.postprocessor = Postprocessor(scheduler, output_processor, max_model_len)
        self.stats = ExecutorStats()
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._handles = RequestHandles()
        self._results_at = 0.0   # when the last step's outputs reached the host
        self._thread = threading.Thread(target=self._run, name="jaxllm-executor", daemon=True)
        self._thread.start()

    # ---- caller side (any thread) ----
    def submit(self, request: Request, output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
               sink: Callable[[RequestOutput | BaseException], None] | None = None) -> RequestHandle:
        return self.submit_all([request], output_kind, sink)[0]

    def submit_all(self, requests: list[Request],
                   output_kind: RequestOutputKind = RequestOutputKind.FINAL_ONLY,
                   sink: Callable[[RequestOutput | BaseException], None] | None = None
                   ) -> list[RequestHandle]:
        """Submits requests as one message, so the scheduler sees all of them at once."""
        handles = [RequestHandle(request, output_kind, sink) for request in requests]
        self._handles.register(handles, lambda: self._inbox.put(("add", requests)))
        return handles

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        self._handles.stop()
        self._inbox.put(("stop", None))
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def failure(self) -> str | None:
        """Why the loop died (what its callers were told); None while it serves or after a
        shutdown."""
        return self._handles.failure

    # ---- the loop (executor thread) ----
    def _run(self) -> None:
        try:
            in_flight: _InFlight | None = None
            while self._fetch(may_block=in_flight is None):
                step = self._schedule_and_dispatch(in_flight)
                if in_flight is not None:
                    self._complete(in_flight, overlapped=step is not None)
                in_flight = step
                if step is not None and (self.model_runner.uses_host_callbacks
                                         or not self.async_scheduling):
                    # One step at a time; Python logits processors need it: they read the
                    # rows that the next prepare replaces.
                    self._complete(step, overlapped=False)
                    in_flight = None
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            self._handles.fail_all(f"the engine's executor loop failed: {short_error(exc)}", exc)
            return
        self._handles.fail_all("the engine was shut down before this request finished")

    def _fetch(self, may_block: bool) -> bool:
        """Drains the inbox; if ``may_block`` (no step in flight), waits while there is nothing
        to run. False means stop."""
        while True:
            block = may_block and not self.scheduler.has_unfinished
            try:
                kind, payload = self._inbox.get(block=block)
            except queue.Empty:
                return True
            if kind == "stop":
                return False
            if kind == "add":
                for request in payload:
                    handle = self._handles.get(request.request_id)
                    self.output_processor.add(request, handle.output_kind if handle else
                                              RequestOutputKind.FINAL_ONLY)
                    self.scheduler.add(groups.new_sequence(request))
            elif kind == "abort" and (seq := self.postprocessor.abort(payload)) is not None:
                self._deliver(seq)

    def _schedule_and_dispatch(self, previous: _InFlight | None) -> _InFlight | None:
        """Schedules the next step and dispatches it, if there is anything to run."""
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        step = None
        if not batch.is_empty:
            prepared = self.model_runner.prepare_inputs(batch, previous and previous.batch)
            outputs = self.model_runner.dispatch(batch, prepared)
            step = _InFlight(batch, outputs, time.perf_counter())
            self.scheduler.advance(batch)
        self.stats.host_time_s += time.perf_counter() - start
        return step

    def _complete(self, step: _InFlight, overlapped: bool) -> None:
        """Reads a dispatched step's outputs, post-processes them and tells the callers;
        ``overlapped``: the next step runs on the device meanwhile."""
        waited = time.perf_counter()
        results = self.model_runner.fetch(step.batch, step.outputs)
        returned = time.perf_counter()
        stats = self.stats
        stats.device_wait_time_s += returned - waited
        stats.device_time_s += returned - max(step.dispatched, self._results_at)
        self._results_at = returned
        news = self.postprocessor.process(step.batch, results)
        stats.num_steps += 1
        stats.num_tokens_computed += step.batch.num_tokens
        stats.num_generated_tokens += news.num_new_tokens
        stats.num_failed_requests += len(news.failed)
        for num_drafted, num_accepted in news.drafts:
            stats.num_drafts += 1
            stats.num_draft_tokens += num_drafted
            stats.num_accepted_tokens += num_accepted
            per_pos = stats.num_accepted_tokens_per_pos
            per_pos.extend([0] * (num_drafted - len(per_pos)))
            for position in range(num_accepted):
                per_pos[position] += 1
        for request_id, error in news.failed:
            self._handles.fail(request_id, error)
        for seq in news.seqs:
            self._deliver(seq)
        host_time = time.perf_counter() - returned
        stats.host_time_s += host_time
        if overlapped:
            stats.overlapped_host_time_s += host_time

    def _deliver(self, seq: Sequence) -> None:
        """Sends ``seq``'s caller what its output kind asks for; the final output ends the handle."""
        report = groups.completions_to_report(seq)
        if report is None:
            return
        seqs, finished = report
        if finished and seqs[0].metrics.finished_time is None:
            seqs[0].metrics.finished_time = time.monotonic()
        output = self.output_processor.make_output(seqs, finished)
        if output is not None:
            self._handles.send(seq.request_id, output)
