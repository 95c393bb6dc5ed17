"""The callers' side of the executor: a handle per request, the table of those in flight, and
the errors callers get: a RequestError when their own request failed (the engine goes on), an
EngineDeadError when the engine is gone."""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import RequestOutputKind
from jaxllm.sequence import Request


class EngineDeadError(RuntimeError):
    """The executor loop stopped on an error (the cause is chained) or was shut down."""


class RequestError(RuntimeError):
    """One request failed through its own fault (the cause is chained); its blocks are freed
    and the engine serves the other requests on."""


class LogitsProcessorError(RequestError):
    """A request's Python logits processor raised or returned a bad value
    (``jaxllm.logits_processors``)."""


def short_error(exc: BaseException, limit: int = 120) -> str:
    """``Type: message`` of ``exc``: its message's first line, cut to ``limit`` characters
    (a device error's message can run to pages)."""
    lines = str(exc).strip().splitlines()
    text = lines[0] if lines else ""
    if len(text) > limit or len(lines) > 1:
        text = text[:limit].rstrip() + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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


class RequestHandles:
    """The handles of the requests in flight, by request id, shared by the callers' threads and
    the executor's loop. Once the loop has died or the engine is shut down, it refuses new ones."""

    def __init__(self) -> None:
        self._handles: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._error: BaseException | None = None
        self.failure: str | None = None   # the loop's error, as its callers were told
        self._stopped = False

    def register(self, handles: list[RequestHandle], then: Callable[[], None]) -> None:
        """Registers ``handles`` and runs ``then`` (handing the requests to the loop) under one
        lock, so concurrent submissions reach the loop in the order they were accepted."""
        with self._lock:
            if self._error is not None:
                raise EngineDeadError(self.failure) from self._error
            if self._stopped:
                raise EngineDeadError("the engine was shut down")
            ids = [handle.request.request_id for handle in handles]
            clashes = [i for i in ids if i in self._handles] or sorted({i for i in ids if ids.count(i) > 1})
            if clashes:
                raise ValueError(f"request_id {clashes[0]!r} is already in flight")
            self._handles.update(zip(ids, handles))
            then()

    def get(self, request_id: str) -> RequestHandle | None:
        with self._lock:
            return self._handles.get(request_id)

    def send(self, request_id: str, output: RequestOutput) -> None:
        """Gives a request's caller an output; a finished one ends the handle."""
        with self._lock:
            handle = (self._handles.pop(request_id, None) if output.finished
                      else self._handles.get(request_id))
        if handle is not None:
            handle.put(output)

    def fail(self, request_id: str, error: RequestError) -> None:
        """Ends one request's handle with its own error (the engine goes on)."""
        with self._lock:
            handle = self._handles.pop(request_id, None)
        if handle is not None:
            handle.put(error)

    def stop(self) -> None:
        """Refuses new requests from now on (shutdown)."""
        with self._lock:
            self._stopped = True

    def fail_all(self, message: str, cause: BaseException | None = None) -> None:
        """Every caller still waiting gets an EngineDeadError; with ``cause`` (the loop's
        error, chained), later submissions are refused with it too."""
        with self._lock:
            if cause is not None and self._error is None:
                self._error, self.failure = cause, message
            handles = list(self._handles.values())
            self._handles.clear()
        for handle in handles:
            error = EngineDeadError(message)
            error.__cause__ = cause
            handle.put(error)
