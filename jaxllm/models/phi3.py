"""Phi-3 / Phi-3.5 / Phi-4-mini: the Llama layer with q|k|v and gate|up fused in the checkpoint
(split or kept at load by the weight map), an optional sliding window on every layer, and
partial rotary (``partial_rotary_factor``, Phi-4-mini). LongRoPE (the 128k variants) switches
tables by sequence length in transformers and is refused by ``RopeSpec``.
llama.cpp keeps the fused tensors (``attn_qkv``, ``ffn_up`` = gate|up) and NeoX rotary."""

from __future__ import annotations

from typing import Any

from transformers import Phi3Config

from jaxllm.checkpoints_convert import gguf_names
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, identity
from jaxllm.config import ModelConfig
from jaxllm.models import family
from jaxllm.models.llama import NORMS


def config_from_hf(hf: Any) -> ModelConfig:
    fields = family.base_config_fields(hf)
    return ModelConfig(**fields, rope=family.single_rope(hf, fields["head_dim"]),
                       hidden_act=hf.hidden_act, layer_windows=family.layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return family.decoder_weight_map(config, NORMS, fused_qkv=True, fused_gate_up=True)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Phi3Config:
    gguf_names.require_no_rope_scaling(metadata)
    fields = gguf_names.config_fields(metadata, tensor_names,
                                      {"attention.sliding_window": "sliding_window"})
    head_dim = fields["hidden_size"] // fields["num_attention_heads"]
    rotary_dim = metadata.get("phi3.rope.dimension_count", head_dim)
    return Phi3Config(**fields, architectures=["Phi3ForCausalLM"],
                      rope_parameters={**gguf_names.default_rope(metadata),
                                       "partial_rotary_factor": rotary_dim / head_dim})


def gguf_tensor_map(hf: Phi3Config) -> dict:
    per_layer = {
        "attn_norm.weight": ("input_layernorm.weight", identity),
        "attn_qkv.weight": ("self_attn.qkv_proj.weight", identity),
        "attn_output.weight": ("self_attn.o_proj.weight", identity),
        "ffn_norm.weight": ("post_attention_layernorm.weight", identity),
        "ffn_up.weight": ("mlp.gate_up_proj.weight", identity),
        "ffn_down.weight": ("mlp.down_proj.weight", identity),
    }
    return gguf_names.tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = family.ModelFamily(name="phi3", architectures=("Phi3ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=family.GGUFFamily("phi3", gguf_hf_config, gguf_tensor_map),
                     partition_rules=family.DECODER_PARTITION_RULES)
