"""Server-sent events as OpenAI streams them: ``data: {json}\\n\\n`` chunks, then
``data: [DONE]``; with ``stream_options.include_usage``, a last chunk with empty ``choices`` and
the usage. An error after the stream began is sent as one ``data: {"error": ...}`` event.

The response closes its event generator however it ends (a client disconnect cancels it
mid-token), which cancels the engine streams inside it and so aborts their requests.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from jaxllm.outputs import RequestOutput
from jaxllm.server.concurrency import merge
from jaxllm.server.errors import from_engine
from jaxllm.server.responses import ResponseBuilder, usage

DONE = "data: [DONE]\n\n"


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


class EventStreamResponse(StreamingResponse):
    """A text/event-stream response that always closes its events and then calls ``on_close``
    (the admission gate's release), also when the client left before the first event."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._events = events
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self._events.aclose()
            finally:
                self._on_close()


async def events(builder: ResponseBuilder, streams: list[AsyncIterator[RequestOutput]],
                 include_usage: bool) -> AsyncIterator[str]:
    """The SSE events of one request: its prompts' engine streams (DELTA outputs) merged."""
    if builder.kind == "chat":
        yield sse(builder.chunk([builder.role_choice(i) for i in range(len(streams) * builder.n)]))
    prompt_tokens = completion_tokens = 0
    seen: set[int] = set()
    try:
        async for index, output in merge(streams):
            if index not in seen:
                seen.add(index)
                prompt_tokens += len(output.prompt_token_ids)
            completion_tokens += sum(len(c.token_ids) for c in output.outputs)
            choices = [builder.choice(index, c, delta=True) for c in output.outputs]
            if choices:
                yield sse(builder.chunk(choices))
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield sse(from_engine(exc).body())
        yield DONE
        return
    if include_usage:
        yield sse(builder.chunk([], usage(prompt_tokens, completion_tokens)))
    yield DONE
