"""Beam search bookkeeping on the host: which beams live on and which hypotheses are final.

The device only supplies, for every running beam, the top-K raw log-probabilities of its next
token (the sampler's top-logprob output); this module mirrors transformers' vectorised beam
search (``GenerationMixin._beam_search``) step for step, so results equal
``generate(num_beams=W, do_sample=False, ...)`` on the same weights:

* K = max(2, 1 + number of EOS ids) * W candidates are kept from all beams' continuations,
  scored by cumulative log-probability;
* the W best candidates that do not stop continue as beams (a stopping candidate is one that
  ends in EOS or reaches max_tokens);
* stopping candidates among the top W become finished hypotheses, scored by cumulative
  log-probability / generated_length ** length_penalty, and the W best hypotheses are kept;
* ``early_stopping`` decides when to stop: True once W hypotheses are finished, False when the
  best running beam (at its current length) cannot beat the worst hypothesis, "never" when it
  cannot even at max_tokens (for a positive length penalty).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from collections.abc import Sequence as SequenceT
from typing import Any

_NEG = -1.0e9  # transformers' "impossible" score, kept identical so ties resolve the same way


@dataclasses.dataclass(frozen=True)
class BeamCandidate:
    """A continuation chosen to run on: extend running beam ``parent`` by ``token_id``."""

    parent: int
    token_id: int
    score: float        # cumulative log-probability (_NEG-penalised if it stopped)


@dataclasses.dataclass(frozen=True)
class Hypothesis:
    output_token_ids: tuple[int, ...]
    output_logprobs: tuple[float, ...]
    score: float        # cumulative logprob / length ** length_penalty (_NEG-penalised if not final)
    finished: bool


class BeamSearchState:
    """One request's beam search.

    Args:
        beam_width: W.
        max_tokens: most generated tokens per beam (transformers' max_new_tokens).
        eos_token_ids: tokens that end a hypothesis (EOS and stop_token_ids).
        length_penalty, early_stopping: as in transformers' GenerationConfig.
    """

    def __init__(self, beam_width: int, max_tokens: int, eos_token_ids: frozenset[int],
                 length_penalty: float, early_stopping: bool | str) -> None:
        self.beam_width = beam_width
        self.max_tokens = max_tokens
        self.eos_token_ids = eos_token_ids
        self.length_penalty = length_penalty
        self.early_stopping = early_stopping
        self.num_candidates = max(2, 1 + len(eos_token_ids)) * beam_width
        self.running_scores: list[float] = [0.0]   # one beam (the prompt) before the first step
        self.hypotheses = [Hypothesis((), (), _NEG, False)] * beam_width
        self.improvement_possible = True
        self.done = False

    @classmethod
    def for_request(cls, params: Any, eos_token_ids: Iterable[int]) -> BeamSearchState:
        """The search a request's SamplingParams ask for; stop_token_ids end beams like EOS,
        and the model's EOS does too unless ``ignore_eos``."""
        eos = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        return cls(params.beam_width, params.max_tokens, frozenset(eos), params.length_penalty,
                   params.early_stopping)

    def step(self, beams: SequenceT[tuple[SequenceT[int], SequenceT[float]]],
             top_candidates: SequenceT[tuple[SequenceT[int], SequenceT[float]]]) -> list[BeamCandidate]:
        """Advances by one token.

        Args:
            beams: each running beam's (output tokens, their logprobs) so far (same lengths).
            top_candidates: per running beam, (token ids, raw log-probabilities) of at least
                ``num_candidates`` most likely next tokens, best first.
        Returns:
            The W beams to run next, each as (parent beam index, token, score); empty once
            ``done``.
        """
        length = len(beams[0][0]) + 1
        flat = [(self.running_scores[b] + lp, b, t)
                for b, (ids, lps) in enumerate(top_candidates)
                for t, lp in zip(ids[:self.num_candidates], lps[:self.num_candidates])]
        flat.sort(key=lambda c: -c[0])
        top = flat[:self.num_candidates]
        stops = [t in self.eos_token_ids or length >= self.max_tokens for _, _, t in top]

        running = sorted(
            (BeamCandidate(b, t, score + (_NEG if stop else 0.0)) for (score, b, t), stop in zip(top, stops)),
            key=lambda c: -c.score)[:self.beam_width]
        self._add_hypotheses(beams, top, stops, length)
        self.running_scores = [c.score for c in running]
        self._update_done(length, all(stops))
        return [] if self.done else running

    def best(self, n: int) -> list[Hypothesis]:
        """The n best hypotheses, best first."""
        return self.hypotheses[:n]

    def score(self, cumulative_logprob: float, length: int) -> float:
        """A beam's score: its cumulative log-probability / length ** length_penalty."""
        return cumulative_logprob / length ** self.length_penalty

    def _add_hypotheses(self, beams, top, stops, length: int) -> None:
        all_finished = all(h.finished for h in self.hypotheses)
        closed = (all_finished and self.early_stopping is True) or not self.improvement_possible
        new = []
        for rank, ((score, b, t), stop) in enumerate(zip(top, stops)):
            just_finished = stop and rank < self.beam_width
            penalised = self.score(score, length)
            if closed:
                penalised += _NEG
            if not just_finished:
                penalised += _NEG
            tokens, logprobs = beams[b]
            new.append(Hypothesis((*tokens, t), (*logprobs, score - self.running_scores[b]),
                                  penalised, just_finished))
        merged = sorted([*self.hypotheses, *new], key=lambda h: -h.score)   # stable: old first
        self.hypotheses = merged[:self.beam_width]

    def _update_done(self, length: int, every_candidate_stopped: bool) -> None:
        if self.early_stopping == "never" and self.length_penalty > 0:
            best_length = self.max_tokens
        else:
            best_length = length
        best_possible = self.running_scores[0] / best_length ** self.length_penalty
        worst = min(h.score for h in self.hypotheses)
        self.improvement_possible = self.improvement_possible and any(
            best_possible > (worst if h.finished else _NEG) for h in self.hypotheses)
        all_finished = all(h.finished for h in self.hypotheses)
        self.done = (not self.improvement_possible or (all_finished and self.early_stopping is True)
                     or every_candidate_stopped)
