"""Frozen, validated configuration objects: what the model is and how the engine runs it."""

from __future__ import annotations

import dataclasses

from jaxllm.models.rope import RopeSpec
from jaxllm.sampling_rows import SamplingLimits
from jaxllm.speculative import SpeculativeConfig


SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "int8": 1, "fp8": 1}
# kv_cache_dtype values (vLLM's names): "auto" = the model dtype; the quantized ones store 8-bit
# values plus a float32 scale per token and kv head (``jaxllm.kernels.paged_attention.quantized_kv``).
QUANTIZED_KV_CACHE_DTYPES = ("int8", "fp8")
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
KV_SCALE_BYTES = 4
CPU_KV_CACHE_BYTES = 2 * 1024**3
# EngineConfig.quantization: "auto" resolves to "gguf" for a .gguf model on one device of a
# platform with a quantized matmul kernel (``jaxllm.quantization.packed_by_default``), else None.
QUANTIZATION_METHODS = ("auto", None, "gguf", "int8")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything the shared model layers need to know about an architecture, stated explicitly.

    Each family module (``jaxllm.models.<family>``) builds one from its HF config; the layers
    never look at the architecture name. Names follow transformers where it has one.

    Attributes:
        norm_offset: RMSNorm scales by (norm_offset + weight): 1.0 for Gemma, 0.0 elsewhere.
        qk_norm: per-head RMSNorm of q and k before RoPE (Qwen3, Gemma 3).
        sandwich_norms: also normalise the attention and MLP outputs before their residual
            adds (Gemma 2/3: four norms per layer instead of two).
        qkv_bias, o_bias, mlp_bias: which projections carry a bias (Qwen2: q/k/v only).
        hidden_act: the gated MLP's activation: "silu" (SwiGLU) or "gelu_pytorch_tanh" /
            "gelu" (GeGLU).
        attention_scale: softmax scale; None = head_dim ** -0.5 (Gemma: query_pre_attn_scalar).
        embedding_scale: multiplies the token embeddings (Gemma: sqrt(hidden_size)); None = 1.
        final_logit_softcapping: logits = cap * tanh(logits / cap) when set (Gemma 2).
        rope: the distinct rotary tables; ``layer_rope[i]`` picks layer i's.
        layer_windows: each layer's sliding window (0 = full attention); () = all full.
        layer_rope: each layer's index into ``rope``; () = all 0.
        qkv_shards: the fused q|k|v projection's output axis is laid out as this many
            consecutive [q | k | v] blocks, one per tensor-parallel shard, each holding its
            shard's heads (``jaxllm.sharding``); 1 = plain q | k | v.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: tuple[RopeSpec, ...]
    rms_norm_eps: float = 1e-6
    norm_offset: float = 0.0
    qk_norm: bool = False
    sandwich_norms: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    attention_scale: float | None = None
    embedding_scale: float | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 2048
    layer_windows: tuple[int, ...] = ()
    layer_rope: tuple[int, ...] = ()
    qkv_shards: int = 1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "qkv_shards"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.num_key_value_heads % self.qkv_shards:
            raise ValueError(f"num_key_value_heads ({self.num_key_value_heads}) must be a multiple "
                             f"of qkv_shards ({self.qkv_shards})")
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
        if not self.rope:
            raise ValueError("ModelConfig.rope needs at least one rotary table")
        if any(spec.rotary_dim > self.head_dim for spec in self.rope):
            raise ValueError(f"rotary_dim exceeds head_dim ({self.head_dim})")
        num_layers = self.num_hidden_layers
        if not self.layer_windows:
            object.__setattr__(self, "layer_windows", (0,) * num_layers)
        if not self.layer_rope:
            object.__setattr__(self, "layer_rope", (0,) * num_layers)
        for name in ("layer_windows", "layer_rope"):
            if len(getattr(self, name)) != num_layers:
                raise ValueError(f"ModelConfig.{name} has {len(getattr(self, name))} entries for "
                                 f"{num_layers} layers")
        if any(w < 0 for w in self.layer_windows):
            raise ValueError(f"sliding windows must be >= 0 (0 = full attention), got {self.layer_windows}")
        if any(not 0 <= r < len(self.rope) for r in self.layer_rope):
            raise ValueError(f"layer_rope {self.layer_rope} indexes {len(self.rope)} rotary tables")

    @property
    def rotary_dim(self) -> int:
        return self.rope[0].rotary_dim

    @property
    def softmax_scale(self) -> float:
        return self.head_dim ** -0.5 if self.attention_scale is None else self.attention_scale

    def kv_cache_bytes_per_token(self, dtype: str, tensor_parallel_size: int = 1) -> int:
        """Bytes of K and V one token takes in the cache, over all layers, on each device of a
        tensor-parallel group (kv heads split over it, or one replicated head per device when
        fewer: ``jaxllm.sharding``). ``dtype``: the cache's ("float32", "bfloat16", or a
        quantized one, whose float32 scale per kv head counts too)."""
        kv_heads = max(self.num_key_value_heads // tensor_parallel_size, 1)
        scale = KV_SCALE_BYTES if dtype in QUANTIZED_KV_CACHE_DTYPES else 0
        return 2 * self.num_hidden_layers * kv_heads * (self.head_dim * DTYPE_BYTES[dtype] + scale)

    @property
    def sliding_window(self) -> int | None:
        """The widest sliding window of any layer; None if every layer attends fully."""
        return max(self.layer_windows) or None


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: cache geometry, batching limits, compilation choices.

    Attributes:
        dtype: "float32" or "bfloat16" for weights, activations and KV cache. None picks the
            platform default: float32 on CPU (bfloat16 is no faster there), bfloat16 on GPU/TPU.
        kv_cache_dtype: what the KV cache stores (vLLM's option): "auto" = ``dtype``; "int8"
            or "fp8" (float8_e4m3fn; alias "fp8_e4m3") = 8-bit values with a float32 scale per
            token and kv head, about 4x (from float32) or 2x (from bfloat16) the tokens in the
            same ``kv_cache_memory_bytes``, read dequantized by every attention implementation.
        max_model_len: longest prompt + output, in tokens. None = the model's
            max_position_embeddings.
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool (block 0 is the reserved padding sink). None derives
            it from ``kv_cache_memory_bytes``.
        kv_cache_memory_bytes: memory budget for the KV cache when num_blocks is None, per
            device under tensor parallelism (each holds its kv heads of every block).
            None = 25% of the accelerator memory, or 2 GiB on CPU (shared by faked devices).
        max_num_seqs: most sequences in one step.
        max_num_batched_tokens: token budget of one step (prefill chunks + decodes).
        scan_layers: scan over stacked layer weights (compile once per layer body) or unroll.
            None picks per platform from measurements: unrolled on CPU, where XLA runs a scan
            of dots ~2.7x slower, scanned elsewhere.
        attention: name of the attention implementation ("reference" or a registered kernel);
            None picks the best one for the platform.
        seed: base seed for requests that do not set one.
        enable_prefix_caching: reuse the KV blocks of identical prompt prefixes across requests.
        max_logprobs: the most alternatives a request may ask for through ``logprobs`` or
            ``prompt_logprobs`` (the width of the compiled top-k, as vLLM's max_logprobs).
        prefill_first: steps that can admit waiting requests run prefills only, instead of
            mixing prefill chunks with running decodes. None picks per platform: on CPU, where
            the reference attention gathers the widest context of the step for every token.
        warmup: compile every step shape of the bucket policy (``jaxllm.buckets``) at start-up,
            with a progress bar, so serving never stops to compile the plain sampling path.
        async_scheduling: schedule and dispatch each step before the previous step's tokens
            reach the host (the device feeds them to the next step), so host work hides behind
            the device (vLLM's ``async_scheduling``). False runs one step at a time: for
            debugging, and to measure what the overlap buys.
        max_logit_bias, max_allowed_token_ids, max_min_tokens_stop_ids: the widths of the
            fixed per-row token lists the compiled sampler takes (``logit_bias`` entries,
            ``allowed_token_ids``, and the stop + EOS ids ``min_tokens`` bans); a request over
            one is refused at submission, naming it.
        strategies: the names of the registered sampling strategies the engine serves (and
            compiles into its steps); one not registered, or failing its check at the engine's
            shape, is an error at ``Engine()``. None: every registered strategy that passes its
            check; the others are left out with a warning (``jaxllm.strategies``).
        tensor_parallel_size: devices the model is split over, Megatron-style (attention heads,
            MLP columns/rows, vocabulary; ``jaxllm.sharding``). 1 = one device, no mesh.
        speculative_config: speculative decoding, vLLM's keys (``jaxllm.speculative``), e.g.
            ``{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}``; held validated as a ``SpeculativeConfig``. None: off.
        quantization: how weights are kept in memory (vLLM's name; ``jaxllm.quantization``):
            None dequantizes everything to ``dtype``; "gguf" keeps a .gguf file's quantized
            blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K..Q6_K; other types are dequantized);
            "int8" quantizes every projection and the embedding at load (weight-only,
            symmetric, per output channel). "auto": "gguf" for a .gguf model on one device
            where a kernel computes on the blocks (``quantization.packed_by_default``: the
            jnp reference alone decodes ~3x slower than float32 on CPU), else None.
            Quantized weights run on one device (tensor_parallel_size 1).
        enable_lora: serve LoRA adapters (``generate(..., lora_request=...)``, ``jaxllm.lora``).
        max_loras: adapters on the device at once (slots; more wait for one to free up).
        max_lora_rank: the largest adapter rank served (the slab's width).
    """

    dtype: str | None = None
    kv_cache_dtype: str = "auto"
    max_model_len: int | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_bytes: int | None = None
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    scan_layers: bool | None = None
    attention: str | None = None
    seed: int = 0
    enable_prefix_caching: bool = True
    max_logprobs: int = 20
    warmup: bool = False
    prefill_first: bool | None = None
    async_scheduling: bool = True
    max_logit_bias: int = SamplingLimits.max_logit_bias
    max_allowed_token_ids: int = SamplingLimits.max_allowed_token_ids
    max_min_tokens_stop_ids: int = SamplingLimits.max_min_tokens_stop_ids
    strategies: tuple[str, ...] | None = None
    tensor_parallel_size: int = 1
    speculative_config: SpeculativeConfig | dict | None = None
    quantization: str | None = "auto"
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16

    def __post_init__(self) -> None:
        if isinstance(self.speculative_config, dict):
            object.__setattr__(self, "speculative_config",
                               SpeculativeConfig.from_dict(self.speculative_config))
        elif not isinstance(self.speculative_config, (SpeculativeConfig, type(None))):
            raise ValueError(f"speculative_config must be a dict, got {self.speculative_config!r}")
        if self.strategies is not None:
            if (not isinstance(self.strategies, (list, tuple))
                    or not all(isinstance(n, str) for n in self.strategies)):
                raise ValueError(f"strategies must be a list of strategy names, got {self.strategies!r}")
            object.__setattr__(self, "strategies", tuple(self.strategies))
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
        kv_cache_dtype = (KV_CACHE_DTYPE_ALIASES.get(self.kv_cache_dtype, self.kv_cache_dtype)
                          if isinstance(self.kv_cache_dtype, str) else self.kv_cache_dtype)
        if kv_cache_dtype not in ("auto", *QUANTIZED_KV_CACHE_DTYPES):
            raise ValueError(
                f"kv_cache_dtype must be one of 'auto', 'int8', 'fp8' (float8_e4m3fn) or "
                f"'fp8_e4m3', got {self.kv_cache_dtype!r}")
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype)
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 2:
            raise ValueError(f"num_blocks must be at least 2 (block 0 is reserved), got {self.num_blocks}")
        if self.max_model_len is not None and self.max_model_len <= 0:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.max_logprobs < 1:
            raise ValueError(f"max_logprobs must be at least 1, got {self.max_logprobs}")
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs})")
        if type(self.tensor_parallel_size) is not int or self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got "
                             f"{self.tensor_parallel_size!r}")
        for name in ("max_loras", "max_lora_rank"):
            if type(getattr(self, name)) is not int or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if self.enable_lora and self.tensor_parallel_size > 1:
            raise ValueError("enable_lora is not supported with tensor_parallel_size > 1")
        _ = self.sampling_limits  # SamplingLimits refuses a width below 1
        if self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"quantization must be one of {QUANTIZATION_METHODS}, got "
                             f"{self.quantization!r}")
        if self.quantization in ("gguf", "int8") and self.tensor_parallel_size > 1:
            raise ValueError(f"quantization={self.quantization!r} runs on one device: use "
                             f"tensor_parallel_size=1, or quantization=None to split float "
                             f"weights over {self.tensor_parallel_size} devices")

    @property
    def cache_dtype(self) -> str | None:
        """What the KV cache stores: ``dtype`` for "auto" (None before ``resolve``), else the
        quantized dtype's name ("int8", "fp8")."""
        return self.dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype

    @property
    def sampling_limits(self) -> SamplingLimits:
        """The token-list widths, validated (each at least 1)."""
        return SamplingLimits(self.max_logit_bias, self.max_allowed_token_ids,
                              self.max_min_tokens_stop_ids)

    def resolve(self, model: ModelConfig, platform: str,
                accelerator_memory_bytes: int | None = None, *, gguf: bool = False) -> EngineConfig:
        """This config with every platform- and model-dependent default filled in.

        Args:
            model: the model the engine runs.
            platform: a JAX backend name ("cpu", "gpu", "tpu").
            accelerator_memory_bytes: the device's memory, for the default KV budget (25% of
                it) off CPU; None there means 8 GiB.
            gguf: the model comes from a .gguf file (for ``quantization``).

        Raises:
            ValueError: quantization="gguf" for a model that is not a .gguf file.
        """
        quantization = self.quantization
        if quantization == "auto":
            from jaxllm.quantization import packed_by_default

            packed = gguf and self.tensor_parallel_size == 1 and packed_by_default(platform)
            quantization = "gguf" if packed else None
        if quantization == "gguf" and not gguf:
            raise ValueError("quantization='gguf' keeps the blocks of a .gguf file, and this "
                             "model is not one: use quantization='int8' or None")
        on_cpu = platform == "cpu"
        dtype = self.dtype or ("float32" if on_cpu else "bfloat16")
        cache_dtype = dtype if self.kv_cache_dtype == "auto" else self.kv_cache_dtype
        max_model_len = self.max_model_len or model.max_position_embeddings
        blocks_per_seq = -(-max_model_len // self.block_size)
        num_blocks = self.num_blocks
        if num_blocks is None:
            tp = self.tensor_parallel_size
            # Per device; CPU devices (faked ones under tensor parallelism) share the host's.
            budget = self.kv_cache_memory_bytes or (
                CPU_KV_CACHE_BYTES // tp if on_cpu
                else int((accelerator_memory_bytes or 8 * 1024**3) * 0.25))
            by_budget = budget // (self.block_size * model.kv_cache_bytes_per_token(cache_dtype, tp))
            # Never allocate more than every sequence could use at once.
            num_blocks = int(min(by_budget, self.max_num_seqs * blocks_per_seq + 1))
            if num_blocks < 2:
                raise ValueError(f"kv_cache_memory_bytes={budget} holds no KV block of this model")
        from jaxllm.kernels import default_attention

        return dataclasses.replace(
            self, dtype=dtype, max_model_len=max_model_len, num_blocks=num_blocks,
            quantization=quantization,
            scan_layers=(not on_cpu) if self.scan_layers is None else self.scan_layers,
            prefill_first=on_cpu if self.prefill_first is None else self.prefill_first,
            attention=self.attention or default_attention(platform))
