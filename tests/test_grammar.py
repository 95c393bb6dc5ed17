"""The host side of structured outputs (jaxllm.grammar): constraints -> validated, cached
grammars, matchers, bitmask rows, and the whitespace guard; with a real byte-level tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from jaxllm.grammar import MAX_JSON_INDENT, GrammarCompiler, GrammarMasks, consume, mask_words
from jaxllm.structured_outputs import StructuredOutputsParams

VOCAB = 320
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def compiler(tiny_chat_llama_dir):
    tokenizer = tiny_chat_llama_dir[2]
    return GrammarCompiler(tokenizer, VOCAB, frozenset({tokenizer.eos_token_id})), tokenizer


def allowed(matcher) -> np.ndarray:
    out = np.zeros((2, mask_words(VOCAB)), np.int32)
    GrammarMasks().fill([(matcher, 1)], out)
    assert not out[0].any()                                  # only the asked row is written
    return np.nonzero(np.unpackbits(out[1].view(np.uint8), bitorder="little")[:VOCAB])[0]


def walk(matcher, rng, prefer=None, limit=600) -> list[int]:
    """Random tokens the mask allows (``prefer``'s first allowed one when it has one) until
    the grammar stops."""
    tokens = []
    for _ in range(limit):
        ids = allowed(matcher)
        preferred = [t for t in (prefer or []) if t in ids]
        token = preferred[0] if preferred else int(rng.choice(ids))
        tokens.append(token)
        if consume(matcher, token) == "stop":
            return tokens
    raise AssertionError("the grammar never stopped")


@pytest.mark.parametrize("seed", range(6))
def test_random_walks_under_each_constraint_satisfy_it(compiler, seed):
    import jsonschema

    grammars, tokenizer = compiler
    eos = tokenizer.eos_token_id
    rng = np.random.default_rng(seed)

    closing = [eos] + [i for i in range(VOCAB) if tokenizer.decode([i]) in ("}", '"', "]")]

    def text(params):
        # Random tokens, but closing ones when allowed, so unbounded grammars end.
        tokens = walk(grammars.matcher(params), rng, prefer=closing if rng.random() < 0.5 else [eos])
        return tokenizer.decode([t for t in tokens if t != eos])

    jsonschema.validate(json.loads(text(StructuredOutputsParams(json=SCHEMA))), SCHEMA)
    assert isinstance(json.loads(text(StructuredOutputsParams(json_object=True))), dict)
    assert text(StructuredOutputsParams(choice=["yes", "no", "maybe"])) in {"yes", "no", "maybe"}
    assert re.fullmatch(r"[a-c]{2,4}-\d", text(StructuredOutputsParams(regex=r"[a-c]{2,4}-\d")))
    assert text(StructuredOutputsParams(grammar='start: "x" ("y" | "z")')) in {"xy", "xz"}


def test_free_json_whitespace_is_bounded(compiler):
    """A model that always prefers whitespace still has to write the object: each gap holds one
    space or a newline and an indentation, so it cannot loop on whitespace until max_tokens."""
    grammars, tokenizer = compiler
    spaces = [i for i in range(VOCAB) if tokenizer.decode([i]) in (" ", "\n", "  ")]
    tokens = walk(grammars.matcher(StructuredOutputsParams(json=SCHEMA)), np.random.default_rng(0),
                  prefer=spaces)
    text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
    assert json.loads(text).keys() == {"name", "age"}
    outside_strings = re.sub(r'"(?:[^"\\]|\\.)*"', '""', text)
    gaps = re.findall(r"[ \t\n\r]+", outside_strings)
    assert all(gap == " " or re.fullmatch(r"\n {0,%d}" % MAX_JSON_INDENT, gap) for gap in gaps), gaps
    compact = walk(grammars.matcher(StructuredOutputsParams(json=SCHEMA, disable_any_whitespace=True)),
                   np.random.default_rng(0), prefer=spaces)
    compact_text = tokenizer.decode([t for t in compact if t != tokenizer.eos_token_id])
    assert json.dumps(json.loads(compact_text), separators=(",", ":"), ensure_ascii=False) == compact_text


def test_json_properties_come_in_the_schemas_order(compiler):
    grammars, tokenizer = compiler
    for order in (["name", "age"], ["age", "name"]):
        schema = {**SCHEMA, "properties": {k: SCHEMA["properties"][k] for k in order}}
        tokens = walk(grammars.matcher(StructuredOutputsParams(json=schema)), np.random.default_rng(1),
                      prefer=[tokenizer.eos_token_id])
        text = tokenizer.decode([t for t in tokens if t != tokenizer.eos_token_id])
        assert list(json.loads(text)) == order


def test_grammars_are_cached_by_content(compiler):
    grammars, _ = compiler
    before = grammars.validate.cache_info()
    grammars.matcher(StructuredOutputsParams(json=dict(SCHEMA)))
    grammars.matcher(StructuredOutputsParams(json=json.dumps(SCHEMA)))
    after = grammars.validate.cache_info()
    assert after.hits - before.hits >= 1 and after.misses - before.misses <= 1


@pytest.mark.parametrize("params, message", [
    ({"regex": "(ab"}, "structured_outputs.regex is invalid"),
    ({"grammar": "start: undefined_rule"}, "structured_outputs.grammar is invalid"),
    ({"json": {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}, "structured_outputs.json is invalid"),
])
def test_invalid_constraints_are_refused_naming_the_field(compiler, params, message):
    grammars, _ = compiler
    with pytest.raises(ValueError, match=message):
        grammars.matcher(StructuredOutputsParams(**params))


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one"),
    ({"regex": "a", "choice": ["a"]}, "exactly one"),
    ({"choice": []}, "non-empty list"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"json": [1, 2]}, "JSON schema object"),
    ({"json_object": False, "regex": ""}, "exactly one|non-empty string"),
])
def test_structured_outputs_params_validate_on_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        StructuredOutputsParams(**kwargs)


def test_a_token_the_grammar_refuses_is_reported(compiler):
    grammars, tokenizer = compiler
    matcher = grammars.matcher(StructuredOutputsParams(choice=["yes"]))
    bad = tokenizer.encode("no")[0]
    assert bad not in allowed(grammars.matcher(StructuredOutputsParams(choice=["yes"])))
    assert consume(matcher, bad) is not None


def test_compiler_needs_a_tokenizer():
    with pytest.raises(ValueError, match="tokenizer"):
        GrammarCompiler(None, VOCAB, frozenset())


def test_the_step_applies_a_bitmask_exactly_as_llguidance_reads_it():
    import jax.numpy as jnp
    from llguidance.numpy import apply_token_bitmask_inplace

    from jaxllm.token_lists import apply_grammar_mask

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, VOCAB)).astype(np.float32)
    mask = rng.integers(-2**31, 2**31, size=(3, mask_words(VOCAB))).astype(np.int32)
    mask[1] = -1                                                 # an unconstrained row
    expected = logits.copy()
    apply_token_bitmask_inplace(expected, mask)
    np.testing.assert_array_equal(np.asarray(apply_grammar_mask(jnp.asarray(logits), jnp.asarray(mask))),
                                  expected)
