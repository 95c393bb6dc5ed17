"""InputProcessor without a model: prompts in, validated requests with private SamplingParams out."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.input_processor import InputProcessor, normalize_prompts
from jaxllm.sampling_params import SamplingParams
from jaxllm.sampling_rows import SamplingLimits


class CharTokenizer:
    """One token per character (ord % 50); a chat template only when given one."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def encode(self, text, add_special_tokens=True):
        return [ord(ch) % 50 for ch in text]

    def apply_chat_template(self, conversation, tokenize, add_generation_prompt):
        return "".join(f"<{m['role']}>{m['content']}" for m in conversation) + "<assistant>"


USER_HI = {"role": "user", "content": "hi"}


def make(tokenizer=CharTokenizer(), **overrides) -> InputProcessor:
    options = dict(max_model_len=64, max_num_seqs=4, max_logprobs=5, num_usable_blocks=8,
                   block_size=4, strategies={}, seed=0, model_source="tiny")
    options.update(overrides)
    return InputProcessor(tokenizer, 50, frozenset({7}), **options)


def test_requests_take_a_private_read_only_copy_of_shared_params():
    params = SamplingParams(max_tokens=4, stop=["x"])
    single, requests = make().requests(["ab", "cd"], params, None)
    assert not single and [r.prompt_token_ids for r in requests] == [(47, 48), (49, 0)]
    a, b = (r.sampling_params for r in requests)
    assert a is not params and a is not b and a == params
    params.stop.append("y")                       # the caller's object changes later...
    params.max_tokens = 8
    assert a.stop == ["x"] and a.max_tokens == 4  # ...the submitted requests do not
    with pytest.raises(AttributeError, match="belongs to a submitted request"):
        a.temperature = 0.5
    assert dataclasses.replace(a, temperature=0.5).temperature == 0.5


def test_requests_get_distinct_seeds_unless_given_and_ids_in_order():
    processor = make()
    _, requests = processor.requests([[1, 2], [3], [4]], [SamplingParams(), SamplingParams(seed=9),
                                                          SamplingParams()], [0, 2, 1])
    assert [r.request_id for r in requests] == ["0", "1", "2"]
    assert requests[1].seed == 9 and requests[0].seed != requests[2].seed
    assert [r.priority for r in requests] == [0, 2, 1] and requests[0].eos_token_ids == {7}


@pytest.mark.parametrize("prompt, params, match", [
    ("", SamplingParams(), "prompt is empty"),
    ([50], SamplingParams(), r"token ids must be integers in \[0, 50\)"),
    ([1] * 64, SamplingParams(), "max_model_len is 64"),
    ([1] * 60, SamplingParams(max_tokens=5), r"60 tokens\) \+ max_tokens \(5\) = 65"),
    ([1] * 30, SamplingParams(max_tokens=10), "needs 10 KV blocks but the whole pool has 8"),
    ([1], SamplingParams(stop_token_ids=[51]), r"stop_token_ids must be token ids in \[0, 50\)"),
    ([1], SamplingParams(logprobs=6), "exceeds the engine's max_logprobs"),
    ([1], SamplingParams(n=5), r"n=5 exceeds max_num_seqs \(4\)"),
    ([1], SamplingParams(strategy="nope"), "strategy 'nope' is not registered"),
    ([1], SamplingParams(use_beam_search=True, beam_width=2, temperature=0, stop=["x"]),
     "use_beam_search does not support stop"),
])
def test_invalid_requests_are_refused_naming_the_problem(prompt, params, match):
    with pytest.raises(ValueError, match=match):
        make().request(prompt, params)


def test_token_lists_over_the_engine_widths_are_refused_naming_the_limit():
    processor = make(limits=SamplingLimits(max_logit_bias=2, max_allowed_token_ids=3,
                                           max_min_tokens_stop_ids=1))
    processor.request([1], SamplingParams(logit_bias={1: 1.0, 2: -1.0}, allowed_token_ids=[1, 2, 3]))
    with pytest.raises(ValueError, match=r"logit_bias has 3 entries, over the engine's max_logit_bias \(2\)"):
        processor.request([1], SamplingParams(logit_bias={1: 1.0, 2: 1.0, 3: 1.0}))
    with pytest.raises(ValueError, match="allowed_token_ids has 4 entries"):
        processor.request([1], SamplingParams(allowed_token_ids=[1, 2, 3, 4]))
    # min_tokens bans the stop ids and the EOS id (7): two, over a width of one.
    with pytest.raises(ValueError, match="max_min_tokens_stop_ids"):
        processor.request([1], SamplingParams(min_tokens=2, stop_token_ids=[3]))


def test_prompts_without_a_tokenizer_must_be_token_ids():
    processor = make(tokenizer=None)
    assert processor.request([3, 4], SamplingParams()).prompt_token_ids == (3, 4)
    with pytest.raises(ValueError, match="tiny has no tokenizer"):
        processor.request("hi", SamplingParams())
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        processor.request([3], SamplingParams(stop=["x"]))


def test_chat_prompts_use_the_template_or_say_there_is_none():
    single, prompts = make(tokenizer=CharTokenizer(chat_template="...")).chat_prompts([USER_HI])
    assert single and prompts[0]["prompt"] == "<user>hi<assistant>"
    assert len(prompts[0]["prompt_token_ids"]) == 19
    with pytest.raises(ValueError, match="needs a chat template.*tiny has no chat template"):
        make().chat_prompts([USER_HI])
    with pytest.raises(ValueError, match="m.gguf carries no tokenizer.chat_template"):
        make(model_source="m.gguf").chat_prompts([USER_HI])


def test_normalize_prompts_tells_one_prompt_from_a_list():
    assert normalize_prompts("hi") == (True, ["hi"])
    assert normalize_prompts([1, 2]) == (True, [[1, 2]])
    assert normalize_prompts([[1], "a"]) == (False, [[1], "a"])
    with pytest.raises(ValueError, match="empty list"):
        normalize_prompts([])
    with pytest.raises(TypeError, match="got int"):
        normalize_prompts(3)
