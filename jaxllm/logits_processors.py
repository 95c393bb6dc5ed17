"""Python logits processors on the host, where a processor's fault stays with its request (no jax).

A request's ``SamplingParams.logits_processors`` run inside the compiled step, through one host
callback over the whole batch's logits (the step variant compiled with ``host_processors``).
An exception escaping that callback fails the whole step, and with it the executor loop and
every request in the engine. So :class:`HostProcessors` runs each sampling row's processors
on its own copy of the row, in order, and checks what each returns: an array of the row's
shape, of a floating dtype, without NaN, without +inf where the input was finite, and with
some token left at a finite logit (-inf bans a token). A row whose processor raises or returns
a bad value keeps the logits it came in with and records a :class:`LogitsProcessorError`
(processor and request named, the original exception chained as ``__cause__``); the step
samples on. ``ModelRunner.fetch`` hands the step's faults over with its results, the
Postprocessor finishes the request through the scheduler (which frees its blocks) and drops
its sampled token, and the executor gives the caller the error.

Why not re-run the step without the faulty row: the sampler treats rows independently (each
row has its own settings and its own key; the batch-wide ``lax.cond`` switches only skip work
that no row needs), so the other rows' tokens from the faulty step already are those of a step
without it. A re-run would cost a second device step per fault, and it could not simply repeat
the step: the first run already advanced the device state (KV writes, penalty counts, token
feedback).

Processors run for the rows that sample a token only (not for prefill chunks before the last).
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from jaxllm.request_handle import LogitsProcessorError, short_error
from jaxllm.scheduler import ScheduledSequence
from jaxllm.sequence import Sequence


class HostProcessors:
    """The Python logits processors of the rows of the step being prepared, run from its host
    callback, and the faults of the steps not fetched yet (by sequence: a step with processors
    may be dispatched before the previous step is fetched; their sampling rows never share a
    sequence, since a sequence with processors waits for its pending token)."""

    def __init__(self) -> None:
        self._rows: dict[int, Sequence] = {}
        self._faults: dict[Sequence, LogitsProcessorError] = {}

    def prepare(self, rows: dict[int, Sequence]) -> None:
        """The next step's rows that sample with processors: {row: sequence}."""
        self._rows = rows

    @property
    def active(self) -> bool:
        """Whether the last prepared step runs processors (its host callback must run before
        the next step is prepared, which replaces its rows)."""
        return bool(self._rows)

    def __call__(self, logits: np.ndarray) -> np.ndarray:
        """The host callback: [S, V] logits -> [S, V] float32 with each row's processors
        applied; a faulty row keeps its logits and its fault is recorded."""
        logits = np.array(logits, np.float32)
        for r, seq in self._rows.items():
            try:
                logits[r] = run_processors(seq, logits[r])
            except LogitsProcessorError as error:
                self._faults[seq] = error
        return logits

    def take_faults(self, scheduled: list[ScheduledSequence]) -> dict[int, LogitsProcessorError]:
        """The faults of a fetched step's sampling rows, by row (``RowResults.errors``)."""
        if not self._faults:
            return {}
        return {r: self._faults.pop(item.seq) for r, item in enumerate(scheduled)
                if item.completes_prefill and item.seq in self._faults}


def run_processors(seq: Sequence, row: np.ndarray) -> np.ndarray:
    """``seq``'s processors applied in order to ``row`` [V] (not modified); raises
    LogitsProcessorError if one raises or returns a bad value."""
    for processor in seq.request.sampling_params.logits_processors:
        try:
            result = processor(seq.output_token_ids, row.copy())
        except Exception as exc:  # noqa: BLE001 - user code: its fault is its request's
            raise _error(processor, seq, f"raised {short_error(exc)}") from exc
        problem, checked = check_result(result, row)
        if problem:
            raise _error(processor, seq, problem)
        row = checked
    return row


def check_result(result: Any, row: np.ndarray) -> tuple[str | None, np.ndarray]:
    """(what is wrong with a processor's ``result`` for input ``row``, or None; the result as
    float32)."""
    if result is None:
        return "returned None instead of the row's logits", row
    try:
        out = np.asarray(result)
    except Exception as exc:  # noqa: BLE001 - an object numpy cannot convert
        return f"returned {type(result).__name__}, which is not an array ({short_error(exc)})", row
    if out.shape != row.shape:
        return f"returned shape {out.shape}, expected {row.shape}", row
    if not np.issubdtype(out.dtype, np.floating):
        return f"returned dtype {out.dtype}, expected floating-point logits", row
    out = out.astype(np.float32)
    nan = np.isnan(out)
    if nan.any():
        return f"returned NaN at {int(nan.sum())} of {out.size} tokens", row
    new_inf = np.isposinf(out) & ~np.isposinf(row)
    if new_inf.any():
        return f"returned +inf at {int(new_inf.sum())} tokens whose input was finite", row
    if not np.isfinite(out).any():
        return "banned every token (no finite logit left)", row
    return None, out


def _error(processor: Callable[..., Any], seq: Sequence, problem: str) -> LogitsProcessorError:
    name = getattr(processor, "__qualname__", None) or type(processor).__qualname__
    return LogitsProcessorError(f"logits processor {name} of request {seq.request_id!r} {problem}")
