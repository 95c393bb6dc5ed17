"""What a model family module declares, and the pieces most families share.

A family module (``jaxllm.models.llama``, ``.gemma3``, ...) is the one place a family is
described: it builds a ``ModelFamily`` from
  * ``config_from_hf``: the HF config -> explicit ``ModelConfig`` fields;
  * ``weight_map``: every HF tensor -> its place in the params tree, with named transforms;
  * ``gguf``: its GGUF metadata -> HF config, and GGUF tensor names -> HF names;
  * ``layer``: the decoder layer class (the shared ``layers.DecoderLayer`` unless it differs);
  * ``partition_rules``: how tensor parallelism splits its params (``DECODER_PARTITION_RULES``
    unless its tree differs).
``registry`` maps HF ``architectures`` and GGUF ``general.architecture`` names to families.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from jaxllm.checkpoints_convert.hf_safetensors import load_params
from jaxllm.checkpoints_convert.weight_spec import TakeRows, Transform, WeightSpec, transpose
from jaxllm.config import ModelConfig
from jaxllm.models.layers import DecoderLayer
from jaxllm.models.rope import RopeSpec
from jaxllm.sharding import TP_AXIS, PartitionRules


@dataclasses.dataclass(frozen=True)
class GGUFFamily:
    """How llama.cpp writes a family (``general.architecture`` = ``architecture``).

    Attributes:
        hf_config: (metadata, tensor names) -> a transformers config for the HF directory the
            GGUF file is converted into. Metadata keys keep their full names.
        tensor_map: that config -> {GGUF tensor name: (HF tensor name, transform)}; every
            tensor the file must hold (``output.weight`` only with an untied head).
    """

    architecture: str
    hf_config: Callable[[dict[str, Any], list[str]], Any]
    tensor_map: Callable[[Any], dict[str, tuple[str, Transform]]]


@dataclasses.dataclass(frozen=True)
class ModelFamily:
    name: str
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Any], ModelConfig]
    weight_map: Callable[[ModelConfig], list[WeightSpec]]
    gguf: GGUFFamily | None = None
    layer: type = DecoderLayer
    partition_rules: PartitionRules = ()

    def load_params(self, model_dir: str | os.PathLike, config: ModelConfig,
                    dtype: DTypeLike = np.float32) -> dict[str, Any]:
        """The params tree of ``causal_lm`` (stacked layers) from an HF directory of this family.

        Raises:
            ValueError: a tensor is missing, unexpected, or has the wrong shape.
        """
        return load_params(
            model_dir, self.weight_map(config), config.num_hidden_layers, dtype,
            # Some tied checkpoints store the shared matrix twice; the embedding is the one used.
            optional=("lm_head.weight",) if config.tie_word_embeddings else (),
            description=f"its config ({config.architecture}, {config.num_hidden_layers} layers)")


# ---- HF config -> ModelConfig ----

def base_config_fields(hf: Any) -> dict[str, Any]:
    """The ModelConfig fields every transformers decoder config states the same way."""
    archs = getattr(hf, "architectures", None) or []
    num_heads = hf.num_attention_heads
    return dict(
        architecture=archs[0] if archs else type(hf).__name__.replace("Config", "ForCausalLM"),
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=getattr(hf, "num_key_value_heads", None) or num_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // num_heads,
        rms_norm_eps=float(getattr(hf, "rms_norm_eps", 1e-6)),
        max_position_embeddings=int(getattr(hf, "max_position_embeddings", 2048)),
        tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
    )


def rope_parameters(hf: Any, layer_type: str | None = None) -> dict[str, Any]:
    """transformers 5 ``rope_parameters`` (per layer type for Gemma 3), or 4.x's fields."""
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    if layer_type is not None and layer_type in params:
        params = params[layer_type]
    params = dict(params or {})
    params.setdefault("rope_theta", getattr(hf, "rope_theta", None) or 10000.0)
    return params


def single_rope(hf: Any, head_dim: int) -> tuple[RopeSpec, ...]:
    """One rotary table for every layer, rotating ``partial_rotary_factor`` of the head."""
    params = rope_parameters(hf)
    factor = params.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0)) or 1.0
    return (RopeSpec.from_hf(params, int(head_dim * factor), int(hf.max_position_embeddings)),)


def layer_windows(hf: Any) -> tuple[int, ...]:
    """Each layer's sliding window (0 = full attention): from ``layer_types`` when the config
    has them (Qwen2/3, Gemma 3), else ``sliding_window`` on every layer (Mistral, Phi-3)."""
    window = getattr(hf, "sliding_window", None) or 0
    types = getattr(hf, "layer_types", None)
    if types is None:
        return (int(window),) * hf.num_hidden_layers
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise ValueError(f"layer types {unknown} are not supported "
                         "(supported: full_attention, sliding_attention)")
    return tuple(int(window) if t == "sliding_attention" else 0 for t in types)


# ---- the HF weight map of a standard decoder ----

def decoder_weight_map(c: ModelConfig, norms: dict[str, str], *, fused_qkv: bool = False,
                       fused_gate_up: bool = False, prefix: str = "model.") -> list[WeightSpec]:
    """The weight map of a transformers decoder laid out as Llama's (``model.layers.{i}.``,
    ``self_attn.*_proj``, ``mlp.*_proj``) onto the tree of ``causal_lm``.

    Args:
        norms: the family's HF layer-norm name -> its role in the tree ("input_norm",
            "post_attention_norm", "pre_mlp_norm", "post_mlp_norm").
        fused_qkv: the checkpoint stores one ``self_attn.qkv_proj`` (Phi-3) instead of three.
        fused_gate_up: it stores one ``mlp.gate_up_proj`` [2F, D], gate first (Phi-3).
    """
    d, f = c.hidden_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    qkv_dim = q_dim + 2 * kv_dim
    per_layer: list[tuple[str, tuple[int, ...], tuple[str, ...], dict[str, Any]]] = []

    def linear(name: str, out_dim: int, in_dim: int, path: tuple[str, ...], bias: bool,
               **extra: Any) -> None:
        per_layer.append((f"{name}.weight", (out_dim, in_dim), (*path, "kernel"),
                          dict(transforms=(transpose,), **extra)))
        if bias:
            columns = extra.get("columns")
            bias_extra = {} if columns is None else dict(columns=columns, leaf_shape=(qkv_dim,))
            per_layer.append((f"{name}.bias", (out_dim,), (*path, "bias"), bias_extra))

    qkv_path = ("self_attn", "qkv_proj")
    if fused_qkv:
        linear("self_attn.qkv_proj", qkv_dim, d, qkv_path, c.qkv_bias)
    else:
        for name, start, width in (("q", 0, q_dim), ("k", q_dim, kv_dim), ("v", q_dim + kv_dim, kv_dim)):
            linear(f"self_attn.{name}_proj", width, d, qkv_path, c.qkv_bias,
                   columns=(start, start + width), leaf_shape=(d, qkv_dim))
    linear("self_attn.o_proj", d, q_dim, ("self_attn", "o_proj"), c.o_bias)
    if c.qk_norm:
        for name in ("q_norm", "k_norm"):
            per_layer.append((f"self_attn.{name}.weight", (c.head_dim,), ("self_attn", name, "scale"), {}))
    if fused_gate_up:
        for name, rows in (("gate_proj", TakeRows(0, f)), ("up_proj", TakeRows(f, 2 * f))):
            per_layer.append(("mlp.gate_up_proj.weight", (2 * f, d), ("mlp", name, "kernel"),
                              dict(transforms=(rows, transpose))))
    else:
        linear("mlp.gate_proj", f, d, ("mlp", "gate_proj"), c.mlp_bias)
        linear("mlp.up_proj", f, d, ("mlp", "up_proj"), c.mlp_bias)
    linear("mlp.down_proj", d, f, ("mlp", "down_proj"), c.mlp_bias)
    for hf_norm, role in norms.items():
        per_layer.append((f"{hf_norm}.weight", (d,), (role, "scale"), {}))

    specs = [WeightSpec(f"{prefix}embed_tokens.weight", (c.vocab_size, d), ("embed_tokens", "embedding")),
             WeightSpec(f"{prefix}norm.weight", (d,), ("norm", "scale"))]
    if not c.tie_word_embeddings:
        specs.append(WeightSpec("lm_head.weight", (c.vocab_size, d), ("lm_head", "kernel"), (transpose,)))
    for i in range(c.num_hidden_layers):
        for suffix, shape, path, extra in per_layer:
            specs.append(WeightSpec(f"{prefix}layers.{i}.{suffix}", shape, ("layers", *path), layer=i, **extra))
    return specs


# Megatron's split of the tree above over the "tp" mesh axis (``jaxllm.sharding``): q|k|v
# (laid out per shard, see ``layers.Attention``) and gate/up by output columns, o_proj and
# down_proj by input rows (one all-reduce each per layer), the vocabulary in the embedding and
# the untied head. Every other leaf (norms, biases added after a reduction) is replicated.
DECODER_PARTITION_RULES: PartitionRules = (
    ("embed_tokens/embedding", (TP_AXIS, None)),
    ("lm_head/kernel", (None, TP_AXIS)),
    ("self_attn/qkv_proj/kernel", (None, TP_AXIS)),
    ("self_attn/qkv_proj/bias", (TP_AXIS,)),
    ("self_attn/o_proj/kernel", (TP_AXIS, None)),
    ("mlp/(gate|up)_proj/kernel", (None, TP_AXIS)),
    ("mlp/(gate|up)_proj/bias", (TP_AXIS,)),
    ("mlp/down_proj/kernel", (TP_AXIS, None)),
)
