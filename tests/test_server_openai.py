"""The official ``openai`` client against a real ``python -m jaxllm serve`` process on loopback:
completions, chat, streaming with usage, n, logprobs, stop, seeds, errors, aborts on disconnect,
``/metrics``, and a bounded load test. One server process serves the whole module."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time

import httpx
import openai
import pytest

from server_harness import SERVER_ENGINE_ARGS, metric, running_server, wait_idle

API_KEY = "test-key"
MODEL = "tiny-chat"


@pytest.fixture(scope="module")
def server(tiny_chat_llama_dir, tmp_path_factory):
    """The server's base URL; its key comes from $JAXLLM_API_KEY (the flag's fallback)."""
    log = tmp_path_factory.mktemp("server") / "server.log"
    with running_server(tiny_chat_llama_dir[0], log, "--served-model-name", MODEL, "--no-warmup",
                        *SERVER_ENGINE_ARGS, env={"JAXLLM_API_KEY": API_KEY}) as url:
        yield url
        wait_idle(url)


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_llama_dir):
    return tiny_chat_llama_dir[2]


def _metrics(server: str) -> str:
    return httpx.get(f"{server}/metrics").text


def _assert_aborted_once(server: str, before: str, most_tokens: int) -> None:
    """After ``before``'s scrape, one request was aborted having generated fewer than
    ``most_tokens`` tokens, and nothing runs or holds a KV block any more."""
    after = wait_idle(server)
    assert metric(after, "jaxllm:kv_cache_blocks_used") == 0
    aborted = 'finished_reason="abort"'
    assert metric(after, "jaxllm:request_success_total", aborted) == \
        metric(before, "jaxllm:request_success_total", aborted) + 1
    generated = (metric(after, "jaxllm:generation_tokens_total")
                 - metric(before, "jaxllm:generation_tokens_total"))
    assert generated < most_tokens


def test_completion_greedy_with_usage(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == MODEL
    (choice,) = out.choices
    assert choice.finish_reason == "length" and choice.index == 0
    assert out.usage.prompt_tokens == len(tokenizer.encode("Hello"))
    assert out.usage.completion_tokens == 8
    again = client.completions.create(model=MODEL, prompt="Hello", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True})
    assert again.choices[0].text == choice.text


def test_models_version_health(client, server):
    assert [m.id for m in client.models.list()] == [MODEL]
    assert httpx.get(f"{server}/version").json()["version"]
    assert httpx.get(f"{server}/health").status_code == 200


def test_chat_and_its_stream_with_usage(client, tokenizer):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    options = dict(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                   extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**options)
    assert whole.object == "chat.completion"
    assert whole.choices[0].message.role == "assistant"
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert whole.usage.prompt_tokens == len(tokenizer.encode(prompt, add_special_tokens=False))
    chunks = list(client.chat.completions.create(**options, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == \
        whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 6
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_chat_max_tokens_defaults_to_the_context_left(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.usage.prompt_tokens + out.usage.completion_tokens == 256  # --max-model-len


def test_n_choices_and_streamed_n(client):
    out = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, n=3, seed=1,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 15
    texts: dict[int, str] = {}
    for chunk in client.completions.create(model=MODEL, prompt="abc", max_tokens=5, n=3, seed=1,
                                           stream=True, extra_body={"ignore_eos": True}):
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert texts == {c.index: c.text for c in out.choices}


def test_several_prompts_are_choices_in_prompt_order(client, tokenizer):
    out = client.completions.create(model=MODEL, prompt=["ab", "cde"], max_tokens=4, n=2,
                                    temperature=0)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both samples of a prompt agree
    assert out.usage.prompt_tokens == len(tokenizer.encode("ab")) + len(tokenizer.encode("cde"))


def test_completion_logprobs_shape(client):
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=5, logprobs=3,
                                    temperature=0, extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and max(top.values()) <= logprob  # greedy


def test_chat_logprobs_shape(client):
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=4, logprobs=True, top_logprobs=2,
                                         extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 2 and entry.logprob <= 0
        assert entry.bytes == list(entry.token.encode())
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob


def test_stop_string_ends_the_text(client):
    greedy = client.completions.create(model=MODEL, prompt="Hey", max_tokens=24, temperature=0,
                                       extra_body={"ignore_eos": True}).choices[0].text
    stop = next((ch for ch in greedy[2:] if ch.isalnum()), greedy[2])
    out = client.completions.create(model=MODEL, prompt="Hey", max_tokens=24, temperature=0,
                                    stop=[stop], extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and out.text == greedy[:greedy.index(stop)]


def test_seed_reproduces_sampling(client):
    def sample(seed: int) -> str:
        return client.completions.create(model=MODEL, prompt="Once", max_tokens=12,
                                         temperature=1.0, seed=seed).choices[0].text

    assert sample(123) == sample(123)
    assert len({sample(s) for s in (1, 2, 3)}) > 1


def test_vllm_extras_are_honoured(client):
    out = client.completions.create(model=MODEL, prompt="ab", max_tokens=6, temperature=0,
                                    extra_body={"top_k": 5, "min_p": 0.01, "repetition_penalty": 1.2,
                                                "min_tokens": 6, "priority": 1})
    assert out.usage.completion_tokens == 6
    beams = client.completions.create(model=MODEL, prompt="ab", max_tokens=4, n=2,
                                      extra_body={"use_beam_search": True})
    assert len(beams.choices) == 2


def test_wrong_or_missing_key_is_401(server):
    for headers in ({}, {"Authorization": "Bearer nope"}):
        r = httpx.post(f"{server}/v1/completions", json={"prompt": "x"}, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    with openai.OpenAI(base_url=f"{server}/v1", api_key="nope", max_retries=0) as bad:
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 0}, "top_p"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "logprobs": 99}, "logprobs"),
    ({"prompt": "x", "stop_token_ids": [999]}, "stop_token_ids"),
    ({"prompt": "x", "logit_bias": {"a": 1}}, "logit_bias"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 300}, "prompt"),
    ({"prompt": "x", "tools": [{"type": "function"}]}, "tools"),
    ({"prompt": "x", "use_beam_search": True, "temperature": 0.5}, "temperature"),
])
def test_invalid_completion_is_400_naming_the_field(server, body, param):
    r = httpx.post(f"{server}/v1/completions", json=body,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"]


def test_invalid_chat_is_400_naming_the_message(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user"}])
    assert info.value.body["param"] == "messages[0]"
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                       top_logprobs=2)
    assert info.value.body["param"] == "top_logprobs"


def test_response_format_and_structured_outputs_reach_the_engine(client):
    """The mapping only (the lead's engine tests cover the constraints themselves); a build
    whose SamplingParams has no structured_outputs answers 400 naming the field instead."""
    from jaxllm import SamplingParams

    messages = [{"role": "user", "content": "json please"}]
    if "structured_outputs" not in {f.name for f in dataclasses.fields(SamplingParams)}:
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model=MODEL, messages=messages,
                                           response_format={"type": "json_object"})
        assert info.value.body["param"] == "response_format"
        return
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"],
              "additionalProperties": False}
    out = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=40, seed=0,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema}})
    if out.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(out.choices[0].message.content)["a"], int)
    choice = client.completions.create(model=MODEL, prompt="pick", max_tokens=10,
                                       extra_body={"structured_outputs": {"choice": ["yes", "no"]}})
    assert choice.choices[0].text in ("yes", "no")
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt="x", extra_body={
            "structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}})
    assert "alternatives" in info.value.body["message"]


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-5", prompt="x", max_tokens=2)
    assert info.value.body["code"] == "model_not_found"


def test_streaming_client_disconnect_aborts_its_request(client, server):
    before = _metrics(server)
    stream = client.completions.create(model=MODEL, prompt="go", max_tokens=240, n=4, stream=True,
                                       extra_body={"ignore_eos": True})
    next(iter(stream))
    stream.close()
    _assert_aborted_once(server, before, 4 * 240 // 2)


def test_non_streaming_client_disconnect_aborts_its_request(server):
    before = _metrics(server)
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{server}/v1/completions", timeout=0.2,
                   headers={"Authorization": f"Bearer {API_KEY}"},
                   json={"prompt": "go", "max_tokens": 240, "n": 16, "ignore_eos": True})
    _assert_aborted_once(server, before, 16 * 240)


def test_metrics_report_requests_tokens_and_latencies(client, server, tokenizer):
    before = _metrics(server)
    client.completions.create(model=MODEL, prompt="metrics", max_tokens=5,
                              extra_body={"ignore_eos": True})
    text = _metrics(server)
    for name in ("jaxllm:num_requests_running", "jaxllm:num_requests_waiting",
                 "jaxllm:kv_cache_usage_perc", "jaxllm:prefix_cache_hits_total",
                 "jaxllm:prefix_cache_queries_total", "jaxllm:compilations_total",
                 "jaxllm:time_to_first_token_seconds_bucket", "jaxllm:time_per_output_token_seconds_bucket"):
        assert name in text, name
    for name, delta in (("jaxllm:generation_tokens_total", 5), ("jaxllm:prompt_tokens_total", len(tokenizer.encode("metrics"))),
                        ("jaxllm:time_to_first_token_seconds_count", 1),
                        ("jaxllm:time_per_output_token_seconds_count", 1)):
        assert metric(text, name) - metric(before, name) == delta, name
    assert metric(text, "jaxllm:compilations_total") > 0


def test_load_200_streams_from_32_clients(server):
    """Every stream completes with its usage; afterwards no request runs and no KV block is
    held. Bounded: 200 requests of at most 16 tokens."""
    num_requests, concurrency = 200, 32
    results: list[tuple[int, int, str | None]] = []

    async def one(client: openai.AsyncOpenAI, i: int) -> None:
        max_tokens = 4 + i % 13
        stream = await client.completions.create(
            model=MODEL, prompt=f"request {i}", max_tokens=max_tokens, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        finish, completion_tokens = None, -1
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].finish_reason:
                finish = chunk.choices[0].finish_reason
            if chunk.usage:
                completion_tokens = chunk.usage.completion_tokens
        results.append((max_tokens, completion_tokens, finish))

    async def main() -> None:
        queue = list(range(num_requests))
        async with openai.AsyncOpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0,
                                      timeout=60) as client:
            async def worker() -> None:
                while queue:
                    await one(client, queue.pop())
            await asyncio.gather(*(worker() for _ in range(concurrency)))

    start = time.monotonic()
    asyncio.run(main())
    elapsed = time.monotonic() - start
    assert len(results) == num_requests
    assert all(done == expected and finish == "length" for expected, done, finish in results)
    text = wait_idle(server)
    assert metric(text, "jaxllm:kv_cache_blocks_used") == 0
    assert metric(text, "jaxllm:num_requests_running") == 0
    assert elapsed < 60, elapsed
