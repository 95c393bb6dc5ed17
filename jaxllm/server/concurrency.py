"""Asyncio plumbing of the handlers: several prompts' streams as one, and a client's
disconnect cancelling its work.

Cancelling is how requests are aborted: a cancelled consumer of ``Engine.generate_async`` runs
its ``finally``, which aborts the request in the engine, so every path here cancels (never
abandons) the tasks it started.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")
Receive = Callable[[], Awaitable[dict[str, Any]]]


class ClientDisconnected(Exception):
    """The client went away before its response was ready; its work was cancelled."""


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """``(stream index, item)`` from all streams as items arrive; one stream's error stops all.

    A single stream is iterated directly (no task). Closing or cancelling the merged iterator
    cancels the streams' tasks.
    """
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as stream:
            async for item in stream:
                yield 0, item
        return
    queue: asyncio.Queue[tuple[int, Any, BaseException | None]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async with contextlib.aclosing(stream) as items:
                async for item in items:
                    await queue.put((index, item, None))
            await queue.put((index, done, None))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who raises it
            await queue.put((index, done, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
            else:
                yield index, item
    finally:
        await cancel_all(tasks)


async def gather_all(awaitables: list[Awaitable[T]]) -> list[T]:
    """asyncio.gather, except that one failure (or a cancel) cancels the rest before raising."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    finally:
        await cancel_all(tasks)


async def cancel_all(tasks: list[asyncio.Future[Any]]) -> None:
    """Cancels the unfinished tasks and waits until they have run their cleanup."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending)


async def wait_for_disconnect(receive: Receive) -> None:
    """Returns when the ASGI server reports the client gone (once the body has been read,
    uvicorn's ``receive`` blocks until then)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """``work``'s result, or ClientDisconnected once ``work`` was cancelled because the client
    went away first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        await cancel_all([task, watcher])
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()
