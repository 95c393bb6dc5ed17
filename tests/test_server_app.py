"""The server's app in-process (the shared tiny engine behind a TestClient): the waiting limit,
a dead engine, the body limit; and the ``jaxllm`` command line's errors and help."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest
from fastapi.testclient import TestClient

from jaxllm.__main__ import main
from jaxllm.server.app import build_app

MODEL = "tiny"
PROMPT = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 2}  # the tiny engine has no tokenizer


@pytest.fixture
def app_client(tiny):
    engine, _ = tiny

    def make(**options) -> TestClient:
        return TestClient(build_app(engine, served_model_name=MODEL, **options))
    return make


def test_full_waiting_queue_is_503_with_retry_after(app_client):
    client = app_client(max_waiting_requests=1)
    gate = client.app.state.gate
    gate.acquire(gate.capacity)  # the engine's max_num_seqs requests in flight
    try:
        assert client.post("/v1/completions", json={**PROMPT, "n": 1}).status_code == 200
        several = client.post("/v1/completions", json={**PROMPT, "prompt": [[1, 2], [3, 4]]})
        assert several.status_code == 503 and several.headers["retry-after"] == "1"
        assert several.json()["error"]["code"] == "queue_full"
    finally:
        gate.release(gate.capacity)
    assert client.post("/v1/completions", json={**PROMPT, "prompt": [[1, 2], [3, 4]]}).status_code == 200
    assert gate.in_flight == 0


def test_streamed_and_failed_requests_leave_the_queue(app_client):
    client = app_client()
    with client.stream("POST", "/v1/completions", json={**PROMPT, "stream": True}) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert client.post("/v1/completions", json={**PROMPT, "temperature": -1}).status_code == 400
    assert client.app.state.gate.in_flight == 0


def test_dead_engine_is_503_on_health_and_requests(app_client, tiny, monkeypatch):
    engine, _ = tiny
    client = app_client()
    assert client.get("/health").status_code == 200
    dead = {**engine.stats(), "engine_dead": True, "error": "RuntimeError: boom"}
    monkeypatch.setattr(engine, "stats", lambda: dead)
    health = client.get("/health")
    assert health.status_code == 503 and "boom" in health.json()["error"]["message"]
    refused = client.post("/v1/completions", json=PROMPT)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "engine_dead"
    assert "jaxllm:engine_dead 1.0" in client.get("/metrics").text


def test_body_over_the_limit_is_413_and_bad_json_400(app_client):
    client = app_client(max_body_bytes=64)
    big = client.post("/v1/completions", json={**PROMPT, "prompt": list(range(40))})
    assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"
    bad = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]
    assert client.post("/v1/completions", json=PROMPT).status_code == 200


def test_unknown_fields_are_ignored_harmless_refused_ones_accepted(app_client):
    client = app_client()
    for extra in ({"metadata": {"a": 1}, "store": False}, {"tool_choice": "none"},
                  {"best_of": 1}, {"echo": False}):
        assert client.post("/v1/completions", json={**PROMPT, **extra}).status_code == 200, extra
    refused = client.post("/v1/completions", json={**PROMPT, "best_of": 3})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "best_of"


def test_chat_without_template_is_400(app_client):
    response = app_client().post("/v1/chat/completions",
                                 json={"messages": [{"role": "user", "content": "hi"}]})
    assert response.status_code == 400 and "tokenizer" in response.json()["error"]["message"]


def test_unknown_route_and_method_keep_openai_error_shape(app_client):
    client = app_client()
    assert set(client.get("/v1/nothing").json()["error"]) == {"message", "type", "param", "code"}
    assert client.get("/v1/completions").status_code == 405


# ---- the command line ----

def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for shown in ("--host HOST address to bind", "(default: 127.0.0.1)", "(default: 8000)",
                  "(default: 256)", "(default: 4194304)", "--max-num-seqs", "(default: 64)",
                  "JAXLLM_API_KEY", "Sampling without a seed is therefore reproducible"):
        assert shown in text, shown


@pytest.mark.parametrize("argv, message", [
    (["serve", "--model", "/no/such/model", "--port", "0"], "/no/such/model"),
    (["generate", "hi", "--model", "/no/such/model"], "/no/such/model"),
])
def test_user_mistake_is_one_line_exit_2(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    error = [line for line in err.splitlines() if "error" in line]
    assert len(error) == 1 and error[0].startswith("jaxllm: error: ") and message in error[0]
    assert "Traceback" not in err


def test_debug_shows_the_traceback():
    with pytest.raises(FileNotFoundError):
        main(["generate", "hi", "--model", "/no/such/model", "--debug"])


def test_bad_option_value_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--max-num-seqs", "0"])
    assert info.value.code == 2 and "--max-num-seqs: must be a positive integer" in capsys.readouterr().err


def test_port_in_use_fails_before_the_model_loads(capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", "/no/such/model", "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_missing_serve_extra_names_the_install_command(capsys, monkeypatch):
    import jaxllm.server

    real = jaxllm.server.importlib.util.find_spec
    monkeypatch.setattr(jaxllm.server.importlib.util, "find_spec",
                        lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["serve", "--model", "/no/such/model", "--port", "0"]) == 2
    assert 'pip install "jaxllm[serve]"' in capsys.readouterr().err


def test_cli_and_server_package_import_light():
    code = ("import jaxllm.__main__, jaxllm.server, jaxllm.server.cli, sys; "
            "print(sorted({m.partition('.')[0] for m in sys.modules} & "
            "{'jax', 'fastapi', 'uvicorn', 'prometheus_client', 'torch', 'transformers'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
