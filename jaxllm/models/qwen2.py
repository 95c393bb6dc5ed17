"""Qwen2 and Qwen2.5: the Llama layout with biases on q/k/v (none on o), optional sliding
windows on the layers past ``max_window_layers`` (``layer_types``). llama.cpp runs Qwen with
NeoX-style rotary, so its GGUF q/k rows are not permuted."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

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
    return ModelConfig(**fields, rope=single_rope(hf, fields["head_dim"]), qkv_bias=True,
                       hidden_act=hf.hidden_act, layer_windows=layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Qwen2Config:
    require_no_rope_scaling(metadata)
    return Qwen2Config(**config_fields(metadata, tensor_names), architectures=["Qwen2ForCausalLM"],
                       rope_parameters={"rope_type": "default", "rope_theta": rope_theta(metadata)})


def gguf_tensor_map(hf: Qwen2Config) -> dict:
    per_layer = {suffix: (name, identity) for suffix, name in LLAMA_LAYER_TENSORS.items()}
    for proj in "qkv":
        per_layer[f"attn_{proj}.bias"] = (f"self_attn.{proj}_proj.bias", identity)
    return tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = ModelFamily(name="qwen2", architectures=("Qwen2ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=GGUFFamily("qwen2", gguf_hf_config, gguf_tensor_map))
