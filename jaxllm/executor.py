"""The executor: a background thread that turns queued requests into tokens.

One iteration of the loop, with step N - 1 still running on the device:
  1. fetch     drain the request queue: new sequences join the scheduler, aborts finish theirs;
               block when there is no work at all.
  2. schedule  the Scheduler picks rows and token counts (decodes first, then prefill chunks)
               for step N and allocates their KV blocks (prefix-cache hits included). A decode
               row may compute the token step N - 1 is still sampling: the sequence counts it
               as pending, and the device feeds it from step N - 1's outputs to step N.
  3. prepare   the ModelRunner packs bucketed inputs and dispatches step N, which returns at
               once; the sequences advance as if it had run (computed tokens, pending token).
  4. outputs   wait for step N - 1's tokens (one transfer), append them, check stop
               conditions, finish and free, and send the callers their news (incremental
               detokenization, RequestOutputs), all while the device runs step N.
So the device always has the next step queued and the host's work hides behind it. The price is
one wasted row per sequence that stops on EOS, a stop token or a stop string: it was already in
step N when step N - 1's token ended it (its K/V write is harmless, the token is dropped).
Sequences whose next step needs every token on the host (beam search, penalties, Python logits
processors) wait for their pending token instead, and a step with Python logits processors is
finished before the next is prepared (as every step is with ``async_scheduling=False``).

Callers hold a RequestHandle. Any exception in the loop fails every pending handle with
EngineDeadError (never a hang), and the engine refuses new work from then on.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import Callable, Iterator

from jaxllm.beam_search import BeamSearchState, Hypothesis
from jaxllm.model_runner import ModelRunner, RowResults
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.scheduler import ScheduledBatch, Scheduler
from jaxllm.sequence import Request, Sequence, SequenceGroup, SequenceStatus, child_seed
from jaxllm.step_inputs import StepOutputs


class EngineDeadError(RuntimeError):
    """The executor loop stopped on an error (the cause is chained) or was shut down."""


class RequestHandle:
    """The caller's end of one request: outputs arrive as the executor makes them.

    By default they queue up for a thread to read with ``result()`` or iteration; an asyncio
    caller passes its own ``sink`` (e.g. a loop.call_soon_threadsafe into an asyncio.Queue).
    """

    def __init__(self, request: Request, output_kind: RequestOutputKind,
                 sink: Callable[[RequestOutput | BaseException], None] | None = None) -> None:
        self.request = request
        self.output_kind = output_kind
        self._outputs: queue.Queue[RequestOutput | BaseException] = queue.Queue()
        self._sink = sink or self._outputs.put
        self.final_output: RequestOutput | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        self._sink(item)

    def __iter__(self) -> Iterator[RequestOutput]:
        """Yields outputs until the finished one; raises the loop's error if it died."""
        while self.final_output is None:
            item = self._outputs.get()
            if isinstance(item, BaseException):
                raise item
            if item.finished:
                self.final_output = item
            yield item

    def result(self) -> RequestOutput:
        for _ in self:
            pass
        return self.final_output


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


@dataclasses.dataclass
class _InFlight:
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
        self.max_model_len = max_model_len
        self.stats = ExecutorStats()
        self._inbox: queue.Queue[tuple[str, object]] = queue.Queue()
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self._stopped = False
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
        with self._lock:
            self._raise_if_dead()
            ids = [r.request_id for r in requests]
            clashes = [i for i in ids if i in self._handles] or sorted({i for i in ids if ids.count(i) > 1})
            if clashes:
                raise ValueError(f"request_id {clashes[0]!r} is already in flight")
            self._handles.update(zip(ids, handles))
            self._inbox.put(("add", requests))
        return handles

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    def shutdown(self) -> None:
        with self._lock:
            self._stopped = True
        self._inbox.put(("stop", None))
        if self._thread is not threading.current_thread():
            self._thread.join()

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise EngineDeadError(f"the engine's executor loop failed: {self._error!r}") from self._error
        if self._stopped:
            raise EngineDeadError("the engine was shut down")

    # ---- the loop (executor thread) ----
    def _run(self) -> None:
        try:
            in_flight: _InFlight | None = None
            results_at = 0.0   # when the last step's outputs reached the host
            while True:
                if not self._fetch(may_block=in_flight is None):
                    break
                start = time.perf_counter()
                batch = self.scheduler.schedule()
                dispatched = None
                if not batch.is_empty:
                    self._mark_scheduled(batch)
                    prepared = self.model_runner.prepare_inputs(batch, in_flight and in_flight.batch)
                    outputs = self.model_runner.dispatch(batch, prepared)
                    dispatched = time.perf_counter()
                    self._advance(batch)
                self.stats.host_time_s += time.perf_counter() - start
                if in_flight is not None:
                    results_at = self._complete(in_flight, results_at)
                    if dispatched is not None:
                        self.stats.overlapped_host_time_s += time.perf_counter() - results_at
                in_flight = None if dispatched is None else _InFlight(batch, outputs, dispatched)
                if in_flight is not None and (self.model_runner.uses_host_callbacks
                                              or not self.async_scheduling):
                    # One step at a time; Python logits processors need it: they read the
                    # rows that the next prepare replaces.
                    results_at = self._complete(in_flight, results_at)
                    in_flight = None
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            with self._lock:
                self._error = exc
                handles = list(self._handles.values())
                self._handles.clear()
            for handle in handles:
                handle.put(EngineDeadError(f"the engine's executor loop failed: {exc!r}"))
            return
        with self._lock:
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            handle.put(EngineDeadError("the engine was shut down before this request finished"))

    def _complete(self, step: _InFlight, results_at: float) -> float:
        """Reads a dispatched step's outputs, post-processes them and tells the callers;
        returns when the outputs arrived (``results_at``: when the previous step's did)."""
        waited = time.perf_counter()
        results = self.model_runner.fetch(step.batch, step.outputs)
        returned = time.perf_counter()
        self.stats.device_wait_time_s += returned - waited
        self.stats.device_time_s += returned - max(step.dispatched, results_at)
        self._deliver_all(self._postprocess(step.batch, results))
        self.stats.host_time_s += time.perf_counter() - returned
        return returned

    def _fetch(self, may_block: bool) -> bool:
        """Drains the inbox; if ``may_block`` (no step in flight), waits while there is nothing
        to run. False means stop."""
        block = may_block and not self.scheduler.has_unfinished
        while True:
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
                    self.scheduler.add(_new_sequence(request))
            elif kind == "abort":
                seqs = self.scheduler.find(payload)
                for seq in seqs:
                    self.scheduler.finish(seq, "abort")
                if seqs:
                    group = seqs[0].group
                    if group is not None and group.beam is not None:
                        group.final = group.seqs
                    self._deliver(seqs[0])
            block = may_block and not self.scheduler.has_unfinished

    def _mark_scheduled(self, batch: ScheduledBatch) -> None:
        now = time.monotonic()
        for item in batch.scheduled:
            if item.seq.metrics.first_scheduled_time is None:
                item.seq.metrics.first_scheduled_time = now

    def _advance(self, batch: ScheduledBatch) -> None:
        """Moves the sequences of a dispatched step on as if it had run: its tokens are
        computed, and each row that samples owes its sequence a pending token."""
        for item in batch.scheduled:
            item.seq.num_computed_tokens += item.num_new_tokens
            if item.completes_prefill:
                item.seq.num_pending_tokens += 1

    def _postprocess(self, batch: ScheduledBatch, results: RowResults) -> list[Sequence]:
        """Appends sampled tokens, finishes sequences that stop; returns those with news.

        Rows of sequences that finished meanwhile (stopped by the step before, or aborted) are
        dropped.
        """
        now = time.monotonic()
        self.stats.num_steps += 1
        self.stats.num_tokens_computed += batch.num_tokens
        updated = []
        for row, item in enumerate(batch.scheduled):
            seq = item.seq
            if seq.is_finished:
                continue
            for position, entry in results.prompt_logprobs.get(row, ()):
                if position == len(seq.prompt_logprobs) + 1:   # not yet seen (recompute after preemption)
                    seq.prompt_logprobs.append(entry)
            if item.completes_prefill and self._take_sample(seq, row, results, now):
                updated.append(seq)
            if not seq.is_finished:
                # Its computed tokens (the next step's included) are all known by now.
                self.scheduler.kv_cache_manager.cache_full_blocks(seq)
        return updated

    def _take_sample(self, seq: Sequence, row: int, results: RowResults, now: float) -> bool:
        """Takes a row's sampled token (a beam's candidates); True when the caller has news."""
        seq.num_pending_tokens -= 1
        group = seq.group
        if group is not None and group.beam is not None:
            top = results.top_logprobs[row]
            ranked = sorted(top, key=lambda t: top[t].rank)
            group.pending[seq] = (ranked, [top[t].logprob for t in ranked])
            if len(group.pending) < len(group.seqs):
                return False
            self._beam_step(group, now)
            return True
        if row in results.top_logprobs:
            seq.output_top_logprobs.append(results.top_logprobs[row])
        self._append_token(seq, results.token_ids[row], results.logprobs[row], now)
        if group is not None and len(group.seqs) < seq.request.sampling_params.n:
            self._fork_parallel_samples(seq)
        finish_reason = self._finish_reason(seq)
        if finish_reason is not None:
            seq.num_pending_tokens = 0   # a step in flight may be sampling one more
            self.scheduler.finish(seq, finish_reason)
        return True

    def _fork_parallel_samples(self, first: Sequence) -> None:
        """n > 1: once the prompt is computed, completions 1..n-1 fork off the first.

        Each child shares every prompt block and recomputes only the last prompt token (its
        write lands in a copy-on-write copy of the last block) to sample its own first token
        with its own seed.
        """
        group, kv = first.group, self.scheduler.kv_cache_manager
        prompt = list(first.request.prompt_token_ids)
        for index in range(1, first.request.sampling_params.n):
            request = dataclasses.replace(first.request, seed=child_seed(first.request.seed, index))
            child = first.fork(index, list(prompt), request)
            child.output_logprobs, child.output_top_logprobs = [], []
            kv.fork(first, child)   # nothing to share if the first was preempted meanwhile
            child.num_computed_tokens = min(child.num_computed_tokens, len(prompt) - 1)
            group.seqs.append(child)
            self.scheduler.add_running(child)

    def _beam_step(self, group: SequenceGroup, now: float) -> None:
        """All running beams have their candidates: pick the next beams, fork and prune."""
        beams, kv = group.seqs, self.scheduler.kv_cache_manager
        scores_before = list(group.beam.running_scores)
        chosen = group.beam.step([(b.output_token_ids, b.output_logprobs) for b in beams],
                                 [group.pending[b] for b in beams])
        group.pending.clear()
        if group.beam.done:
            for beam in beams:
                if not beam.is_finished:
                    self.scheduler.finish(beam, "stop")
            group.final = [_hypothesis_sequence(beams[0], h, group.beam.eos_token_ids)
                           for h in group.beam.best(beams[0].request.sampling_params.n)]
            return
        used: set[int] = set()
        next_beams = []
        for index, candidate in enumerate(chosen):
            parent = beams[candidate.parent]
            if candidate.parent in used:   # a second continuation of one beam: fork it
                beam = parent.fork(index, list(parent.token_ids))
                kv.fork(parent, beam)
                self.scheduler.add_running(beam)
            else:
                used.add(candidate.parent)
                beam = parent
            beam.index = index
            next_beams.append((beam, candidate.token_id, candidate.score - scores_before[candidate.parent]))
        for parent_index, parent in enumerate(beams):
            if parent_index not in used:
                self.scheduler.finish(parent, "stop")
        for beam, token_id, logprob in next_beams:
            self._append_token(beam, token_id, logprob, now)
        group.seqs = [beam for beam, _, _ in next_beams]

    def _deliver_all(self, seqs: list[Sequence]) -> list[Sequence]:
        delivered: set[str] = set()
        for seq in seqs:
            if seq.group is None or seq.request_id not in delivered:
                delivered.add(seq.request_id)
                self._deliver(seq)
        return []

    def _append_token(self, seq: Sequence, token_id: int, logprob: float, now: float) -> None:
        seq.token_ids.append(token_id)
        seq.output_logprobs.append(logprob)
        seq.metrics.num_generated_tokens = seq.num_output_tokens
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        self.stats.num_generated_tokens += 1

    def _finish_reason(self, seq: Sequence) -> str | None:
        params = seq.request.sampling_params
        last = seq.token_ids[-1]
        if seq.num_output_tokens > params.min_tokens:
            if not params.ignore_eos and last in seq.request.eos_token_ids:
                return "stop"
            if last in params.stop_token_ids:
                seq.stop_reason = last
                return "stop"
        # Stop strings need this token's text now (the only detokenizing off the overlap).
        stop_str = self.output_processor.check_stop(seq)
        if stop_str is not None:
            seq.stop_reason = stop_str
            return "stop"
        if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= self.max_model_len:
            return "length"
        return None

    def _deliver(self, seq: Sequence) -> None:
        """Sends the caller what its output kind asks for; the final output ends the handle."""
        group = seq.group
        if group is None:
            seqs, finished = [seq], seq.is_finished
        elif group.beam is not None:
            if group.final is None:
                return   # beam search reports its best hypotheses once, at the end
            seqs, finished = group.final, True
        else:
            seqs, finished = sorted(group.seqs, key=lambda s: s.index), group.is_finished
        if finished and seqs[0].metrics.finished_time is None:
            seqs[0].metrics.finished_time = time.monotonic()
        output = self.output_processor.make_output(seqs, finished)
        if output is None:
            return
        with self._lock:
            handle = (self._handles.pop(seq.request_id, None) if finished
                      else self._handles.get(seq.request_id))
        if handle is not None:
            handle.put(output)


def _new_sequence(request: Request) -> Sequence:
    """A request's first sequence; with n > 1 or beam search, the first of its group."""
    seq = Sequence.from_request(request)
    params = request.sampling_params
    if params.use_beam_search:
        seq.group = SequenceGroup([seq], beam=BeamSearchState.for_request(params, request.eos_token_ids))
    elif params.n > 1:
        seq.group = SequenceGroup([seq])
    return seq


def _hypothesis_sequence(beam: Sequence, hypothesis: Hypothesis, eos_token_ids: frozenset[int]) -> Sequence:
    """A finished beam-search hypothesis as a Sequence the OutputProcessor can report."""
    request = beam.request
    last = hypothesis.output_token_ids[-1] if hypothesis.output_token_ids else None
    return Sequence(request=request, token_ids=[*request.prompt_token_ids, *hypothesis.output_token_ids],
                    metrics=beam.metrics, status=SequenceStatus.FINISHED,
                    output_logprobs=list(hypothesis.output_logprobs), prompt_logprobs=beam.prompt_logprobs,
                    finish_reason="stop" if last in eos_token_ids else "length")
