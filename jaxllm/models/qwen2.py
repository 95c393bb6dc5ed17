"""Qwen2 and Qwen2.5: the Llama layout with biases on q/k/v (none on o), optional sliding
windows on the layers past ``max_window_layers`` (``layer_types``). llama.cpp runs Qwen with
NeoX-style rotary, so its GGUF q/k rows are not permuted."""

from __future__ import annotations

from typing import Any

from transformers import Qwen2Config

from jaxllm.checkpoints_convert import gguf_names
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, identity
from jaxllm.config import ModelConfig
from jaxllm.models import family
from jaxllm.models.llama import NORMS


def config_from_hf(hf: Any) -> ModelConfig:
    fields = family.base_config_fields(hf)
    return ModelConfig(**fields, rope=family.single_rope(hf, fields["head_dim"]), qkv_bias=True,
                       hidden_act=hf.hidden_act, layer_windows=family.layer_windows(hf))


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return family.decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Qwen2Config:
    gguf_names.require_no_rope_scaling(metadata)
    fields = gguf_names.config_fields(metadata, tensor_names)
    return Qwen2Config(**fields, architectures=["Qwen2ForCausalLM"],
                       rope_parameters=gguf_names.default_rope(metadata))


def gguf_tensor_map(hf: Qwen2Config) -> dict:
    per_layer = dict(gguf_names.LLAMA_LAYER_TENSORS)
    for proj in "qkv":
        per_layer[f"attn_{proj}.bias"] = (f"self_attn.{proj}_proj.bias", identity)
    return gguf_names.tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)


FAMILY = family.ModelFamily(name="qwen2", architectures=("Qwen2ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=family.GGUFFamily("qwen2", gguf_hf_config, gguf_tensor_map),
                     partition_rules=family.DECODER_PARTITION_RULES)
