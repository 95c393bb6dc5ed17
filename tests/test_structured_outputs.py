"""Structured outputs through the engine: every output satisfies its constraint (greedy and
sampled, many seeds), constrained rows leave plain rows' tokens unchanged, and the bitmask
step compiles once per step shape."""

from __future__ import annotations

import json
import re

import pytest
from conftest import TINY_ENGINE_OPTIONS

from jaxllm import Engine, SamplingParams, StructuredOutputsParams

SCHEMA = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["name", "age", "tags"], "additionalProperties": False}
REGEX = r"(cat|dog)-[0-9]{2,3}"
CHOICES = ["red", "green", "blue"]
PROMPTS = ["Tell me about Ada:", "JSON please", "x"]


@pytest.fixture(scope="module")
def engine(tiny_chat_llama_dir):
    path = tiny_chat_llama_dir[0]
    with Engine(str(path), **{**TINY_ENGINE_OPTIONS, "max_model_len": 160}) as eng:
        yield eng


def constrained(seed: int, temperature: float, **constraint) -> SamplingParams:
    return SamplingParams(temperature=temperature, seed=seed, max_tokens=100,
                          structured_outputs=StructuredOutputsParams(**constraint))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_every_output_satisfies_its_constraint(engine, temperature):
    import jsonschema

    seeds = range(6) if temperature else range(1)
    cases = [(prompt, seed) for prompt in PROMPTS for seed in seeds]
    outputs = engine.generate(
        [p for p, _ in cases] * 4,
        [constrained(s, temperature, json=SCHEMA) for _, s in cases]
        + [constrained(s, temperature, regex=REGEX) for _, s in cases]
        + [constrained(s, temperature, choice=CHOICES) for _, s in cases]
        + [constrained(s, temperature, json_object=True) for _, s in cases], use_tqdm=False)
    n = len(cases)
    # Bounded constraints always complete; an unbounded one (any JSON object: a random model
    # writes endless keys) may reach max_tokens, and is checked when it completes.
    for out in outputs[:3 * n]:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0]
    for out in outputs[:n]:
        jsonschema.validate(json.loads(out.outputs[0].text), SCHEMA)
    for out in outputs[n:2 * n]:
        assert re.fullmatch(REGEX, out.outputs[0].text)
    for out in outputs[2 * n:3 * n]:
        assert out.outputs[0].text in CHOICES
    for out in outputs[3 * n:]:
        if out.outputs[0].finish_reason == "stop":
            assert isinstance(json.loads(out.outputs[0].text), dict)
        else:
            assert out.outputs[0].text.startswith("{")
    if temperature:   # sampling explores: not every seed writes the same thing
        assert len({o.outputs[0].text for o in outputs[:n]}) > 1
    assert engine.stats()["kv_blocks_used"] == 0


def test_constrained_rows_leave_plain_rows_unchanged(engine):
    plain = [SamplingParams(temperature=t, seed=s, max_tokens=12, ignore_eos=True)
             for t, s in ((0.0, 1), (0.8, 2), (1.2, 3))]
    alone = [o.outputs[0].token_ids for o in engine.generate(PROMPTS, plain, use_tqdm=False)]
    mixed = engine.generate(PROMPTS + PROMPTS, plain + [constrained(i, 0.7, json=SCHEMA) for i in range(3)],
                            use_tqdm=False)
    assert [o.outputs[0].token_ids for o in mixed[:3]] == alone
    # A seeded constrained request gives the same tokens alone as in that batch.
    assert engine.generate(PROMPTS[1], constrained(1, 0.7, json=SCHEMA)).outputs[0].token_ids == \
        mixed[4].outputs[0].token_ids


def test_structured_steps_compile_once_per_shape(engine):
    prompts = ["ab", "cd"]
    engine.generate(prompts, [constrained(i, 1.0, regex=REGEX) for i in range(2)], use_tqdm=False)
    compiled = engine.stats()["num_compilations"]
    engine.generate(prompts, [constrained(i + 5, 1.0, choice=CHOICES) for i in range(2)], use_tqdm=False)
    assert engine.stats()["num_compilations"] == compiled


def test_n_completions_each_satisfy_the_constraint(engine):
    params = SamplingParams(n=3, temperature=1.0, seed=4, max_tokens=40,
                            structured_outputs=StructuredOutputsParams(regex=REGEX))
    out = engine.generate("pets:", params)
    assert len(out.outputs) == 3
    assert all(re.fullmatch(REGEX, c.text) for c in out.outputs)


@pytest.mark.parametrize("constraint, message", [
    ({"regex": "(unclosed"}, "structured_outputs.regex is invalid"),
    ({"grammar": "start: missing"}, "structured_outputs.grammar is invalid"),
])
def test_invalid_constraints_are_refused_at_submission_then_serves(engine, constraint, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("x", SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert engine.generate("x", SamplingParams(max_tokens=2, ignore_eos=True)).finished


def test_structured_outputs_need_a_tokenizer_and_no_beam_search(tiny):
    engine, _ = tiny
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        engine.generate([1, 2], SamplingParams(structured_outputs=StructuredOutputsParams(choice=["a"])))
    with pytest.raises(ValueError, match="beam search"):
        SamplingParams(use_beam_search=True, beam_width=2, temperature=0,
                       structured_outputs=StructuredOutputsParams(choice=["a"]))
