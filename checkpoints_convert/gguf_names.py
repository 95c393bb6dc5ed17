"""llama.cpp's GGUF conventions that families share: metadata keys, tensor names, transforms.

Nothing here imports the ``gguf`` package: family modules use these to declare their GGUF
mapping, and only the converter (``gguf.py``) reads files.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from .weight_spec import Transform, identity

# GGUF metadata key after "<arch>." -> transformers config field, for keys every family writes
# the same way. Absent optional keys keep the config class's derivation.
COMMON_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.key_length": "head_dim",
}

# llama.cpp per-layer tensor suffix -> (transformers suffix after "model.layers.{i}.", transform),
# for the Llama layout; families copy it and add or override entries.
LLAMA_LAYER_TENSORS: dict[str, tuple[str, Transform]] = {
    "attn_norm.weight": ("input_layernorm.weight", identity),
    "attn_q.weight": ("self_attn.q_proj.weight", identity),
    "attn_k.weight": ("self_attn.k_proj.weight", identity),
    "attn_v.weight": ("self_attn.v_proj.weight", identity),
    "attn_output.weight": ("self_attn.o_proj.weight", identity),
    "ffn_norm.weight": ("post_attention_layernorm.weight", identity),
    "ffn_gate.weight": ("mlp.gate_proj.weight", identity),
    "ffn_up.weight": ("mlp.up_proj.weight", identity),
    "ffn_down.weight": ("mlp.down_proj.weight", identity),
}


def config_fields(metadata: dict[str, Any], tensor_names: list[str], extra_keys: dict[str, str] = {}
                  ) -> dict[str, Any]:
    """transformers config kwargs from the common keys (and ``extra_keys``), the vocabulary,
    the special token ids and whether the head is tied."""
    arch = metadata["general.architecture"]
    fields = {hf_key: metadata[f"{arch}.{key}"] for key, hf_key in {**COMMON_CONFIG_KEYS, **extra_keys}.items()
              if f"{arch}.{key}" in metadata}
    fields.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    return dict(
        fields,
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def default_rope(metadata: dict[str, Any], default_theta: float = 10000.0) -> dict[str, Any]:
    """transformers ``rope_parameters`` of plain RoPE with the file's base frequency."""
    arch = metadata["general.architecture"]
    return {"rope_type": "default",
            "rope_theta": float(metadata.get(f"{arch}.rope.freq_base", default_theta))}


def require_no_rope_scaling(metadata: dict[str, Any], allowed: tuple[str, ...] = ()) -> str:
    """The file's rope scaling type; raises for one the converter cannot express."""
    arch = metadata["general.architecture"]
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling != "none" and scaling not in allowed:
        raise ValueError(f"rope scaling {scaling!r} in GGUF metadata is not supported for {arch} "
                         f"(supported: none{''.join(', ' + a for a in allowed)})")
    return scaling


def tensor_map(num_layers: int, per_layer: dict[str, tuple[str, Transform]], tied: bool
               ) -> dict[str, tuple[str, Transform]]:
    """GGUF tensor name -> (HF tensor name, transform) for the usual global tensors plus
    ``per_layer`` (llama.cpp suffix -> transformers suffix) on every layer."""
    mapping = {
        "token_embd.weight": ("model.embed_tokens.weight", identity),
        "output_norm.weight": ("model.norm.weight", identity),
    }
    if not tied:
        mapping["output.weight"] = ("lm_head.weight", identity)
    for i in range(num_layers):
        for gguf_suffix, (hf_suffix, transform) in per_layer.items():
            mapping[f"blk.{i}.{gguf_suffix}"] = (f"model.layers.{i}.{hf_suffix}", transform)
    return mapping


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's rotate-half halves).

    llama.cpp's Llama converter applies ``w.reshape(n, 2, H // 2, D).swapaxes(1, 2)``; this is
    its inverse, the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.
    Families that llama.cpp runs with NeoX-style rotary (Qwen, Gemma, Phi-3) are not permuted.

    Args:
        w: [num_heads * H, D] weight (or [num_heads * H] bias) in llama.cpp order.
        num_heads: query heads for q, kv heads for k.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermuter(num_heads: int) -> Transform:
    return functools.partial(unpermute_rope, num_heads=num_heads)


def subtract_one(w: np.ndarray) -> np.ndarray:
    """llama.cpp stores Gemma's RMSNorm weights as 1 + w (what the norm multiplies by)."""
    return (w.astype(np.float32) - 1.0).astype(w.dtype)
