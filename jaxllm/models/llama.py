"""Llama (1-3, TinyLlama, SmolLM2) and Mistral: pre-norm, SwiGLU, GQA, optional biases.

Mistral shares everything but its sliding window (``sliding_window`` in its config, applied to
every layer), which ``family.layer_windows`` reads. llama.cpp writes both as "llama" GGUFs,
with q/k rows permuted for its interleaved rotary, and without Mistral's window.
"""

from __future__ import annotations

from typing import Any

from transformers import LlamaConfig

from jaxllm.checkpoints_convert.gguf_names import (
    LLAMA_LAYER_TENSORS,
    config_fields,
    require_no_rope_scaling,
    rope_theta,
    tensor_map,
    unpermuter,
)
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, identity
from jaxllm.config import ModelConfig
from jaxllm.models.family import (
    GGUFFamily,
    ModelFamily,
    base_config_fields,
    decoder_weight_map,
    layer_windows,
    single_rope,
)

NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"}


def config_from_hf(hf: Any) -> ModelConfig:
    fields = base_config_fields(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(**fields, rope=single_rope(hf, fields["head_dim"]), qkv_bias=bias,
                       o_bias=bias, mlp_bias=bool(getattr(hf, "mlp_bias", False)),
                       hidden_act=getattr(hf, "hidden_act", "silu"), layer_windows=layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> LlamaConfig:
    require_no_rope_scaling(metadata)
    fields = config_fields(metadata, tensor_names, {"rope.dimension_count": "head_dim"})
    return LlamaConfig(**fields, architectures=["LlamaForCausalLM"],
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta(metadata)})


def gguf_tensor_map(hf: LlamaConfig) -> dict:
    per_layer = {suffix: (name, identity) for suffix, name in LLAMA_LAYER_TENSORS.items()}
    per_layer["attn_q.weight"] = ("self_attn.q_proj.weight", unpermuter(hf.num_attention_heads))
    per_layer["attn_k.weight"] = ("self_attn.k_proj.weight", unpermuter(hf.num_key_value_heads))
    return tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = ModelFamily(
    name="llama", architectures=("LlamaForCausalLM", "MistralForCausalLM"),
    config_from_hf=config_from_hf, weight_map=weight_map,
    gguf=GGUFFamily("llama", gguf_hf_config, gguf_tensor_map))
