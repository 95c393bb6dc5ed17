"""Llama (1-3, TinyLlama, SmolLM2) and Mistral: pre-norm, SwiGLU, GQA, optional biases.

Mistral shares everything but its sliding window (``sliding_window`` in its config, applied to
every layer), which ``family.layer_windows`` reads. llama.cpp writes both as "llama" GGUFs,
with q/k rows permuted for its interleaved rotary, and without Mistral's window.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from jaxllm.checkpoints_convert import gguf_names
from jaxllm.checkpoints_convert.weight_spec import WeightSpec
from jaxllm.config import ModelConfig
from jaxllm.models import family

NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"}


def config_from_hf(hf: Any) -> ModelConfig:
    fields = family.base_config_fields(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(**fields, rope=family.single_rope(hf, fields["head_dim"]), qkv_bias=bias,
                       o_bias=bias, mlp_bias=bool(getattr(hf, "mlp_bias", False)),
                       hidden_act=getattr(hf, "hidden_act", "silu"),
                       layer_windows=family.layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return family.decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> LlamaConfig:
    gguf_names.require_no_rope_scaling(metadata)
    fields = gguf_names.config_fields(metadata, tensor_names, {"rope.dimension_count": "head_dim"})
    return LlamaConfig(**fields, architectures=["LlamaForCausalLM"],
                       rope_parameters=gguf_names.default_rope(metadata))


def gguf_tensor_map(hf: LlamaConfig) -> dict:
    per_layer = dict(gguf_names.LLAMA_LAYER_TENSORS)
    unpermute_q = gguf_names.unpermuter(hf.num_attention_heads)
    unpermute_k = gguf_names.unpermuter(hf.num_key_value_heads)
    per_layer["attn_q.weight"] = ("self_attn.q_proj.weight", unpermute_q)
    per_layer["attn_k.weight"] = ("self_attn.k_proj.weight", unpermute_k)
    return gguf_names.tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = family.ModelFamily(
    name="llama", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    config_from_hf=config_from_hf, weight_map=weight_map,
    gguf=family.GGUFFamily("llama", gguf_hf_config, gguf_tensor_map),
    partition_rules=family.DECODER_PARTITION_RULES)
