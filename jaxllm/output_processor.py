"""OutputProcessor: sequences -> RequestOutputs, cumulative or delta, with incremental text."""

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
    num_detokenized: int = 0
    num_sent_tokens: int = 0
    num_sent_chars: int = 0


class OutputProcessor:
    """Tracks each live request's text and what its caller has already been sent."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._states: dict[str, _RequestState] = {}

    def add(self, request: Request, output_kind: RequestOutputKind) -> None:
        detokenizer = None
        if self._tokenizer is not None:
            detokenizer = IncrementalDetokenizer(self._tokenizer, request.prompt_token_ids,
                                                 request.sampling_params.skip_special_tokens)
        self._states[request.request_id] = _RequestState(output_kind, detokenizer)

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
        token_ids = seq.output_token_ids
        text = ""
        if state.detokenizer is not None:
            for token_id in token_ids[state.num_detokenized:]:
                state.detokenizer.add(token_id)
            state.num_detokenized = len(token_ids)
            if finished:
                state.detokenizer.flush()
            text = state.detokenizer.text
        if finished:
            del self._states[seq.request_id]
        if state.output_kind is RequestOutputKind.DELTA:
            if len(token_ids) == state.num_sent_tokens and not finished:
                return None
            new_tokens, new_text = token_ids[state.num_sent_tokens:], text[state.num_sent_chars:]
        else:
            new_tokens, new_text = list(token_ids), text
        state.num_sent_tokens, state.num_sent_chars = len(token_ids), len(text)
        request = seq.request
        completion = CompletionOutput(
            index=0, text=new_text, token_ids=new_tokens,
            cumulative_logprob=float(sum(seq.output_logprobs)), logprobs=None,
            finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt,
            prompt_token_ids=list(request.prompt_token_ids), outputs=[completion],
            finished=finished, metrics=dataclasses.replace(seq.metrics))
