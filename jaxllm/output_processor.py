"""OutputProcessor: sequences -> RequestOutputs, cumulative or delta, with incremental text.

Stop strings follow vLLM. Once the output text contains one, the request finishes with
finish_reason "stop" and stop_reason the string; the text ends just before it (just after it
with include_stop_str_in_output) and token_ids end with the token that completed it. A match
must end in the text of a token after the first min_tokens, and each token's text is searched
together with the last len(stop) - 1 characters before it, so matches spanning tokens are found
in O(new text) per token. While the request runs, streamed text holds back its last
max(len(stop)) - 1 characters: a partial stop string is never shown and then withdrawn.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxllm.detokenizer import IncrementalDetokenizer
from jaxllm.outputs import CompletionOutput, RequestOutput
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.sequence import Request, Sequence


@dataclasses.dataclass
class _CompletionState:
    """One completion's text and what its caller has been sent."""

    detokenizer: IncrementalDetokenizer | None
    stop: list[str]
    include_stop_str: bool
    min_tokens: int
    hold_back: int  # trailing characters withheld from a running request's streamed text
    text: str = ""
    num_detokenized: int = 0  # after a stop string: the output tokens kept
    stop_str: str | None = None
    num_sent_tokens: int = 0
    num_sent_chars: int = 0
    num_summed_logprobs: int = 0
    cumulative_logprob: float = 0.0


@dataclasses.dataclass
class _RequestState:
    request: Request
    output_kind: RequestOutputKind
    completions: dict[int, _CompletionState] = dataclasses.field(default_factory=dict)
    prompt_logprobs_sent: bool = False


class OutputProcessor:
    """Tracks each live request's completions' text and what its caller has been sent."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add(self, request: Request, output_kind: RequestOutputKind) -> None:
        self._states[request.request_id] = _RequestState(request, output_kind)

    def discard(self, request_id: str) -> None:
        """Stops tracking a request that ended without an output (it failed)."""
        self._states.pop(request_id, None)

    def _completion(self, state: _RequestState, index: int) -> _CompletionState:
        completion = state.completions.get(index)
        if completion is None:
            request = state.request
            params = request.sampling_params
            detokenizer = None
            if self._tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids,
                                                     params.skip_special_tokens)
            stop = list(params.stop or [])
            include = params.include_stop_str_in_output
            hold_back = max(map(len, stop)) - 1 if stop and not include else 0
            completion = state.completions[index] = _CompletionState(
                detokenizer, stop, include, params.min_tokens, hold_back)
        return completion

    def check_stop(self, seq: Sequence) -> str | None:
        """Detokenizes ``seq``'s new tokens now; returns the stop string they completed, if any.

        ``postprocess.finish_reason`` asks, after a token that did not end the sequence
        otherwise (EOS, stop token id), and decides with the answer. Requests without stop
        strings return None at once and are detokenized in make_output, off the critical path.
        """
        state = self._states.get(seq.request_id)
        if state is None or not state.request.sampling_params.stop:
            return None
        completion = self._completion(state, seq.index)
        self._detokenize(completion, seq.output_token_ids)
        return completion.stop_str

    def make_output(self, seqs: list[Sequence], finished: bool) -> RequestOutput | None:
        """The output to send now for one request's completions, or None if nothing to send.

        ``seqs`` are the request's sequences in completion-index order (one unless n > 1; the
        best hypotheses, best first, for a finished beam search); ``finished`` means the whole
        request is done. Text catches up with every token generated since the last call. A
        finished request is dropped from tracking, and later calls for it return None.
        """
        request = seqs[0].request
        state = self._states.get(request.request_id)
        if state is None:
            return None
        if not finished and state.output_kind is RequestOutputKind.FINAL_ONLY:
            return None
        is_delta = state.output_kind is RequestOutputKind.DELTA
        completions = [c for c in (self._completion_output(state, seq, i, is_delta)
                                   for i, seq in enumerate(seqs)) if c is not None]
        if not completions and not finished:
            return None
        if finished:
            del self._states[request.request_id]
        params = request.sampling_params
        prompt_logprobs = None
        # Sent with every output, except DELTA's: with its first only (vLLM).
        if params.prompt_logprobs is not None and not (is_delta and state.prompt_logprobs_sent):
            prompt_logprobs = [None, *seqs[0].prompt_logprobs]
            state.prompt_logprobs_sent = True
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids), outputs=completions,
            finished=finished, metrics=dataclasses.replace(seqs[0].metrics),
            prompt_logprobs=prompt_logprobs)

    def _completion_output(self, state: _RequestState, seq: Sequence, index: int,
                           is_delta: bool) -> CompletionOutput | None:
        """The completion's news (DELTA: None when there is none) or its whole output so far."""
        completion = self._completion(state, index)
        token_ids = self._catch_up(completion, seq)
        text = completion.text
        if not seq.is_finished and completion.hold_back:
            text = text[:max(0, len(text) - completion.hold_back)]
        new_logprobs = seq.output_logprobs[completion.num_summed_logprobs:len(token_ids)]
        completion.cumulative_logprob += float(sum(new_logprobs))
        completion.num_summed_logprobs += len(new_logprobs)
        first_sent = completion.num_sent_tokens if is_delta else 0
        if is_delta and len(token_ids) == first_sent and not seq.is_finished:
            return None
        new_text = text[completion.num_sent_chars:] if is_delta else text
        completion.num_sent_tokens, completion.num_sent_chars = len(token_ids), len(text)
        logprobs = None
        if seq.request.sampling_params.logprobs is not None:
            logprobs = seq.output_top_logprobs[first_sent:len(token_ids)]
        return CompletionOutput(
            index=index, text=new_text, token_ids=token_ids[first_sent:],
            cumulative_logprob=completion.cumulative_logprob, logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=completion.stop_str if completion.stop_str is not None else seq.stop_reason)

    def _catch_up(self, state: _CompletionState, seq: Sequence) -> list[int]:
        """Detokenizes what make_output needs; returns the output token ids to report."""
        token_ids = seq.output_token_ids
        if state.stop_str is None and seq.is_finished and state.detokenizer is not None:
            # As vLLM: the text of the EOS / stop token that ended generation is not shown (a
            # structured output's last token, which completed its grammar, is).
            last = token_ids[-1] if token_ids else None
            stop_token_ended = seq.finish_reason == "stop" and not state.include_stop_str and (
                seq.stop_reason == last or (seq.stop_reason is None and last in seq.request.eos_token_ids))
            self._detokenize(state, token_ids[:-1] if stop_token_ended else token_ids)
            if state.stop_str is None:
                state.text += state.detokenizer.flush()
        else:
            self._detokenize(state, token_ids)
        return token_ids if state.stop_str is None else token_ids[:state.num_detokenized]

    @staticmethod
    def _detokenize(state: _CompletionState, token_ids: list[int]) -> None:
        """Appends the text of token_ids[num_detokenized:], stopping at a stop string."""
        if state.detokenizer is None or state.stop_str is not None:
            return
        for index in range(state.num_detokenized, len(token_ids)):
            num_old_chars = len(state.text)
            state.text += state.detokenizer.add(token_ids[index])
            state.num_detokenized = index + 1
            if state.stop and index >= state.min_tokens and _match_stop(state, num_old_chars):
                return


def _match_stop(state: _CompletionState, num_old_chars: int) -> bool:
    """Finds the earliest stop string ending after text[:num_old_chars]; cuts the text there."""
    best: tuple[int, int, str] | None = None
    for stop in state.stop:
        start = state.text.find(stop, max(0, num_old_chars - len(stop) + 1))
        if start != -1 and (best is None or (start, len(stop)) < best[:2]):
            best = (start, len(stop), stop)
    if best is None:
        return False
    start, length, state.stop_str = best
    state.text = state.text[:start + length if state.include_stop_str else start]
    return True
