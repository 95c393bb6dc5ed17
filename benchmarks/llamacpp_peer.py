"""llama.cpp as a measured peer: a GGUF file served through llama-cpp-python's low-level batch API.

``LlamaCppRunner.generate(workload)`` runs requests ``{"prompt_token_ids", "max_tokens"}`` with
llama-server's continuous batching: up to ``n_parallel`` sequences at once, each in its own KV
stream (``n_seq_max = n_parallel``, ``kv_unified = false``); every ``llama_decode`` call carries
one token per decoding sequence first, then prompt chunks of newly admitted sequences up to
``n_batch`` tokens; a finished sequence's slot takes the next waiting request. Greedy: the argmax
over the whole vocabulary, EOS included, and generation goes on past EOS, so every request gets
exactly its ``max_tokens`` (as jaxllm's ``ignore_eos=True``). llama.cpp computes with the GGUF's
own weights (e.g. Q4_1 for the default model) whatever dtype the other engines use.

llama-cpp-python is optional (``pip install -e ".[bench]"``): ``runnable_gguf`` says in one line
why llama.cpp does not run, so a benchmark reports null and that line instead of failing.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INSTALL_HINT = 'pip install -e ".[bench]"'


def gguf_path(model: str | None, override: str | None) -> Path | None:
    """The GGUF llama.cpp runs: ``override``, else ``model`` if it is a .gguf file, else the
    default model's GGUF when ``model`` is None; None for an HF directory or hub id."""
    if override:
        return Path(override)
    if model is None:
        from jaxllm.model_source import default_gguf_path

        return default_gguf_path()
    return Path(model) if str(model).endswith(".gguf") else None


def runnable_gguf(model: str | None, override: str | None,
                  skip: bool) -> tuple[Path | None, str | None]:
    """(the GGUF llama.cpp runs, None), or (None, one line saying why it does not run)."""
    if skip:
        return None, "llama.cpp: skipped (--skip-llamacpp)"
    gguf = gguf_path(model, override)
    if gguf is None:
        return None, "llama.cpp: skipped, the model is not a GGUF file (give one with --llamacpp-model)"
    if importlib.util.find_spec("llama_cpp") is None:
        return None, f"llama.cpp: skipped, llama-cpp-python is not installed ({INSTALL_HINT})"
    return gguf, None


@dataclass(slots=True)
class _Slot:
    """One running request in llama.cpp sequence ``seq_id``."""

    request_index: int
    prompt_token_ids: list[int]
    max_tokens: int
    num_computed_tokens: int = 0  # prompt tokens already in the KV stream
    token_ids: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)

    @property
    def is_decoding(self) -> bool:
        return self.num_computed_tokens == len(self.prompt_token_ids)


class LlamaCppRunner:
    """A llama.cpp model and context serving up to ``n_parallel`` sequences of ``n_ctx_seq`` tokens."""

    def __init__(self, gguf: Path, n_parallel: int, n_ctx_seq: int, n_batch: int = 512,
                 n_threads: int | None = None) -> None:
        import llama_cpp

        if not 1 <= n_parallel <= n_batch:
            raise ValueError(f"need 1 <= n_parallel ({n_parallel}) <= n_batch ({n_batch})")
        # The package's logger gates llama.cpp's own load and context logs (hundreds of lines).
        logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)
        self.lib = llama_cpp
        self.n_parallel, self.n_batch = n_parallel, n_batch
        self.n_threads = n_threads or os.cpu_count() or 1
        llama_cpp.llama_backend_init()
        self.model = llama_cpp.llama_model_load_from_file(
            str(gguf).encode(), llama_cpp.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        params = llama_cpp.llama_context_default_params()
        params.n_seq_max = n_parallel
        # One KV stream per sequence, of n_ctx_seq cells rounded up to 256 as llama.cpp does.
        params.n_ctx = n_parallel * -(-n_ctx_seq // 256) * 256
        params.n_batch = params.n_ubatch = n_batch
        params.n_threads = params.n_threads_batch = self.n_threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {gguf}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))
        desc = ctypes.create_string_buffer(256)
        llama_cpp.llama_model_desc(self.model, desc, len(desc))
        self.description = desc.value.decode()
        self.batch = llama_cpp.llama_batch_init(n_batch, 0, 1)

    def __enter__(self) -> LlamaCppRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.lib.llama_batch_free(self.batch)
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)

    def generate(self, workload: list[dict[str, Any]]) -> list[tuple[list[int], list[float]]]:
        """Greedy tokens of each request, and when each appeared (seconds since the call)."""
        lib = self.lib
        waiting = deque(enumerate(workload))
        free_seq_ids = list(range(self.n_parallel - 1, -1, -1))
        running: dict[int, _Slot] = {}  # seq_id -> slot, in admission order
        results: list[Any] = [None] * len(workload)
        start = time.perf_counter()
        while waiting or running:
            while waiting and free_seq_ids:
                index, request = waiting.popleft()
                seq_id = free_seq_ids.pop()
                lib.llama_memory_seq_rm(self.memory, seq_id, -1, -1)  # the previous request's KV
                running[seq_id] = _Slot(index, request["prompt_token_ids"], request["max_tokens"])
            output_seq_ids = self._fill_batch(running)
            if (status := lib.llama_decode(self.ctx, self.batch)) != 0:
                raise RuntimeError(f"llama_decode returned {status}")
            # logits: [len(output_seq_ids), n_vocab], rows in batch order
            logits = np.ctypeslib.as_array(lib.llama_get_logits(self.ctx),
                                           shape=(len(output_seq_ids), self.n_vocab))
            next_token_ids = logits.argmax(axis=1).tolist()
            now = time.perf_counter() - start
            for seq_id, token_id in zip(output_seq_ids, next_token_ids):
                slot = running[seq_id]
                slot.token_ids.append(token_id)
                slot.token_times.append(now)
                if len(slot.token_ids) == slot.max_tokens:
                    results[slot.request_index] = (slot.token_ids, slot.token_times)
                    del running[seq_id]
                    free_seq_ids.append(seq_id)
        return results

    def _fill_batch(self, running: dict[int, _Slot]) -> list[int]:
        """Decode tokens, then prompt chunks up to n_batch tokens; the seq ids that get logits."""
        batch, output_seq_ids = self.batch, []

        def add(token_id: int, pos: int, seq_id: int, wants_logits: bool) -> None:
            i = batch.n_tokens
            batch.token[i], batch.pos[i] = token_id, pos
            batch.n_seq_id[i], batch.seq_id[i][0] = 1, seq_id
            batch.logits[i] = wants_logits
            batch.n_tokens = i + 1
            if wants_logits:
                output_seq_ids.append(seq_id)

        batch.n_tokens = 0
        for seq_id, slot in running.items():
            if slot.is_decoding:
                add(slot.token_ids[-1], len(slot.prompt_token_ids) + len(slot.token_ids) - 1,
                    seq_id, True)
        for seq_id, slot in running.items():
            num_new = min(len(slot.prompt_token_ids) - slot.num_computed_tokens,
                          self.n_batch - batch.n_tokens)
            for pos in range(slot.num_computed_tokens, slot.num_computed_tokens + num_new):
                add(slot.prompt_token_ids[pos], pos, seq_id, pos == len(slot.prompt_token_ids) - 1)
            slot.num_computed_tokens += num_new
        return output_seq_ids
