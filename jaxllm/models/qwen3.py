"""Qwen3 (dense): the Llama layout with a per-head RMSNorm on q and k before RoPE, an explicit
head_dim (128 on every size), and no q/k/v bias. NeoX-style rotary in llama.cpp: no permutation."""

from __future__ import annotations

from typing import Any

from transformers import Qwen3Config

from jaxllm.checkpoints_convert.gguf_names import (
    LLAMA_LAYER_TENSORS,
    config_fields,
    require_no_rope_scaling,
    rope_theta,
    tensor_map,
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
from jaxllm.models.llama import NORMS


def config_from_hf(hf: Any) -> ModelConfig:
    fields = base_config_fields(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(**fields, rope=single_rope(hf, fields["head_dim"]), qk_norm=True,
                       qkv_bias=bias, o_bias=bias, hidden_act=hf.hidden_act,
                       layer_windows=layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Qwen3Config:
    require_no_rope_scaling(metadata)
    return Qwen3Config(**config_fields(metadata, tensor_names), architectures=["Qwen3ForCausalLM"],
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta(metadata)})


def gguf_tensor_map(hf: Qwen3Config) -> dict:
    per_layer = {suffix: (name, identity) for suffix, name in LLAMA_LAYER_TENSORS.items()}
    per_layer["attn_q_norm.weight"] = ("self_attn.q_norm.weight", identity)
    per_layer["attn_k_norm.weight"] = ("self_attn.k_norm.weight", identity)
    return tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = ModelFamily(name="qwen3", architectures=("Qwen3ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=GGUFFamily("qwen3", gguf_hf_config, gguf_tensor_map))
