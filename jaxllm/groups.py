"""Requests with several sequences: n > 1 parallel samples and beam search (no jax).

Parallel sampling runs one sequence until its prompt is computed, then forks completions 1..n-1
off it. Beam search keeps W running beams; once every beam's next-token candidates are in,
``BeamSearchState`` picks the next W beams: a beam continued once runs on with its new token, a
beam continued more than once forks, and a beam not continued is dropped.

These functions only change the group and make the new sequences. The Postprocessor applies
what they return through the scheduler, which alone shares and frees KV blocks.
"""

from __future__ import annotations

import dataclasses

from jaxllm.beam_search import BeamSearchState, Hypothesis
from jaxllm.sequence import Request, Sequence, SequenceStatus


@dataclasses.dataclass(eq=False)
class SequenceGroup:
    """The sequences of one request that has several (n > 1, or beam search).

    ``seqs`` are the completions in index order (n > 1) or the running beams, best first;
    ``beam`` holds the search state, and ``final`` what the caller is sent when it ends.
    """

    seqs: list[Sequence]
    beam: BeamSearchState | None = None
    # Beam search: each running beam's top-K next-token candidates from the last step.
    pending: dict[Sequence, tuple[list[int], list[float]]] = dataclasses.field(default_factory=dict)
    final: list[Sequence] | None = None

    @property
    def is_finished(self) -> bool:
        if self.beam is not None:
            return self.final is not None
        return all(seq.is_finished for seq in self.seqs)


@dataclasses.dataclass
class BeamStep:
    """What one beam-search step changes, for the Postprocessor to apply."""

    tokens: list[tuple[Sequence, int, float]]  # each next beam's new token and its logprob
    forks: list[tuple[Sequence, Sequence]]     # (parent, new beam): new beams to run
    dropped: list[Sequence]                    # running beams that end here


def new_sequence(request: Request) -> Sequence:
    """A request's first sequence; with n > 1 or beam search, the first of its group."""
    seq = Sequence.from_request(request)
    params = request.sampling_params
    if params.use_beam_search:
        seq.group = SequenceGroup([seq], beam=BeamSearchState.for_request(params, request.eos_token_ids))
    elif params.n > 1:
        seq.group = SequenceGroup([seq])
    return seq


def child_seed(seed: int, index: int) -> int:
    """Completion ``index``'s seed: the request's own for index 0, then decorrelated ones."""
    return (seed + index * 0x9E3779B97F4A7C15) % 2**63


def needs_parallel_forks(seq: Sequence) -> bool:
    """Whether ``seq`` is the first of n > 1 completions and its siblings are not forked yet."""
    return (seq.group is not None and seq.group.beam is None
            and len(seq.group.seqs) < seq.request.sampling_params.n)


def fork_parallel_samples(first: Sequence) -> list[Sequence]:
    """n > 1: completions 1..n-1, forked off the first once its prompt is computed.

    Each holds the prompt only and its own seed: it recomputes the last prompt token (sharing
    the other prompt blocks) to sample its own first token. They join the group.
    """
    children = [_prompt_only(first, index, dataclasses.replace(
        first.request, seed=child_seed(first.request.seed, index)))
        for index in range(1, first.request.sampling_params.n)]
    first.group.seqs.extend(children)
    return children


def take_beam_candidates(beam: Sequence, token_ids: list[int], logprobs: list[float]) -> None:
    """Stores a beam's next-token candidates, best first, until every running beam's are in."""
    beam.group.pending[beam] = (token_ids, logprobs)


def beam_candidates_complete(group: SequenceGroup) -> bool:
    """Whether every running beam's candidates are in: the beam step can run."""
    return len(group.pending) == len(group.seqs)


def beam_step(group: SequenceGroup) -> BeamStep:
    """Every running beam has its candidates: picks the next beams (or ends the search)."""
    beams, search = group.seqs, group.beam
    scores_before = list(search.running_scores)
    chosen = search.step([(b.output_token_ids, b.output_logprobs) for b in beams],
                         [group.pending[b] for b in beams])
    group.pending.clear()
    if search.done:
        group.final = [_hypothesis_sequence(beams[0], h, search.eos_token_ids)
                       for h in search.best(beams[0].request.sampling_params.n)]
        return BeamStep([], [], list(beams))
    forks, tokens, used = [], [], set()
    for index, candidate in enumerate(chosen):
        parent = beams[candidate.parent]
        if candidate.parent in used:   # a second continuation of one beam: fork it
            beam = parent.fork(index, list(parent.token_ids))
            forks.append((parent, beam))
        else:
            used.add(candidate.parent)
            beam = parent
        beam.index = index
        tokens.append((beam, candidate.token_id, candidate.score - scores_before[candidate.parent]))
    group.seqs = [beam for beam, _, _ in tokens]
    return BeamStep(tokens, forks, [b for i, b in enumerate(beams) if i not in used])


def abort(group: SequenceGroup) -> None:
    """After its live sequences finished with "abort": the request reports exactly n
    completions (vLLM). Beam search: the n best beams so far, best first. Completions that
    never started (n > 1 before the prompt ran, or fewer beams than n) are empty."""
    first = group.seqs[0]
    n = first.request.sampling_params.n
    if group.beam is not None:
        group.final = _best_beams_so_far(group, n)
    reported = group.final if group.beam is not None else group.seqs
    for index in range(len(reported), n):
        empty = _prompt_only(first, index)
        empty.status, empty.finish_reason = SequenceStatus.FINISHED, "abort"
        reported.append(empty)


def completions_to_report(seq: Sequence) -> tuple[list[Sequence], bool] | None:
    """The sequences whose completions ``seq``'s request reports now, in index order, and
    whether the request is finished; None while a beam search runs (it reports once, at the end)."""
    group = seq.group
    if group is None:
        return [seq], seq.is_finished
    if group.beam is not None:
        return None if group.final is None else (group.final, True)
    return sorted(group.seqs, key=lambda s: s.index), group.is_finished


def _best_beams_so_far(group: SequenceGroup, n: int) -> list[Sequence]:
    """An aborted search's n best beams, ranked as vLLM ranks them: the finished hypotheses and
    the running beams together, by beam score (a running beam scored at its current length)."""
    search, first = group.beam, group.seqs[0]
    ranked = [(h.score, _hypothesis_sequence(first, h, search.eos_token_ids))
              for h in search.hypotheses if h.finished]
    ranked += [(search.score(sum(beam.output_logprobs), beam.num_output_tokens), beam)
               for beam in group.seqs if beam.num_output_tokens]
    ranked.sort(key=lambda entry: -entry[0])   # stable: hypotheses first on a tie
    return [seq for _, seq in ranked[:n]]


def _prompt_only(first: Sequence, index: int, request: Request | None = None) -> Sequence:
    """Completion ``index`` of ``first``'s group, holding the prompt and no output yet."""
    seq = first.fork(index, list(first.request.prompt_token_ids), request)
    seq.output_logprobs, seq.output_top_logprobs = [], []
    return seq


def _hypothesis_sequence(beam: Sequence, hypothesis: Hypothesis, eos_token_ids: frozenset[int]) -> Sequence:
    """A finished beam-search hypothesis as a Sequence the OutputProcessor can report."""
    request = beam.request
    last = hypothesis.output_token_ids[-1] if hypothesis.output_token_ids else None
    return Sequence(request=request, token_ids=[*request.prompt_token_ids, *hypothesis.output_token_ids],
                    metrics=beam.metrics, status=SequenceStatus.FINISHED,
                    output_logprobs=list(hypothesis.output_logprobs), prompt_logprobs=beam.prompt_logprobs,
                    finish_reason="stop" if last in eos_token_ids else "length")
