"""What a step gave each scheduled row, as the host reads it (no jax).

``ModelRunner.fetch`` brings back the step's outputs in one transfer; the functions here decide
which rows asked for what and turn the arrays into per-row results with logprob dicts.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxllm.outputs import Logprob, PositionLogprobs
from jaxllm.request_handle import RequestError
from jaxllm.scheduler import ScheduledSequence
from jaxllm.sequence import Sequence


@dataclasses.dataclass
class RowResults:
    """What one step gave each scheduled row, on the host."""

    token_ids: list[int]
    logprobs: list[float]
    # Only for rows that asked: {row: {token id: Logprob}} and {row: [(position, entry)]}.
    top_logprobs: dict[int, PositionLogprobs]
    prompt_logprobs: dict[int, list[tuple[int, PositionLogprobs]]]
    # {row: error} for rows whose request failed in the step (a logits processor's fault):
    # their sampled token is void and the request ends with the error.
    errors: dict[int, RequestError] = dataclasses.field(default_factory=dict)
    # Speculative decoding: {row: (tokens, logprobs)} of each row with proposals: its
    # accepted proposals, then the target's token (1 .. d + 1 tokens).
    emitted: dict[int, tuple[list[int], list[float]]] = dataclasses.field(default_factory=dict)


def num_top_logprobs(seq: Sequence) -> int | None:
    """How many top alternatives the row needs: beam search's candidates, or ``logprobs``."""
    if seq.group is not None and seq.group.beam is not None:
        return seq.group.beam.num_candidates
    return seq.request.sampling_params.logprobs


def prompt_positions(item: ScheduledSequence) -> range:
    """The prompt positions p of a row whose next prompt token (p + 1) it scores: those it
    computes, below the last prompt token, when its request asks for prompt logprobs."""
    seq = item.seq
    if seq.request.sampling_params.prompt_logprobs is None:
        return range(0)
    return range(item.start, min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1))


def position_logprobs(token_id: int, logprob: float, rank: int, top_ids: np.ndarray,
                      top_logprobs: np.ndarray) -> PositionLogprobs:
    """{token id: Logprob} of the top alternatives, and of the token itself if not among them."""
    entry = {int(t): Logprob(float(lp), rank=i + 1) for i, (t, lp) in enumerate(zip(top_ids, top_logprobs))}
    entry.setdefault(int(token_id), Logprob(float(logprob), rank=int(rank)))
    return entry


def row_results(scheduled: list[ScheduledSequence], token_ids: np.ndarray, logprobs: np.ndarray,
                top: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
                prompt: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None,
                spec: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> RowResults:
    """Per-row results from a step's host arrays.

    Args:
        token_ids, logprobs: [S] of the sampled tokens.
        top: (ranks [S], top ids [S, K], top logprobs [S, K]), if some row asked.
        prompt: (logprobs [T], ranks [T], top ids [T, K], top logprobs [T, K]), if some row
            asked for prompt logprobs.
        spec: (token ids [S, Ks + 1], logprobs [S, Ks + 1], num accepted [S]) if some row
            had proposals.
    """
    num_rows = len(scheduled)
    ids, lps = token_ids[:num_rows].tolist(), logprobs[:num_rows].tolist()
    results = RowResults(ids, lps, {}, {})
    if top is not None:
        ranks, top_ids, top_lps = top
        for r, item in enumerate(scheduled):
            num = num_top_logprobs(item.seq)
            if num is not None:
                results.top_logprobs[r] = position_logprobs(ids[r], lps[r], ranks[r],
                                                            top_ids[r, :num], top_lps[r, :num])
    if spec is not None:
        spec_ids, spec_lps, accepted = spec
        for r, item in enumerate(scheduled):
            if item.num_drafts:
                end = int(accepted[r]) + 1
                results.emitted[r] = (spec_ids[r, :end].tolist(), spec_lps[r, :end].tolist())
    if prompt is not None:
        p_lps, p_ranks, p_top_ids, p_top_lps = prompt
        t = 0
        for r, item in enumerate(scheduled):
            positions = prompt_positions(item)
            if positions:
                seq, num = item.seq, item.seq.request.sampling_params.prompt_logprobs
                results.prompt_logprobs[r] = [
                    (p + 1, position_logprobs(seq.token_ids[p + 1], p_lps[i], p_ranks[i],
                                              p_top_ids[i, :num], p_top_lps[i, :num]))
                    for i, p in zip(range(t, t + len(positions)), positions)]
            t += item.num_new_tokens
    return results
