"""Bad input is refused before any work starts, with the field (and index) that is wrong, and
the engine serves on: token ids of the wrong type, None where a list belongs, malformed chat
messages (checked before the chat template runs)."""

from __future__ import annotations

import numpy as np
import pytest
from test_input_processor import CharTokenizer, make

from jaxllm import SamplingParams
from jaxllm.chat_messages import conversations
from jaxllm.input_processor import normalize_prompts

GREEDY = SamplingParams(temperature=0, max_tokens=3)


@pytest.mark.parametrize("prompt, error, match", [
    ([True, False, True], TypeError, r"prompt token ids must be ints: \[0\] is bool True"),
    ([1, np.bool_(True)], TypeError, r"prompt token ids must be ints: \[1\] is bool"),
    ([1.0, 2.0], TypeError, r"prompt token ids must be ints: \[0\] is float 1.0"),
    ([3, np.float32(2)], TypeError, r"\[1\] is float32"),
    ([3, "4"], TypeError, r"\[1\] is str '4'"),
    ({"prompt_token_ids": None}, TypeError, "prompt_token_ids is None; expected a list of token ids"),
    ({"prompt_token_ids": "12"}, TypeError, "prompt_token_ids must be a list of token ids, got str"),
    ({"prompt_token_ids": [1, True]}, TypeError, r"prompt_token_ids must be ints: \[1\] is bool"),
    ({"prompt_token_ids": np.array([1.0, 2.0])}, TypeError, r"\[0\] is float 1.0"),
    ({"prompt_token_ids": np.ones((2, 2), int)}, TypeError, "a 1-D array, got shape"),
    ({"prompt_token_ids": []}, ValueError, r"prompt is empty \(0 tokens\)"),
    ([1, -1], ValueError, r"token ids must be integers in \[0, 50\); got \[-1\]"),
    (None, TypeError, "a prompt must be a str, a list of token ids or a dict, got NoneType"),
])
def test_bad_token_ids_are_refused_naming_the_field_and_index(prompt, error, match):
    with pytest.raises(error, match=match):
        make().request(prompt, SamplingParams())


def test_numpy_integer_token_ids_are_taken_as_ints():
    processor = make()
    for prompt in ([np.int64(3), np.uint8(4)], np.array([3, 4], np.int32),
                   {"prompt_token_ids": np.array([3, 4])}, {"prompt_token_ids": (3, 4)}):
        request = processor.request(prompt, SamplingParams())
        assert request.prompt_token_ids == (3, 4)
        assert all(type(t) is int for t in request.prompt_token_ids)


def test_a_list_of_numbers_is_one_prompt_and_none_is_refused():
    assert normalize_prompts([True, False]) == (True, [[True, False]])
    assert normalize_prompts([1.5, 2]) == (True, [[1.5, 2]])
    assert normalize_prompts(np.array([1, 2])) == (True, [[1, 2]])
    with pytest.raises(TypeError, match="prompts must be a str, a list of token ids, a dict or a "
                                        "list of those, got NoneType"):
        normalize_prompts(None)


def test_sampling_token_lists_refuse_booleans_and_accept_none():
    assert SamplingParams(stop_token_ids=None).stop_token_ids == []
    for field in ("stop_token_ids", "allowed_token_ids"):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: [True]})
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={True: 1.0})


# ---------------------------------------------------------------- chat messages

USER = {"role": "user", "content": "hi"}


def test_a_string_is_one_user_message_and_text_parts_are_joined():
    assert conversations("hello") == (True, [[{"role": "user", "content": "hello"}]])
    assert conversations([USER]) == (True, [[USER]])
    assert conversations([[USER], (USER, USER)]) == (False, [[USER], [USER, USER]])
    parts = {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
             "name": "x"}
    assert conversations([parts]) == (True, [[{"role": "user", "content": "a\nb", "name": "x"}]])


@pytest.mark.parametrize("messages, error, match", [
    (None, TypeError, r"chat messages must be a string \(one user message\), a conversation .* got NoneType"),
    ([], ValueError, "chat messages are empty"),
    (["hi", "there"], TypeError, r"messages\[0\] must be a dict with 'role' and 'content', got str 'hi' "
                                 r"\(a single string is taken as one user message\)"),
    ([USER, {"role": "user"}], ValueError, r"messages\[1\] has no 'content' \(keys: \['role'\]\)"),
    ([{"content": "hi"}], ValueError, r"messages\[0\] has no 'role'"),
    ([{"role": 3, "content": "hi"}], TypeError, r"messages\[0\]\['role'\] must be a str, got 3"),
    ([{"role": "", "content": "hi"}], ValueError, r"messages\[0\]\['role'\] is empty"),
    ([{"role": "user", "content": None}], TypeError, r"messages\[0\]\['content'\] must be a str or a "
                                                     r"list of .* got NoneType None"),
    ([{"role": "user", "content": 5}], TypeError, r"messages\[0\]\['content'\] .* got int 5"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}], TypeError,
     r"messages\[0\]\['content'\]\[0\] must be a \{'type': 'text', 'text': str\} part \(only text"),
    ([[USER], [USER, "oops"]], TypeError, r"messages\[1\]\[1\] must be a dict"),
    ([[USER], USER], TypeError, r"messages\[1\] must be a conversation \(a list of message dicts\), got dict"),
    ([[USER], []], ValueError, r"messages\[1\] is an empty conversation"),
])
def test_bad_chat_messages_are_refused_naming_index_and_field(messages, error, match):
    with pytest.raises(error, match=match):
        conversations(messages)


def test_chat_prompts_check_every_message_before_any_template_runs():
    class CountingTokenizer(CharTokenizer):
        calls = 0

        def apply_chat_template(self, conversation, **kwargs):
            CountingTokenizer.calls += 1
            return super().apply_chat_template(conversation, **kwargs)

    processor = make(tokenizer=CountingTokenizer(chat_template="..."))
    with pytest.raises(ValueError, match=r"messages\[1\]\[0\] has no 'content'"):
        processor.chat_prompts([[USER], [{"role": "user"}]])
    assert CountingTokenizer.calls == 0
    single, prompts = processor.chat_prompts("hi")
    assert single and prompts == [{"prompt": "<user>hi<assistant>",
                                   "prompt_token_ids": CharTokenizer().encode("<user>hi<assistant>")}]
    # Without a tokenizer the messages are still checked first.
    with pytest.raises(TypeError, match="got NoneType"):
        make(tokenizer=None).chat_prompts(None)
    with pytest.raises(ValueError, match="tiny has no tokenizer"):
        make(tokenizer=None).chat_prompts("hi")


def test_a_real_chat_template_gets_a_checked_conversation(tiny_chat_llama_dir):
    """transformers' tokenizer and jinja template (conftest's byte-level one)."""
    processor = make(tokenizer=tiny_chat_llama_dir[2])
    single, prompts = processor.chat_prompts("hello there")
    assert single and prompts[0]["prompt"] == "<user>hello there<|im_end|><assistant>"
    parts = [{"role": "user", "content": [{"type": "text", "text": "hello"},
                                          {"type": "text", "text": "there"}]}]
    assert processor.chat_prompts([parts])[1][0]["prompt"] == "<user>hello\nthere<|im_end|><assistant>"
    # What used to fail inside jinja2 (UndefinedError) or transformers is named before it runs.
    with pytest.raises(ValueError, match=r"messages\[0\] has no 'content'"):
        processor.chat_prompts([{"role": "user"}])
    with pytest.raises(TypeError, match=r"messages\[0\] must be a dict .* got str 'h'"):
        processor.chat_prompts(["h", "i"])


# ---------------------------------------------------------------- through the engine

@pytest.mark.parametrize("call, error, match", [
    (lambda e: e.generate([True, False, True], GREEDY), TypeError, r"\[0\] is bool True"),
    (lambda e: e.generate({"prompt_token_ids": None}, GREEDY), TypeError, "prompt_token_ids is None"),
    (lambda e: e.generate([[1, 2], [1.0, 2.0]], GREEDY), TypeError, r"\[0\] is float 1.0"),
    (lambda e: e.generate(None, GREEDY), TypeError, "prompts must be"),
    (lambda e: e.generate_stream([1, np.float64(2)], GREEDY), TypeError, r"\[1\] is float64"),
    (lambda e: e.chat(None), TypeError, "chat messages must be"),
    (lambda e: e.chat(["hi", "there"]), TypeError, r"messages\[0\] must be a dict"),
    (lambda e: e.chat([{"role": "user"}]), ValueError, r"messages\[0\] has no 'content'"),
    (lambda e: e.chat([{"role": "user", "content": 7}]), TypeError, r"messages\[0\]\['content'\]"),
])
def test_the_engine_refuses_bad_input_before_any_work_and_serves_on(tiny, call, error, match):
    engine, _ = tiny
    steps = engine.stats()["num_steps"]
    with pytest.raises(error, match=match):
        call(engine)
    assert engine.stats()["num_steps"] == steps   # nothing was submitted
    assert engine.generate([1, 2, 3], GREEDY).finished


def test_engine_chat_without_a_tokenizer_checks_messages_then_says_so(tiny):
    engine, _ = tiny
    with pytest.raises(ValueError, match="has no tokenizer"):
        engine.chat("hi")
