"""Multi-host (``jaxllm.multihost``) and its launcher (``jaxllm.launch``): two jax.distributed
processes on localhost, one faked CPU device each, a model split over both, give the same greedy
text as one process; the step messages round-trip; a follower's failure is reported and ends the
job; the launcher refuses bad arguments before starting anything."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from jaxllm import Engine, SamplingParams, launch, multihost
from jaxllm.step_inputs import StepKey

ENGINE_FLAGS = ["--max-model-len", "64", "--num-blocks", "32", "--block-size", "8",
                "--max-num-seqs", "4", "--max-num-batched-tokens", "32"]
PROMPT, MAX_TOKENS = "Hello world", 12


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_generate_the_same_text_as_one(tiny_chat_llama_dir):
    path = str(tiny_chat_llama_dir[0])
    with Engine(path, max_model_len=64, num_blocks=32, block_size=8, max_num_seqs=4,
                max_num_batched_tokens=32) as engine:
        expected = engine.generate(PROMPT, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    assert len(expected.outputs[0].token_ids) >= 4   # enough decode steps to compare
    command = [sys.executable, "-m", "jaxllm.launch", "--num-processes", "2", "--coordinator",
               f"127.0.0.1:{_free_port()}", "--heartbeat-timeout", "10", "--init-timeout", "60",
               "--", "generate", PROMPT, "--model", path, "--max-tokens", str(MAX_TOKENS),
               "--tensor-parallel-size", "2", *ENGINE_FLAGS]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "1"}
    job = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env, start_new_session=True)
    try:
        stdout, stderr = job.communicate(timeout=300)
    finally:   # the launcher and both processes, whatever happened
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == 0, stderr[-3000:]
    assert stdout.endswith(f"{PROMPT}{expected.outputs[0].text}\n"), stdout   # after gloo's lines


def _message() -> tuple[StepKey, list, tuple[np.ndarray, np.ndarray]]:
    seeds = [(3, np.array([5, 6, -1], np.int32), 1)]
    return StepKey(8, 2, 4, structured=True), seeds, (np.arange(7, dtype=np.int32),
                                                      np.linspace(0, 1, 5, dtype=np.float32))


def test_step_message_round_trips():
    key, seeds, (ints, floats) = _message()
    got = multihost.decode(multihost.encode(key, seeds, (ints, floats)))
    assert got.key == key and isinstance(got.key, StepKey)
    np.testing.assert_array_equal(got.buffers[0], ints)
    np.testing.assert_array_equal(got.buffers[1], floats)
    assert [(s, t.tolist(), n) for s, t, n in got.penalty_seeds] == [(3, [5, 6, -1], 1)]
    assert multihost.decode(b"stop") is None


class FakeClient:
    """The jax.distributed client's key-value store, in a dict."""

    def __init__(self) -> None:
        self.store: dict[str, bytes | str] = {}

    def key_value_set_bytes(self, key: str, value: bytes) -> None:
        assert key not in self.store
        self.store[key] = value

    def key_value_set(self, key: str, value: str, allow_overwrite: bool = False) -> None:
        self.store[key] = value

    def key_value_delete(self, key: str) -> None:
        del self.store[key]

    def blocking_key_value_get_bytes(self, key: str, timeout_ms: int) -> bytes:
        return self.store[key]


class FakeRunner:
    def __init__(self, sizes: tuple[int, int]) -> None:
        self.sizes, self.ran, self.on_dispatch = sizes, [], None
        self.layout = self

    def packed(self, key: StepKey):
        return type("Layout", (), {"sizes": self.sizes})

    def run_packed(self, key, seeds, buffers) -> None:
        self.ran.append(key)


def test_follower_replays_the_leaders_steps_until_it_stops():
    client = FakeClient()
    leader = multihost.MultiHost(FakeRunner((7, 5)), client, process_index=0)
    for _ in range(multihost._WINDOW + 1):
        leader.publish(*_message())
    leader.close()
    leader.close()
    # Steps older than the window are deleted (the last write, the stop, deleted step 1).
    assert "jaxllm/step/0" not in client.store and "jaxllm/step/1" not in client.store
    follower = multihost.MultiHost(FakeRunner((7, 5)), client, process_index=1)
    follower.num_steps = 2                        # as if it had read the deleted ones
    assert follower.follow() == multihost._WINDOW + 1
    assert follower.runner.ran == [_message()[0]] * (multihost._WINDOW - 1)


def test_follower_with_another_layout_fails_and_says_why():
    client = FakeClient()
    multihost.MultiHost(FakeRunner((7, 5)), client, process_index=0).publish(*_message())
    follower = multihost.MultiHost(FakeRunner((9, 5)), client, process_index=1)
    with pytest.raises(RuntimeError, match="same model and options"):
        follower.follow()
    assert "process 1 failed at step 0" in client.store["jaxllm/error/1"]


def test_leader_refuses_python_logits_processors():
    leader = multihost.MultiHost(FakeRunner((7, 5)), FakeClient(), process_index=0)
    key, seeds, buffers = _message()
    with pytest.raises(NotImplementedError, match="logits processors"):
        leader.publish(key._replace(host_processors=True), seeds, buffers)


def test_model_must_span_every_process():
    with pytest.raises(ValueError, match="tensor_parallel_size must be the number of devices"):
        multihost.check_config(2)


@pytest.mark.parametrize("argv, message", [
    (["--coordinator", "localhost", "--", "generate", "x"], "host:port"),
    (["--coordinator", "h:70000", "--", "generate", "x"], "host:port"),
    (["--coordinator", ":8476", "--", "generate", "x"], "host:port"),
    (["--coordinator", "h:1", "--process-id", "2", "--", "generate", "x"], "below --num-processes"),
    (["--coordinator", "h:1"], "expected -- then a jaxllm command"),
    (["--coordinator", "h:1", "--", "train"], "got train"),
    (["--coordinator", "h:1", "--", "generate", "x", "--max-tokens", "0"], "positive integer"),
])
def test_launcher_refuses_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        launch.parse_args(["--num-processes", "2", *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_launcher_parses_a_command():
    args, command = launch.parse_args(["--num-processes", "2", "--coordinator", "[::1]:8476",
                                       "--process-id", "1", "--", "serve", "--port", "9000"])
    assert (args.num_processes, args.process_id, args.coordinator) == (2, 1, "[::1]:8476")
    assert command.command_name == "serve" and command.port == 9000


def test_launcher_stops_every_process_when_one_fails():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    children = [subprocess.Popen(sleeper), subprocess.Popen([sys.executable, "-c", "exit(3)"])]
    start = time.monotonic()
    try:
        assert launch._wait(children, [], linger_s=60) == 3
    finally:
        launch._terminate(children)
    assert children[0].poll() is not None and time.monotonic() - start < 30
