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
class _RequestState:
    output_kind: RequestOutputKind
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


class OutputProcessor:
    """Tracks each live request's text and what its caller has already been sent."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add(self, request: Request, output_kind: RequestOutputKind) -> None:
        params = request.sampling_params
        detokenizer = None
        if self._tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids,
                                                 params.skip_special_tokens)
        stop = list(params.stop or [])
        include = params.include_stop_str_in_output
        hold_back = max(map(len, stop)) - 1 if stop and not include else 0
        self._states[request.request_id] = _RequestState(
            output_kind, detokenizer, stop, include, params.min_tokens, hold_back)

    def check_stop(self, seq: Sequence) -> str | None:
        """Detokenizes ``seq``'s new tokens now; returns the stop string they completed, if any.

        The executor calls it after appending a token that did not end the sequence otherwise
        (EOS, stop token id); a string means: finish with "stop", stop_reason = that string.
        Requests without stop strings return None at once and are detokenized in make_output,
        off the critical path.
        """
        state = self._states.get(seq.request_id)
        if state is None or not state.stop:
            return None
        self._detokenize(state, seq.output_token_ids)
        return state.stop_str

    def make_output(self, seq: Sequence) -> RequestOutput | None:
        """The output to send now, or None when there is nothing to send.

        Text catches up with every token generated since the last call. A finished sequence
        is dropped from tracking after its final output, and later calls for it return None.
        """
        state = self._states.get(seq.request_id)
        if state is None:
            return None
        finished = seq.is_finished
        if not finished and state.output_kind is RequestOutputKind.FINAL_ONLY:
            return None
        token_ids = self._catch_up(state, seq)
        text = state.text
        if not finished and state.hold_back:
            text = text[:max(0, len(text) - state.hold_back)]
        new_logprobs = seq.output_logprobs[state.num_summed_logprobs:len(token_ids)]
        state.cumulative_logprob += float(sum(new_logprobs))
        state.num_summed_logprobs += len(new_logprobs)
        if finished:
            del self._states[seq.request_id]
        is_delta = state.output_kind is RequestOutputKind.DELTA
        if is_delta:
            if len(token_ids) == state.num_sent_tokens and not finished:
                return None
            first_sent = state.num_sent_tokens
            new_tokens, new_text = token_ids[first_sent:], text[state.num_sent_chars:]
        else:
            first_sent = 0
            new_tokens, new_text = list(token_ids), text
        state.num_sent_tokens, state.num_sent_chars = len(token_ids), len(text)
        params = seq.request.sampling_params
        logprobs = None
        if params.logprobs is not None:
            logprobs = seq.output_top_logprobs[first_sent:len(token_ids)]
        prompt_logprobs = None
        # Sent with every output, except DELTA's: with its first only (vLLM).
        if params.prompt_logprobs is not None and (first_sent == 0 or not is_delta):
            prompt_logprobs = [None, *seq.prompt_logprobs]
        completion = CompletionOutput(
            index=0, text=new_text, token_ids=new_tokens,
            cumulative_logprob=state.cumulative_logprob, logprobs=logprobs,
            finish_reason=seq.finish_reason,
            stop_reason=state.stop_str if state.stop_str is not None else seq.stop_reason)
        request = seq.request
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids), outputs=[completion],
            finished=finished, metrics=dataclasses.replace(seq.metrics),
            prompt_logprobs=prompt_logprobs)

    def _catch_up(self, state: _RequestState, seq: Sequence) -> list[int]:
        """Detokenizes what make_output needs; returns the output token ids to report."""
        token_ids = seq.output_token_ids
        if state.stop_str is None and seq.is_finished and state.detokenizer is not None:
            # As vLLM: the text of the EOS / stop token that ended generation is not shown.
            stop_token_ended = seq.finish_reason == "stop" and not state.include_stop_str
            self._detokenize(state, token_ids[:-1] if stop_token_ended else token_ids)
            if state.stop_str is None:
                state.text += state.detokenizer.flush()
        else:
            self._detokenize(state, token_ids)
        return token_ids if state.stop_str is None else token_ids[:state.num_detokenized]

    @staticmethod
    def _detokenize(state: _RequestState, token_ids: list[int]) -> None:
        """Appends the text of token_ids[num_detokenized:], stopping at a stop string."""
        if state.detokenizer is None or state.stop_str is not None:
            return
        for index in range(state.num_detokenized, len(token_ids)):
            num_old_chars = len(state.text)
            state.text += state.detokenizer.add(token_ids[index])
            state.num_detokenized = index + 1
            if state.stop and index >= state.min_tokens and _match_stop(state, num_old_chars):
                return


def _match_stop(state: _RequestState, num_old_chars: int) -> bool:
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
