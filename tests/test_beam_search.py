"""Beam search bookkeeping on the host: BeamSearchState's scores and the group's beam steps.

Hand-computed: no model and no scheduler (groups.beam_step only changes the group; the
Postprocessor runs its forks and drops, see test_postprocess.py). That the whole search equals
transformers' ``num_beams`` search is checked on a real model in test_parallel_and_beam.py.
"""

from __future__ import annotations

import pytest

from jaxllm.beam_search import BeamSearchState
from jaxllm.groups import beam_candidates_complete, beam_step, new_sequence, take_beam_candidates
from jaxllm.sampling_params import SamplingParams
from jaxllm.sequence import Request

EOS = 9


def test_beam_search_state_hand_computed_steps():
    state = BeamSearchState(beam_width=2, max_tokens=3, eos_token_ids=frozenset({EOS}), length_penalty=1.0,
                            early_stopping=False)
    assert state.num_candidates == 4
    chosen = state.step([((), ())], [([EOS, 1, 2, 3], [-0.1, -0.5, -1.0, -2.0])])
    # EOS (rank 0) becomes a finished hypothesis scored -0.1 / 1; tokens 1 and 2 run on.
    assert [(c.parent, c.token_id) for c in chosen] == [(0, 1), (0, 2)]
    assert state.hypotheses[0].output_token_ids == (EOS,) and state.hypotheses[0].finished
    assert state.hypotheses[0].score == pytest.approx(-0.1)
    assert not state.done                       # one of two hypothesis slots is still open
    chosen = state.step([((1,), (-0.5,)), ((2,), (-1.0,))],
                        [([EOS, 4, 5, 6], [-0.2, -3.0, -3.1, -3.2]), ([EOS, 4, 5, 6], [-0.3, -2.0, -2.1, -2.2])])
    # Candidates: (b0, 9) -0.7, (b1, 9) -1.3, (b1, 4) -3.0, (b1, 5) -3.1; both EOS ones finish,
    # scored -0.35 and -0.65; the best running beam, -3.0 / 2, cannot beat -0.35: done.
    assert chosen == [] and state.done
    best = state.best(2)
    assert [h.output_token_ids for h in best] == [(EOS,), (1, EOS)]
    assert [h.score for h in best] == pytest.approx([-0.1, -0.35])
    assert best[1].output_logprobs == pytest.approx((-0.5, -0.2))


def test_beam_search_state_for_request_ends_beams_on_stop_ids_and_eos_unless_ignored():
    params = SamplingParams(use_beam_search=True, beam_width=2, temperature=0, stop_token_ids=[5])
    assert BeamSearchState.for_request(params, {EOS}).eos_token_ids == {5, EOS}
    ignoring = SamplingParams(use_beam_search=True, beam_width=2, temperature=0, stop_token_ids=[5],
                              ignore_eos=True)
    state = BeamSearchState.for_request(ignoring, {EOS})
    assert state.eos_token_ids == {5} and state.num_candidates == 4


def test_beam_search_state_length_penalty_divides_by_the_generated_length():
    state = BeamSearchState(beam_width=1, max_tokens=2, eos_token_ids=frozenset({EOS}), length_penalty=2.0,
                            early_stopping=False)
    state.step([((), ())], [([1, 2], [-1.0, -2.0])])
    state.step([((1,), (-1.0,))], [([3, 4], [-1.0, -2.0])])   # max_tokens: the beam finishes
    assert state.done and state.best(1)[0].output_token_ids == (1, 3)
    assert state.best(1)[0].score == pytest.approx(-2.0 / 2 ** 2.0)


def _beam_request(**params):
    params = SamplingParams(**{"use_beam_search": True, "temperature": 0, "max_tokens": 3, **params})
    return Request("r", None, (1, 2), params, 0, frozenset({EOS}), 0.0)


def _take(group, *candidates):
    """Each running beam's candidates (token ids, logprobs), in beam order."""
    for beam, (ids, logprobs) in zip(list(group.seqs), candidates):
        assert not beam_candidates_complete(group)
        take_beam_candidates(beam, ids, logprobs)
    assert beam_candidates_complete(group)


def test_beam_step_continues_forks_and_drops_beams():
    first = new_sequence(_beam_request(beam_width=2, n=2))
    group = first.group
    _take(group, ([1, 2, 3, 4], [-0.1, -0.5, -1.0, -2.0]))
    step = beam_step(group)
    # Both continuations come from the one beam: it runs on with the best, a fork takes the other.
    (parent, fork), = step.forks
    assert parent is first and fork.token_ids == [1, 2] and fork.index == 1 and fork.group is group
    assert [(b, t, lp) for b, t, lp in step.tokens] == [(first, 1, pytest.approx(-0.1)),
                                                        (fork, 2, pytest.approx(-0.5))]
    assert step.dropped == [] and group.seqs == [first, fork] and group.pending == {}
    for beam, token, logprob in step.tokens:                  # the Postprocessor appends them
        beam.token_ids.append(token)
        beam.output_logprobs.append(logprob)
    # Beam 1's continuations beat beam 0's: beam 1 runs on and forks, beam 0 is dropped.
    _take(group, ([5, 6, 7, 8], [-3.0, -3.1, -3.2, -3.3]), ([5, 6, 7, 8], [-0.1, -0.2, -3.0, -4.0]))
    step = beam_step(group)
    assert step.dropped == [first]
    assert [(b.output_token_ids, t) for b, t, _ in step.tokens] == [([2], 5), ([2], 6)]
    assert step.tokens[0][0] is fork and [b.index for b in group.seqs] == [0, 1]
    assert [lp for _, _, lp in step.tokens] == pytest.approx([-0.1, -0.2])


def test_beam_step_when_done_reports_the_best_hypotheses():
    first = new_sequence(_beam_request(beam_width=2, n=2, max_tokens=1))
    group = first.group
    _take(group, ([EOS, 3, 4, 5], [-0.1, -0.5, -1.0, -2.0]))
    step = beam_step(group)
    assert step.tokens == [] and step.forks == [] and step.dropped == [first]
    assert [(s.output_token_ids, s.finish_reason) for s in group.final] == [([EOS], "stop"), ([3], "length")]
    assert [s.output_logprobs for s in group.final] == [[-0.1], [-0.5]]
    assert group.is_finished and all(s.is_finished for s in group.final)
