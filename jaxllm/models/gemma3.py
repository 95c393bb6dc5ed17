"""Gemma 3 (text): sliding-window local layers and global layers (``layer_types``, 5:1) with
their own RoPE bases (10k local, 1M global), (1 + w) RMSNorm with four norms per layer and
per-head q/k norms, GeGLU (gelu-tanh), embeddings scaled by sqrt(hidden), softmax scale
``query_pre_attn_scalar ** -0.5``, a tied head over a 262k vocabulary.

llama.cpp's GGUF stores every norm weight as 1 + w, no rope permutation, and neither the
layer pattern nor the local base: it hard-codes one global layer in six and base 10k.
"""

from __future__ import annotations

from typing import Any

from transformers import Gemma3TextConfig

from jaxllm.checkpoints_convert import gguf_names
from jaxllm.checkpoints_convert.weight_spec import WeightSpec, identity
from jaxllm.config import ModelConfig
from jaxllm.models import family
from jaxllm.models.rope import RopeSpec

NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm",
         "pre_feedforward_layernorm": "pre_mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"}
LOCAL_ROPE_THETA = 10000.0     # llama.cpp's (and transformers' default) base of local layers
GGUF_GLOBAL_EVERY = 6          # llama.cpp: layers 5, 11, 17, ... attend globally


def config_from_hf(hf: Any) -> ModelConfig:
    if getattr(hf, "attn_logit_softcapping", None) is not None:
        raise ValueError("attention logit soft-capping (Gemma 2) is not supported")
    if getattr(hf, "use_bidirectional_attention", False):
        raise ValueError("bidirectional attention (EmbeddingGemma) is not supported: "
                         "jaxllm serves causal language models")
    fields = family.base_config_fields(hf)
    types = hf.layer_types
    max_pos = int(hf.max_position_embeddings)
    rope = tuple(RopeSpec.from_hf(_rope_for(hf, layer_type), fields["head_dim"], max_pos)
                 for layer_type in ("full_attention", "sliding_attention"))
    return ModelConfig(
        **fields, rope=rope, layer_rope=tuple(int(t == "sliding_attention") for t in types),
        layer_windows=family.layer_windows(hf), norm_offset=1.0, qk_norm=True, sandwich_norms=True,
        hidden_act=hf.hidden_activation, attention_scale=float(hf.query_pre_attn_scalar) ** -0.5,
        embedding_scale=float(hf.hidden_size) ** 0.5,
        final_logit_softcapping=getattr(hf, "final_logit_softcapping", None),
        qkv_bias=bool(hf.attention_bias), o_bias=bool(hf.attention_bias))


def _rope_for(hf: Any, layer_type: str) -> dict[str, Any]:
    """transformers 5 keys rope_parameters by layer type; older configs have rope_theta and
    rope_local_base_freq."""
    params = getattr(hf, "rope_parameters", None) or {}
    if layer_type in params:
        return dict(params[layer_type])
    if layer_type == "sliding_attention":
        return {"rope_theta": getattr(hf, "rope_local_base_freq", LOCAL_ROPE_THETA)}
    return family.rope_parameters(hf)


def weight_map(config: ModelConfig) -> list[WeightSpec]:
    return family.decoder_weight_map(config, NORMS)


def gguf_hf_config(metadata: dict[str, Any], tensor_names: list[str]) -> Gemma3TextConfig:
    scaling = gguf_names.require_no_rope_scaling(metadata, allowed=("linear",))
    fields = gguf_names.config_fields(metadata, tensor_names,
                                      {"attention.sliding_window": "sliding_window"})
    num_layers = fields["num_hidden_layers"]
    pattern = metadata.get("gemma3.attention.sliding_window_pattern")
    if isinstance(pattern, list):            # newer files: one flag per layer, True = local
        sliding = [bool(p) for p in pattern]
    else:
        every = int(pattern or GGUF_GLOBAL_EVERY)
        sliding = [(i + 1) % every != 0 for i in range(num_layers)]
    full = gguf_names.default_rope(metadata)
    if scaling == "linear":
        factor = float(metadata["gemma3.rope.scaling.factor"])
        full = {**full, "rope_type": "linear", "factor": factor}
    # llama.cpp scales 27B's queries by hidden / heads; every other size by the head dim.
    head_dim = fields["head_dim"]
    scalar = (fields["hidden_size"] // fields["num_attention_heads"] if num_layers == 62
              else head_dim)
    return Gemma3TextConfig(
        **fields, architectures=["Gemma3ForCausalLM"], hidden_activation="gelu_pytorch_tanh",
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        rope_parameters={"full_attention": full, "sliding_attention": {
            "rope_type": "default", "rope_theta": LOCAL_ROPE_THETA}},
        query_pre_attn_scalar=scalar)


def gguf_tensor_map(hf: Gemma3TextConfig) -> dict:
    per_layer = dict(gguf_names.LLAMA_LAYER_TENSORS)
    per_layer.update({
        "attn_q_norm.weight": ("self_attn.q_norm.weight", identity),
        "attn_k_norm.weight": ("self_attn.k_norm.weight", identity),
        "post_attention_norm.weight": ("post_attention_layernorm.weight", identity),
        "ffn_norm.weight": ("pre_feedforward_layernorm.weight", identity),
        "post_ffw_norm.weight": ("post_feedforward_layernorm.weight", identity),
    })
    mapping = gguf_names.tensor_map(hf.num_hidden_layers, per_layer, hf.tie_word_embeddings)
    return {name: (hf_name, gguf_names.subtract_one if name.endswith("norm.weight") else transform)
            for name, (hf_name, transform) in mapping.items()}


FAMILY = family.ModelFamily(name="gemma3", architectures=("Gemma3ForCausalLM",),
                     config_from_hf=config_from_hf, weight_map=weight_map,
                     gguf=family.GGUFFamily("gemma3", gguf_hf_config, gguf_tensor_map),
                     partition_rules=family.DECODER_PARTITION_RULES)
