"""RequestOutputs -> OpenAI response bodies: choices, logprobs, usage, whole responses and
streamed chunks, for ``text_completion`` and ``chat.completion`` alike."""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any, Literal

from jaxllm.outputs import CompletionOutput, PositionLogprobs

Kind = Literal["completion", "chat"]


class TokenTexts:
    """Each token id's text as logprobs show it (decoded alone, as vLLM does), cached."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        if self._tokenizer is None:
            return f"token_id:{token_id}"
        return self._tokenizer.decode([token_id])


class ResponseBuilder:
    """Builds one HTTP request's response: a whole body, or its stream of chunks.

    Choice indexes follow OpenAI: prompt ``i``'s completion ``j`` is choice ``i * n + j``.
    Completion logprobs' ``text_offset`` runs on across a choice's chunks.
    """

    def __init__(self, kind: Kind, model: str, n: int, texts: TokenTexts,
                 top_logprobs: int | None) -> None:
        self.kind = kind
        self.model = model
        self.n = n
        self.texts = texts
        self.top_logprobs = top_logprobs
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self._text_offsets: dict[int, int] = {}

    def index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def choice(self, prompt_index: int, completion: CompletionOutput, delta: bool) -> dict[str, Any]:
        """One choice of a response (``delta``: of a streamed chunk)."""
        index = self.index(prompt_index, completion)
        choice: dict[str, Any] = {"index": index}
        if self.kind == "completion":
            choice["text"] = completion.text
            choice["logprobs"] = self._completion_logprobs(index, completion)
        else:
            key = "delta" if delta else "message"
            choice[key] = ({"content": completion.text} if delta
                           else {"role": "assistant", "content": completion.text})
            choice["logprobs"] = self._chat_logprobs(completion)
        choice["finish_reason"] = completion.finish_reason
        choice["stop_reason"] = completion.stop_reason
        return choice

    def role_choice(self, index: int) -> dict[str, Any]:
        """A chat stream's first chunk per choice, as OpenAI sends it."""
        return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                "finish_reason": None}

    def body(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        obj = "chat.completion" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "choices": choices, "usage": usage}

    def chunk(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        chunk = {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                 "choices": choices}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def _completion_logprobs(self, index: int, completion: CompletionOutput) -> dict[str, Any] | None:
        """OpenAI's legacy shape: tokens, token_logprobs, top_logprobs, text_offset."""
        if completion.logprobs is None:
            return None
        tokens, token_logprobs, top, offsets = [], [], [], []
        offset = self._text_offsets.get(index, 0)
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            text, logprob = self.texts.text(token_id), position[token_id].logprob
            tokens.append(text)
            token_logprobs.append(logprob)
            # Tokens can share a text (partial UTF-8 decodes to U+FFFD): the sampled one's wins.
            top.append({**{self.texts.text(t): lp.logprob for t, lp in _ranked(position)},
                        text: logprob})
            offsets.append(offset)
            offset += len(text)
        self._text_offsets[index] = offset
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": offsets}

    def _chat_logprobs(self, completion: CompletionOutput) -> dict[str, Any] | None:
        """Chat's shape: ``{"content": [{token, logprob, bytes, top_logprobs}]}``."""
        if completion.logprobs is None:
            return None
        content = []
        for token_id, position in zip(completion.token_ids, completion.logprobs):
            top = [self._chat_entry(t, lp.logprob)
                   for t, lp in _ranked(position)[:self.top_logprobs or 0]]
            content.append({**self._chat_entry(token_id, position[token_id].logprob),
                            "top_logprobs": top})
        return {"content": content}

    def _chat_entry(self, token_id: int, logprob: float) -> dict[str, Any]:
        text = self.texts.text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _ranked(position: PositionLogprobs) -> list[tuple[int, Any]]:
    """A position's entries, most likely first (the sampled token may sit outside the top)."""
    return sorted(position.items(), key=lambda item: item[1].rank or 0)
