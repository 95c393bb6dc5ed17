"""Multi-host: one engine over the devices of several processes started with ``jax.distributed``.

JAX is multi-controller: every process must dispatch the same compiled computations, in the
same order, on the same global arrays. So every process builds the same Engine (same model and
options: the same params on one mesh spanning all processes' devices, the same compiled
steps), and process 0, the leader, runs the host loop (scheduler, tokenizer, executor, server)
alone. The leader's ModelRunner hands each step it dispatches (its ``StepKey``, penalty-slot
seeds and the two packed input buffers, ``jaxllm.packing``) to ``MultiHost.publish`` before
dispatching it; a follower's ``follow`` loop receives the same bytes and dispatches the same
step on its runner, dropping the outputs (they are replicated; the leader reads its copy).

How step inputs reach the followers: the leader writes each step as one value
``jaxllm/step/<n>`` in the jax.distributed key-value store (the coordination service process 0
already runs for ``jax.distributed``); followers block on that key. Chosen over
``multihost_utils.broadcast_one_to_all`` (a collective over the devices) because:
  * the payload varies with the step's bucket: a collective needs a fixed shape, so either a
    header broadcast then a payload broadcast (two collectives, one compile per payload size)
    or every step padded to the largest bucket;
  * it stays off the devices: on a GPU a device broadcast is two extra host<->device copies
    and a collective queued in the step's stream; the store is a host-side gRPC call and the
    leader does not wait for the followers to read it (the step's own collectives keep them
    in lockstep).
Measured on CPU, 2 processes on one 2-core machine: a set + blocking get costs ~0.65 ms for a
100 B to 20 kB value (~4.8 ms at 200 kB), against 1.2-2 ms for ``broadcast_one_to_all`` of
the same sizes. Through the engine (``benchmarks/tensor_parallel.py --multihost``, other jobs
loading the machine) the leader spent 3.8 ms a step publishing 14 kB steps: see
docs/scaling.md.

The leader keeps the last ``_WINDOW`` steps in the store and deletes older ones: it cannot be
more than two steps ahead of the slowest follower (it dispatches step N + 1 before waiting for
step N's outputs, and those need every follower's step N).

Failures: a follower's exception is logged, written to ``jaxllm/error/<process>`` and ends
its process (``launch`` exits it without the shutdown barrier); jax.distributed's coordination
service then terminates the leader with "another task died" (immediately when the follower's
connection drops; at most the heartbeat timeout otherwise), so a step never waits forever.
The leader's shutdown writes a stop message: followers return from ``follow`` and exit.
"""

from __future__ import annotations

import json
import logging
import struct
import time
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import numpy as np

from jaxllm.step_inputs import StepKey

if TYPE_CHECKING:
    from jaxllm.model_runner import ModelRunner

logger = logging.getLogger(__name__)

STEP_KEY = "jaxllm/step/{}"
ERROR_KEY = "jaxllm/error/{}"
LEADER_DONE_KEY = "jaxllm/leader_done"   # set when process 0's command has returned
_WINDOW = 16                   # steps the store keeps
_POLL_MS = 1000                # a follower's wait for the next step, retried while idle
_LENGTH = struct.Struct("<I")  # the JSON header's length
_STOP = b"stop"

PenaltySeeds = list[tuple[int, np.ndarray, int]]   # (slot, [L] token ids, prompt length)


class StepMessage(NamedTuple):
    key: StepKey
    penalty_seeds: PenaltySeeds
    buffers: tuple[np.ndarray, np.ndarray]   # the packed int32 and float32 inputs


def encode(key: StepKey, penalty_seeds: PenaltySeeds, buffers: tuple[np.ndarray, np.ndarray]) -> bytes:
    """One step as bytes: a JSON header (key, buffer and seed lengths), then the raw arrays."""
    ints, floats = buffers
    seeds = [np.ascontiguousarray(ids, np.int32) for _, ids, _ in penalty_seeds]
    header = json.dumps({"key": list(key), "sizes": [ints.size, floats.size],
                         "seeds": [[int(slot), int(num_prompt), ids.size] for (slot, _, num_prompt), ids
                                   in zip(penalty_seeds, seeds)]}).encode()
    return b"".join([_LENGTH.pack(len(header)), header, np.ascontiguousarray(ints, np.int32).tobytes(),
                     np.ascontiguousarray(floats, np.float32).tobytes(), *(s.tobytes() for s in seeds)])


def decode(data: bytes) -> StepMessage | None:
    """The step ``encode`` wrote, or None for the leader's stop message."""
    if data == _STOP:
        return None
    (length,) = _LENGTH.unpack_from(data)
    header = json.loads(data[_LENGTH.size:_LENGTH.size + length])
    offset = _LENGTH.size + length

    def take(dtype: type, n: int) -> np.ndarray:
        nonlocal offset
        array = np.frombuffer(data, dtype, n, offset)
        offset += array.nbytes
        return array

    ints, floats = take(np.int32, header["sizes"][0]), take(np.float32, header["sizes"][1])
    seeds = [(slot, take(np.int32, n), num_prompt) for slot, num_prompt, n in header["seeds"]]
    return StepMessage(StepKey(*header["key"]), seeds, (ints, floats))


def check_config(tensor_parallel_size: int) -> None:
    """Refuses what multi-host does not run: a model that does not span every process's
    devices (each process would run its own steps, out of step with the others)."""
    if tensor_parallel_size != jax.device_count():
        raise ValueError(
            f"across {jax.process_count()} processes tensor_parallel_size must be the number of "
            f"devices of all of them ({jax.device_count()} = {jax.process_count()} x "
            f"{jax.local_device_count()}), got {tensor_parallel_size} (data parallelism across "
            "processes is not supported yet)")


class MultiHost:
    """This process's part in a multi-process engine: the leader publishes its runner's
    steps, a follower replays them (``follow``). Built by the Engine when
    ``jax.process_count() > 1``."""

    def __init__(self, runner: ModelRunner, client: Any, process_index: int) -> None:
        self.runner = runner
        self.client = client
        self.process_index = process_index
        self.num_steps = 0
        self.num_bytes = 0
        self.publish_time_s = 0.0   # leader: encoding and writing the steps
        self._closed = False

    @classmethod
    def attach(cls, runner: ModelRunner) -> MultiHost:
        """Joins ``runner`` to this process's jax.distributed job; on the leader, every step the
        runner dispatches is published first."""
        from jax._src import distributed

        if distributed.global_state.client is None:
            raise RuntimeError("jax.process_count() > 1 but jax.distributed is not initialised "
                               "here: start the processes with jaxllm.launch or "
                               "jax.distributed.initialize()")
        this = cls(runner, distributed.global_state.client, jax.process_index())
        if this.is_leader:
            runner.on_dispatch = this.publish
        return this

    @property
    def is_leader(self) -> bool:
        return self.process_index == 0

    def publish(self, key: StepKey, penalty_seeds: PenaltySeeds,
                buffers: tuple[np.ndarray, np.ndarray]) -> None:
        """Leader: writes step ``num_steps`` for the followers (called before its dispatch).

        Raises:
            NotImplementedError: the step runs Python logits processors, which only the
                leader has (the followers' samples would differ).
        """
        if key.host_processors:
            raise NotImplementedError("Python logits processors do not run across several "
                                      "processes yet: only process 0 has them")
        start = time.perf_counter()
        self._write(encode(key, penalty_seeds, buffers))
        self.publish_time_s += time.perf_counter() - start

    def close(self) -> None:
        """Leader: tells the followers to stop (after its last step). Idempotent."""
        if self.is_leader and not self._closed:
            self._closed = True
            self._write(_STOP)

    def _write(self, data: bytes) -> None:
        self.client.key_value_set_bytes(STEP_KEY.format(self.num_steps), data)
        if self.num_steps >= _WINDOW:
            self.client.key_value_delete(STEP_KEY.format(self.num_steps - _WINDOW))
        self.num_steps += 1
        self.num_bytes += len(data)

    def follow(self) -> int:
        """Follower: dispatches the leader's steps on this process's runner until the leader
        stops; returns how many ran. An exception is written to the store for the leader's
        logs, then raised (the caller ends the process: see the module docstring)."""
        if self.is_leader:
            raise RuntimeError("process 0 leads: it runs the engine, it does not follow")
        runner = self.runner
        try:
            while (message := decode(self._read())) is not None:
                expected = runner.layout.packed(message.key).sizes
                if tuple(b.size for b in message.buffers) != expected:
                    raise RuntimeError(
                        f"step {self.num_steps}: the leader's packed inputs have sizes "
                        f"{[b.size for b in message.buffers]}, this process's layout "
                        f"{list(expected)}: start every process with the same model and options")
                runner.run_packed(*message)
                self.num_steps += 1
        except Exception as exc:
            text = f"process {self.process_index} failed at step {self.num_steps}: {exc!r}"
            logger.error("jaxllm follower %s", text)
            self.client.key_value_set(ERROR_KEY.format(self.process_index), text, allow_overwrite=True)
            raise
        return self.num_steps

    def _read(self) -> bytes:
        """The leader's next step, waiting while it is idle (a dead leader ends this process:
        jax.distributed's coordination service terminates it)."""
        key = STEP_KEY.format(self.num_steps)
        while True:
            try:
                data = self.client.blocking_key_value_get_bytes(key, _POLL_MS)
            except jax.errors.JaxRuntimeError as exc:
                if "DEADLINE_EXCEEDED" not in str(exc):
                    raise
                if self._leader_done():
                    return _STOP   # the leader ended without stopping (its engine failed?)
                continue
            self.num_bytes += len(data)
            return data

    def _leader_done(self) -> bool:
        try:
            self.client.key_value_try_get(LEADER_DONE_KEY)
        except jax.errors.JaxRuntimeError as exc:
            if "NOT_FOUND" in str(exc):
                return False
            raise
        return True
