"""The caller's end of a request, and the error every caller gets when the engine is gone."""

from __future__ import annotations

import queue
from typing import Callable, Iterator

from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.sequence import Request


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
