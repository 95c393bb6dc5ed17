"""Qwen3 (dense): the Llama layout with a per-head RMSNorm on q and k before RoPE, an explicit
head_dim (128 on every size), and no q/k/v bias. NeoX-style rotary in llama.cpp: no permutation."""

from __future__ import annotations

from typing import Any

from transformers import Qwen3Config

from jaxllm.checkpoints_convert import gguf_names
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, identity
from jaxllm.config import ModelConfig
from jaxllm.models import family
from jaxllm.models.llama import NORMS


def config_from_hf(hf: Any) -> ModelConfig:
    fields = family.base_config_fields(hf)
    bias = bool(getattr(hf, "attention_bias", False))
    return ModelConfig(**fields, rope=family.single_rope(hf, fields["head_dim"]), qk_norm=True,
                       qkv_bias=bias, o_bias=bias, hidden_act=hf.hidden_act,
                       layer_windows=family.layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return family.decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Qwen3Config:
    gguf_names.require_no_rope_scaling(metadata)
    fields = gguf_names.config_fields(metadata, tensor_names)
    return Qwen3Config(**fields, architectures=["Qwen3ForCausalLM"],
                       rope_parameters=gguf_names.default_rope(metadata))


def gguf_tensor_map(hf: Qwen3Config) -> dict:
    per_layer = dict(gguf_names.LLAMA_LAYER_TENSORS)
    per_layer["attn_q_norm.weight"] = ("self_attn.q_norm.weight", identity)
    per_layer["attn_k_norm.weight"] = ("self_attn.k_norm.weight", identity)
    return gguf_names.tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = family.ModelFamily(name="qwen3", architectures=("Qwen3ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=family.GGUFFamily("qwen3", gguf_hf_config, gguf_tensor_map),
                     partition_rules=family.DECODER_PARTITION_RULES)
