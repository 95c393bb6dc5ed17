"""Frozen, validated configuration objects: what the model is and how the engine runs it."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The architecture hyper-parameters a model module needs, read from an HF config.

    Field names follow transformers' LlamaConfig so the mapping stays obvious.
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # rope_type and its parameters ("llama3": factor, low/high_freq_factor, original_max_...).
    rope_scaling: tuple[tuple[str, Any], ...] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    sliding_window: int | None = None  # Mistral v0.1: attention span; None = unlimited

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")

    @property
    def rope_scaling_dict(self) -> dict[str, Any]:
        return dict(self.rope_scaling or ())

    @classmethod
    def from_hf(cls, hf_config: Any) -> "ModelConfig":
        """Builds a ModelConfig from a transformers ``PretrainedConfig`` (v4 or v5 rope fields)."""
        archs = getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"]
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        rope = _rope_parameters(hf_config)
        rope_theta = float(rope.pop("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_scaling = None
        if rope_type != "default":
            rope.pop("type", None)
            rope["rope_type"] = rope_type
            rope_scaling = tuple(sorted(rope.items()))
        return cls(
            architecture=archs[0],
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=float(getattr(hf_config, "rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(getattr(hf_config, "max_position_embeddings", 2048)),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", False)),
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
            hidden_act=getattr(hf_config, "hidden_act", "silu"),
            sliding_window=getattr(hf_config, "sliding_window", None),
        )


def _rope_parameters(hf_config: Any) -> dict[str, Any]:
    """transformers 5 keeps rope settings in ``rope_parameters``; 4.x in ``rope_scaling``."""
    params = getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None)
    return dict(params or {})


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """How the engine runs a model: cache geometry, batching limits, compilation choices.

    Attributes:
        dtype: "float32" or "bfloat16" for weights, activations and KV cache. None picks the
            platform default: float32 on CPU (bfloat16 is no faster there), bfloat16 on GPU/TPU.
        max_model_len: longest prompt + output, in tokens. None = the model's
            max_position_embeddings (or its sliding window, if smaller).
        block_size: tokens per KV block.
        num_blocks: KV blocks in the pool (block 0 is the reserved padding sink). None derives
            it from ``kv_cache_memory_bytes``.
        kv_cache_memory_bytes: memory budget for the KV cache when num_blocks is None.
            None = 25% of the accelerator memory, or 2 GiB on CPU.
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
    """

    dtype: str | None = None
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

    def __post_init__(self) -> None:
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")
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

