"""What the server tests share: a real ``python -m jaxllm serve`` process on a free loopback
port, and reading ``/metrics``."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

# The server's engine: the tiny Llama's whole 256-position context, so a request can run long
# enough to be aborted mid-way.
SERVER_ENGINE_ARGS = ("--max-model-len", "256", "--num-blocks", "160", "--block-size", "8",
                      "--max-num-seqs", "16", "--max-num-batched-tokens", "64",
                      "--max-logprobs", "16")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(model_dir: Path, log_path: Path, *args: str, env: dict[str, str] | None = None,
                   timeout_s: float = 120.0) -> Iterator[str]:
    """``python -m jaxllm serve`` on a free loopback port, its output in ``log_path``; yields
    its base URL once /health answers 200, and stops it (SIGTERM, then SIGKILL) on exit."""
    port = free_port()
    command = [sys.executable, "-m", "jaxllm", "serve", "--model", str(model_dir),
               "--port", str(port), "--log-level", "warning", *args]
    log = open(log_path, "w+")  # noqa: SIM115 - read back if the server fails to start
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, **(env or {})})
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(process, url, timeout_s, log)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def _wait_healthy(process: subprocess.Popen, url: str, timeout_s: float, log) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} was not healthy within {timeout_s} s")


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of sample ``name{labels}`` in Prometheus text (0.0 when absent)."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return 0.0


def wait_idle(url: str, timeout_s: float = 10.0) -> str:
    """Polls /metrics until no request runs or waits and no KV block is held; returns it."""
    deadline = time.monotonic() + timeout_s
    while True:
        text = httpx.get(f"{url}/metrics").text
        busy = sum(metric(text, name) for name in (
            "jaxllm:num_requests_running", "jaxllm:num_requests_waiting",
            "jaxllm:kv_cache_blocks_used"))
        if busy == 0 or time.monotonic() > deadline:
            return text
        time.sleep(0.05)
