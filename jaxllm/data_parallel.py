"""Data parallelism: M engine replicas, each on its own devices (a tensor-parallel group of
``tensor_parallel_size`` devices), behind one front with the Engine's API.

``Engine(model, data_parallel_size=M, ...)`` returns a ``DataParallelEngine``. Replica r runs
on devices ``[r * N, (r + 1) * N)`` with its own KV pool, scheduler and executor; the server and
any other caller use it as an Engine.

Routing: each request goes to the replica with the most free KV blocks (then the fewest
running and waiting requests). Not prefix-cache affinity: free blocks are what bounds a
replica's batch, and balancing them keeps every replica's steps full; affinity would only pay
for repeated prompt prefixes, and routing on it would need each replica's prefix hashes under
its scheduler's lock. A ``generate()`` list is spread by the same rule as if submitted one by
one (each request counts its prompt's blocks against the replica it is given).
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax

from jaxllm.engine import Engine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

# stats() fields that add up over replicas (the others are taken from each replica as a list).
_SUMMED = ("num_running", "num_waiting", "kv_blocks_used", "kv_blocks_free", "kv_blocks_cached",
           "prefix_cache_queried_tokens", "prefix_cache_hit_tokens", "num_steps",
           "num_generated_tokens", "num_tokens_computed", "num_preemptions",
           "num_failed_requests", "num_compilations")


class DataParallelEngine:
    """M Engines behind one front. Static attributes (tokenizer, configs, input processor) are
    replica 0's: every replica loads the same model with the same options."""

    def __init__(self, model: Any = None, *, data_parallel_size: int, **engine_options: Any) -> None:
        if type(data_parallel_size) is not int or data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be a positive integer, got {data_parallel_size!r}")
        tp = engine_options.get("tensor_parallel_size", 1)
        devices = jax.devices()
        if data_parallel_size * tp > len(devices):
            raise ValueError(f"data_parallel_size={data_parallel_size} x tensor_parallel_size={tp} "
                             f"needs {data_parallel_size * tp} devices; {jax.default_backend()} has "
                             f"{len(devices)}")
        self.data_parallel_size = data_parallel_size
        self.replicas: list[Engine] = []
        try:
            for r in range(data_parallel_size):
                self.replicas.append(Engine(model, devices=devices[r * tp:(r + 1) * tp],
                                            **engine_options))
        except BaseException:
            self.shutdown()
            raise
        self._owners: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def __getattr__(self, name: str) -> Any:
        if name == "replicas":   # not built yet (a failed __init__)
            raise AttributeError(name)
        return getattr(self.replicas[0], name)

    # ---- routing ----
    @staticmethod
    def _load(engine: Any) -> tuple[int, int]:
        """(-free KV blocks, requests in flight): the smaller, the more room."""
        scheduler = engine.scheduler
        return (-engine.kv_cache_manager.num_free_blocks,
                len(scheduler.running) + len(scheduler.waiting))

    def _route(self, request_id: str) -> Any:
        with self._lock:
            engine = min(self.replicas, key=self._load)
            self._owners[request_id] = engine
        return engine

    def _new_id(self, request_id: str | None) -> str:
        return f"dp-{next(self._ids)}" if request_id is None else str(request_id)

    # ---- the Engine API ----
    def generate(self, prompts: Any, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: Sequence[int] | None = None
                 ) -> RequestOutput | list[RequestOutput]:
        """As ``Engine.generate``: every prompt is validated first, then each goes to a replica
        (most free blocks, counting the blocks this call already gave it) and the replicas run
        their shares at once; outputs come back in prompt order."""
        single, requests = self.replicas[0].input_processor.requests(prompts, sampling_params, priority)
        block_size = self.replicas[0].config.block_size
        loads = [self._load(engine) for engine in self.replicas]
        shares: list[list[int]] = [[] for _ in self.replicas]
        for i, request in enumerate(requests):
            r = min(range(len(self.replicas)), key=loads.__getitem__)
            shares[r].append(i)
            free, busy = loads[r]
            loads[r] = (free + -(-len(request.prompt_token_ids) // block_size), busy + 1)
        outputs: list[Any] = [None] * len(requests)

        def run(r: int) -> None:
            if shares[r]:
                mine = [requests[i] for i in shares[r]]
                got = self.replicas[r].generate(
                    [{"prompt": q.prompt, "prompt_token_ids": list(q.prompt_token_ids)} for q in mine],
                    [q.sampling_params for q in mine], use_tqdm=False, priority=[q.priority for q in mine])
                for i, output in zip(shares[r], got):
                    outputs[i] = output

        with ThreadPoolExecutor(len(self.replicas)) as pool:
            list(pool.map(run, range(len(self.replicas))))
        return outputs[0] if single else outputs

    def generate_stream(self, prompt: Any, sampling_params: SamplingParams | None = None,
                        request_id: str | None = None, priority: int = 0) -> Iterator[RequestOutput]:
        request_id = self._new_id(request_id)
        stream = self._route(request_id).generate_stream(prompt, sampling_params, request_id, priority)
        return self._forgetting(request_id, stream)

    def _forgetting(self, request_id: str, stream: Iterator[RequestOutput]) -> Iterator[RequestOutput]:
        try:
            yield from stream
        finally:
            with self._lock:
                self._owners.pop(request_id, None)

    async def generate_async(self, prompt: Any, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None, priority: int = 0
                             ) -> AsyncIterator[RequestOutput]:
        request_id = self._new_id(request_id)
        try:
            async for output in self._route(request_id).generate_async(prompt, sampling_params,
                                                                       request_id, priority):
                yield output
        finally:
            with self._lock:
                self._owners.pop(request_id, None)

    chat = Engine.chat   # the template through input_processor, then this front's generate

    def abort(self, request_id: str) -> None:
        with self._lock:
            engine = self._owners.pop(str(request_id), None)
        for replica in [engine] if engine is not None else self.replicas:
            replica.abort(request_id)

    def stats(self) -> dict[str, Any]:
        """The replicas' counters added up, ``engine_dead`` if any replica died, and each
        replica's own stats under ``replicas``."""
        each = [engine.stats() for engine in self.replicas]
        total = {name: sum(s[name] for s in each) for name in _SUMMED}
        usable = sum(s["kv_blocks_used"] + s["kv_blocks_free"] for s in each)
        errors = [s["error"] for s in each if s["error"]]
        return {**total, "engine_dead": any(s["engine_dead"] for s in each),
                "error": errors[0] if errors else None,
                "kv_usage": total["kv_blocks_used"] / usable if usable else 0.0,
                "data_parallel_size": self.data_parallel_size, "replicas": each}

    # ---- lifecycle ----
    def shutdown(self) -> None:
        for engine in self.replicas:
            engine.shutdown()

    def __enter__(self) -> DataParallelEngine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
