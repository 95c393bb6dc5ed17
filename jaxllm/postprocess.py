"""Post-processing: one step's sampled rows become sequence updates, finishes and forks (no jax).

The Postprocessor is the one place that decides when a sequence ends. ``finish_reason`` checks
a sampled sequence in vLLM's order: EOS and stop token ids (once past ``min_tokens``), stop
strings (the OutputProcessor, which owns the text, finds them), a structured output whose
grammar is complete, then ``max_tokens`` and ``max_model_len``. Beam search ends beams as
``BeamSearchState`` decides (groups.beam_step), and aborts end whatever is left of a request. A row that failed through its request's own fault
(``RowResults.errors``: a logits processor raised) ends every live sequence of that request
with finish_reason "error" and hands its error to the executor for the caller; its sampled
token is dropped. Every sequence it ends, and every sequence it forks (n > 1, new beams), goes
through the scheduler, which alone owns progress and KV blocks.

Rows of sequences that finished after the step was dispatched (stopped by the step before, or
aborted) are dropped: with async scheduling, that is the one wasted row per stopping sequence.
"""

from __future__ import annotations

import dataclasses
import time

from jaxllm import groups
from jaxllm.grammar import consume, sequence_matcher
from jaxllm.output_processor import OutputProcessor
from jaxllm.request_handle import RequestError
from jaxllm.row_results import RowResults
from jaxllm.scheduler import ScheduledBatch, ScheduledSequence, Scheduler
from jaxllm.sequence import Sequence


@dataclasses.dataclass
class StepNews:
    """What a step changed, for delivery and the stats."""

    seqs: list[Sequence]   # one sequence of each request with news
    num_new_tokens: int    # tokens appended to sequences (every beam's count)
    # (request id, error) of the requests that failed in the step, for their callers
    failed: list[tuple[str, RequestError]] = dataclasses.field(default_factory=list)
    # speculative decoding: how many proposals each row with proposals had and accepted
    drafts: list[tuple[int, int]] = dataclasses.field(default_factory=list)


def finish_reason(seq: Sequence, output_processor: OutputProcessor,
                  max_model_len: int) -> tuple[str, int | str | None] | None:
    """Why ``seq`` stops after the token just appended to it, as (finish_reason, stop_reason),
    or None if it goes on. stop_reason is the stop token id or stop string (None for EOS)."""
    params = seq.request.sampling_params
    last = seq.token_ids[-1]
    if seq.num_output_tokens > params.min_tokens:
        if not params.ignore_eos and last in seq.request.eos_token_ids:
            return "stop", None
        if last in params.stop_token_ids:
            return "stop", last
    # Stop strings need this token's text now (the only detokenizing off the overlap).
    stop_str = output_processor.check_stop(seq)
    if stop_str is not None:
        return "stop", stop_str
    if seq.matcher is not None and seq.matcher.is_stopped():
        return "stop", None
    if seq.num_output_tokens >= params.max_tokens or seq.num_tokens >= max_model_len:
        return "length", None
    return None


class Postprocessor:
    """Applies a step's RowResults to its sequences; ends them and forks them."""

    def __init__(self, scheduler: Scheduler, output_processor: OutputProcessor,
                 max_model_len: int) -> None:
        self.scheduler = scheduler
        self.output_processor = output_processor
        self.max_model_len = max_model_len

    def process(self, batch: ScheduledBatch, results: RowResults) -> StepNews:
        """Takes each row's prompt logprobs and sampled token (a beam's candidates)."""
        now = time.monotonic()
        news = StepNews([], 0)
        for row, error in results.errors.items():
            self._fail(batch.scheduled[row].seq, error, news)
        requests_with_news: set[str] = set()
        for row, item in enumerate(batch.scheduled):
            seq = item.seq
            if seq.is_finished:
                continue
            for position, entry in results.prompt_logprobs.get(row, ()):
                if position == len(seq.prompt_logprobs) + 1:   # not yet seen (recompute after preemption)
                    seq.prompt_logprobs.append(entry)
            if item.completes_prefill and item.num_drafts:
                self._take_emitted(item, row, results, now, news)
                if seq.request_id not in requests_with_news:
                    requests_with_news.add(seq.request_id)
                    news.seqs.append(seq)
                continue
            if item.completes_prefill and item.draft_token_ids is not None:
                seq.spec.record(0, 0)   # it could speculate but had no proposal
            if item.completes_prefill:
                self._take_sample(seq, row, results, now, news)
                if seq.is_finished:   # its token broke its grammar
                    continue
            # Before a finish frees them: the blocks a sequence's last step filled are worth
            # caching too (a max_tokens=1 request's prompt, say).
            self.scheduler.record_outputs(seq, item.completes_prefill)
            if item.completes_prefill and self._stop_or_fork(seq, now, news):
                if seq.request_id not in requests_with_news:
                    requests_with_news.add(seq.request_id)
                    news.seqs.append(seq)
        return news

    def abort(self, request_id: str) -> Sequence | None:
        """Ends a request's live sequences with "abort"; returns one to deliver (None if the
        request is unknown or already finished)."""
        seqs = self.scheduler.find(request_id)
        for seq in seqs:
            self.scheduler.finish(seq, "abort")
        if not seqs:
            return None
        if seqs[0].group is not None:
            groups.abort(seqs[0].group)
        return seqs[0]

    def _fail(self, seq: Sequence, error: RequestError, news: StepNews) -> None:
        """Ends ``seq``'s request with its own error (unless it ended meanwhile: an abort)."""
        if seq.is_finished:
            return
        for live in self.scheduler.find(seq.request_id):
            self.scheduler.finish(live, "error")
        self.output_processor.discard(seq.request_id)
        news.failed.append((seq.request_id, error))

    def _take_sample(self, seq: Sequence, row: int, results: RowResults, now: float,
                     news: StepNews) -> None:
        """Appends a row's sampled token, or stores a beam's candidates for the beam step."""
        if seq.group is not None and seq.group.beam is not None:
            top = results.top_logprobs[row]
            ranked = sorted(top, key=lambda t: top[t].rank)
            groups.take_beam_candidates(seq, ranked, [top[t].logprob for t in ranked])
            return
        if row in results.top_logprobs:
            seq.output_top_logprobs.append(results.top_logprobs[row])
        token_id = results.token_ids[row]
        self._append(seq, token_id, results.logprobs[row], now, news)
        if seq.request.grammar is not None:
            verdict = consume(sequence_matcher(seq), token_id)
            if verdict not in (None, "stop"):
                self._fail(seq, RequestError(
                    f"request {seq.request_id}: sampled token {token_id} broke its structured "
                    f"output's grammar: {verdict}"), news)

    def _take_emitted(self, item: ScheduledSequence, row: int, results: RowResults, now: float,
                      news: StepNews) -> None:
        """A row that verified proposals: appends its accepted proposals and the target's
        token after them, one at a time, stopping at the first that ends the sequence (no
        token past a stop or max_tokens), then rolls its K/V back to the tokens kept."""
        seq = item.seq
        token_ids, logprobs = results.emitted[row]
        num_accepted = len(token_ids) - 1
        seq.spec.in_flight = False
        seq.spec.record(item.num_drafts, num_accepted)
        seq.metrics.num_draft_tokens += item.num_drafts
        seq.metrics.num_accepted_tokens += num_accepted
        news.drafts.append((item.num_drafts, num_accepted))
        reasons = None
        for token_id, logprob in zip(token_ids, logprobs):
            self._append(seq, token_id, logprob, now, news)
            reasons = finish_reason(seq, self.output_processor, self.max_model_len)
            if reasons is not None:
                break
        self.scheduler.rollback(seq, seq.num_tokens - 1)
        self.scheduler.record_outputs(seq, True)
        if reasons is not None:
            seq.stop_reason = reasons[1]
            self.scheduler.finish(seq, reasons[0])

    def _stop_or_fork(self, seq: Sequence, now: float, news: StepNews) -> bool:
        """After a sample: ends or forks what it decides; True when the caller has news."""
        group = seq.group
        if group is not None and group.beam is not None:
            if not groups.beam_candidates_complete(group):
                return False   # waits for its sibling beams' candidates
            step = groups.beam_step(group)
            for beam, token_id, logprob in step.tokens:
                self._append(beam, token_id, logprob, now, news)
            for parent, beam in step.forks:   # with its new token, which is all it computes
                self.scheduler.fork(parent, beam)
            for beam in step.dropped:
                self.scheduler.finish(beam, "stop")
            return True
        if groups.needs_parallel_forks(seq):
            for child in groups.fork_parallel_samples(seq):
                self.scheduler.fork(seq, child)
        reasons = finish_reason(seq, self.output_processor, self.max_model_len)
        if reasons is not None:
            seq.stop_reason = reasons[1]
            self.scheduler.finish(seq, reasons[0])
        return True

    @staticmethod
    def _append(seq: Sequence, token_id: int, logprob: float, now: float, news: StepNews) -> None:
        seq.token_ids.append(token_id)
        seq.output_logprobs.append(logprob)
        seq.metrics.num_generated_tokens = seq.num_output_tokens
        if seq.metrics.first_token_time is None:
            seq.metrics.first_token_time = now
        seq.metrics.last_token_time = now
        news.num_new_tokens += 1
