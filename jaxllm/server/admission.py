"""The bounded waiting queue: how many requests the server lets wait for the engine.

The engine's scheduler queues without limit, so an overloaded server would accept work it can
only finish after its clients gave up. The server counts the requests it has handed to the
engine and not yet finished (each prompt of a request is one); the first ``capacity`` (the
engine's ``max_num_seqs``) can run at once, up to ``max_waiting`` more may wait, and beyond that
a request is refused with 503 and ``Retry-After`` before any work starts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class QueueFull(Exception):
    """Admitting the request would exceed the waiting limit."""


class AdmissionGate:
    """Counts requests in flight (asyncio code only: one thread, no lock)."""

    def __init__(self, capacity: int, max_waiting: int) -> None:
        if capacity < 1 or max_waiting < 0:
            raise ValueError(f"need capacity >= 1 and max_waiting >= 0, got {capacity}, {max_waiting}")
        self.capacity = capacity
        self.max_waiting = max_waiting
        self.in_flight = 0

    @property
    def waiting(self) -> int:
        """Requests in flight beyond what the engine can run at once."""
        return max(0, self.in_flight - self.capacity)

    def acquire(self, count: int = 1) -> None:
        """Admits ``count`` requests or raises QueueFull."""
        if self.in_flight + count > self.capacity + self.max_waiting:
            raise QueueFull(f"the server has {self.in_flight} requests in flight and at most "
                            f"{self.max_waiting} may wait beyond the {self.capacity} the engine "
                            "runs at once; retry later")
        self.in_flight += count

    def release(self, count: int = 1) -> None:
        self.in_flight -= count

    @contextlib.contextmanager
    def admitted(self, count: int = 1) -> Iterator[None]:
        self.acquire(count)
        try:
            yield
        finally:
            self.release(count)
