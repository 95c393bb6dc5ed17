"""SamplingParams validation: every bad value names its field; edge values are accepted."""

from __future__ import annotations

import math

import pytest

from jaxllm.sampling_params import SamplingParams

INVALID = [
    ("n", 0), ("n", 2),
    ("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
    ("temperature", "1.0"), ("temperature", None),
    ("top_k", -2), ("top_k", 1.5), ("top_k", "3"), ("top_k", None),
    ("top_p", 0.0), ("top_p", -0.5), ("top_p", 1.01), ("top_p", math.nan), ("top_p", "0.5"),
    ("top_p", None),
    ("seed", -1), ("seed", 2**63), ("seed", 1.5), ("seed", "7"),
    ("max_tokens", 0), ("max_tokens", -3), ("max_tokens", 2.0), ("max_tokens", None),
    ("stop_token_ids", [-1]), ("stop_token_ids", [1, 2.5]), ("stop_token_ids", ["a"]),
]


@pytest.mark.parametrize("field, value", INVALID, ids=[f"{f}={v!r}" for f, v in INVALID])
def test_sampling_params_invalid_value_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_defaults():
    params = SamplingParams()
    assert (params.n, params.temperature, params.top_k, params.top_p) == (1, 1.0, 0, 1.0)
    assert params.seed is None and params.max_tokens == 16
    assert params.stop_token_ids == [] and not params.ignore_eos and params.skip_special_tokens
    assert not params.is_greedy


@pytest.mark.parametrize("fields", [
    dict(temperature=0), dict(temperature=0.0), dict(temperature=1e-6), dict(temperature=100.0),
    dict(top_k=0), dict(top_k=1), dict(top_k=10**6),
    dict(top_p=1), dict(top_p=1.0), dict(top_p=1e-9),
    dict(seed=0), dict(seed=2**63 - 1), dict(seed=2**32 + 5),
    dict(max_tokens=1), dict(max_tokens=10**6),
    dict(stop_token_ids=[0]), dict(stop_token_ids=[]), dict(stop_token_ids=[3, 3]),
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
