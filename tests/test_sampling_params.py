"""SamplingParams validation: every bad value names its field; edge values are accepted."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest

from jaxllm.sampling_params import RequestOutputKind, SamplingParams

INVALID = [
    ("n", 0), ("n", -1), ("n", 1.5), ("n", True),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1.0"), ("temperature", None),
    ("top_k", -2), ("top_k", 1.5), ("top_k", "3"), ("top_k", None),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", "0.5"),
    ("top_p", None),
    ("min_p", -0.01), ("min_p", 1.5), ("min_p", math.nan),
    ("repetition_penalty", 0.0), ("repetition_penalty", -1.0), ("repetition_penalty", math.inf),
    ("presence_penalty", 2.01), ("presence_penalty", -2.5), ("presence_penalty", None),
    ("frequency_penalty", 3), ("frequency_penalty", -2.01), ("frequency_penalty", math.nan),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", "7"),
    ("stop", ""), ("stop", [""]), ("stop", ["a", 3]), ("stop", 5),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1, 2.5]), ("stop_token_ids", ["a"]),
    ("stop_token_ids", 7),
    ("include_stop_str_in_output", 1), ("ignore_eos", "yes"), ("skip_special_tokens", None),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", None),
    ("min_tokens", -1), ("min_tokens", 17), ("min_tokens", 1.0),
    ("logprobs", -1), ("logprobs", 1.5), ("prompt_logprobs", -1), ("prompt_logprobs", "2"),
    ("logit_bias", {-1: 1.0}), ("logit_bias", {3: math.nan}), ("logit_bias", {3: math.inf}),
    ("logit_bias", {"3": 1.0}), ("logit_bias", [(3, 1.0)]),
    ("allowed_token_ids", []), ("allowed_token_ids", [-2]), ("allowed_token_ids", [1.0]),
    ("use_beam_search", 1),
    ("beam_width", 2), ("length_penalty", 0.5), ("early_stopping", True),
    ("early_stopping", "always"), ("early_stopping", 1),
    ("strategy", ""), ("strategy", 3), ("strategy_args", {"a": 1}),
    ("logits_processors", [1]), ("logits_processors", lambda ids, logits: logits),
    ("output_kind", "delta"),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_sampling_params_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults_are_vllms():
    params = SamplingParams()
    expected = dict(n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
                    presence_penalty=0.0, frequency_penalty=0.0, seed=None, stop=[],
                    stop_token_ids=[], include_stop_str_in_output=False, ignore_eos=False,
                    max_tokens=16, min_tokens=0, logprobs=None, prompt_logprobs=None,
                    skip_special_tokens=True, logit_bias=None, allowed_token_ids=None,
                    use_beam_search=False, beam_width=1, length_penalty=1.0, early_stopping=False,
                    strategy=None, strategy_args=None, logits_processors=None,
                    output_kind=RequestOutputKind.CUMULATIVE, structured_outputs=None)
    assert {name: getattr(params, name) for name in expected} == expected
    assert {f.name for f in dataclasses.fields(SamplingParams)} == set(expected)
    assert not params.is_greedy and not params.needs_penalties


@pytest.mark.parametrize("fields", [
    dict(temperature=0), dict(temperature=0.0), dict(temperature=1e-6), dict(temperature=100.0),
    dict(top_k=0), dict(top_k=1), dict(top_k=10**6),
    dict(top_p=1), dict(top_p=1.0), dict(top_p=1e-9),
    dict(seed=0), dict(seed=2**63 - 1), dict(seed=2**32 + 5),
    dict(max_tokens=1), dict(max_tokens=10**6),
    dict(stop_token_ids=[0]), dict(stop_token_ids=[]), dict(stop_token_ids=[3, 3]),
    dict(n=4), dict(min_p=0.0), dict(min_p=1.0), dict(repetition_penalty=1e-3),
    dict(presence_penalty=-2.0), dict(presence_penalty=2.0), dict(frequency_penalty=-2),
    dict(stop=["a", "bc"]), dict(min_tokens=16), dict(min_tokens=0, max_tokens=1),
    dict(logprobs=0), dict(logprobs=20), dict(prompt_logprobs=0), dict(logit_bias={0: -5.5}),
    dict(allowed_token_ids=[0, 7]), dict(strategy="mirostat", strategy_args={"tau": 5.0}),
    dict(use_beam_search=True, temperature=0, beam_width=4, n=4, length_penalty=0.0,
         early_stopping="never"),
    dict(use_beam_search=True, temperature=0, early_stopping=True),
], ids=repr)
def test_sampling_params_edge_values_are_accepted(fields):
    params = SamplingParams(**fields)
    for name, value in fields.items():
        assert getattr(params, name) == value


def test_sampling_params_top_k_minus_one_means_disabled():
    assert SamplingParams(top_k=-1).top_k == 0


def test_sampling_params_stop_token_ids_none_becomes_an_empty_list():
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    params = SamplingParams(stop_token_ids=(5, 6))
    assert params.stop_token_ids == [5, 6]


def test_sampling_params_is_greedy_only_at_temperature_zero():
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(temperature=0.0, top_k=5).is_greedy
    assert not SamplingParams(temperature=1e-6).is_greedy


def test_sampling_params_stop_is_normalised_to_a_list():
    assert SamplingParams(stop="###").stop == ["###"]
    assert SamplingParams(stop=("a", "b")).stop == ["a", "b"]
    assert SamplingParams(stop=None).stop == []


def test_sampling_params_logit_bias_is_clamped_to_plus_minus_100():
    params = SamplingParams(logit_bias={1: 1e9, 2: -250, np.int64(3): 0.5})
    assert params.logit_bias == {1: 100.0, 2: -100.0, 3: 0.5}


def test_sampling_params_numpy_numbers_are_plain_python_numbers_after_validation():
    params = SamplingParams(top_k=np.int32(5), temperature=np.float32(0.5), seed=np.int64(3),
                            allowed_token_ids=np.array([1, 2]).tolist())
    assert (type(params.top_k), type(params.temperature), type(params.seed)) == (int, float, int)


@pytest.mark.parametrize("fields, field", [
    (dict(use_beam_search=True), "temperature"),
    (dict(use_beam_search=True, temperature=0, top_p=0.9), "top_p"),
    (dict(use_beam_search=True, temperature=0, top_k=5), "top_k"),
    (dict(use_beam_search=True, temperature=0, min_p=0.1), "min_p"),
    (dict(use_beam_search=True, temperature=0, n=3, beam_width=2), "n"),
    (dict(use_beam_search=True, temperature=0, strategy="x"), "strategy"),
])
def test_sampling_params_beam_search_is_deterministic_and_n_fits_the_beams(fields, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**fields)


def test_sampling_params_needs_penalties_when_any_penalty_is_not_neutral():
    assert not SamplingParams(repetition_penalty=1, presence_penalty=0, frequency_penalty=0).needs_penalties
    assert SamplingParams(repetition_penalty=1.1).needs_penalties
    assert SamplingParams(presence_penalty=-0.5).needs_penalties
    assert SamplingParams(frequency_penalty=0.1).needs_penalties


def test_sampling_params_logits_processors_are_kept_in_order():
    first, second = (lambda ids, logits: logits), (lambda ids, logits: logits * 2)
    assert SamplingParams(logits_processors=(first, second)).logits_processors == [first, second]
