"""Llama-architecture GGUF file -> ordinary HF model directory (safetensors + config + tokenizer).

The output loads with ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and with
``load_params``. Every tensor is written as float32: dequantized Q8_0/Q4_0/Q4_1 blocks and
F16/BF16 values are all exact in float32, so the directory is a lossless view of the GGUF
(it costs 2x the disk of bf16 for a BF16 source; the engine casts to its dtype on load anyway).

Nothing here imports torch: transformers' own GGUF readers (``AutoConfig``/``AutoTokenizer`` with
``gguf_file=``) need torch installed, so the config is rebuilt from an explicit metadata map and
the tokenizer from transformers' torch-free GGUF tokenizer builder.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
from gguf.quants import dequantize
from safetensors.numpy import save_file
from transformers import GenerationConfig, LlamaConfig, PreTrainedTokenizerFast
from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from .hf_safetensors import INDEX_FILE, SINGLE_FILE, identity, name_mismatches

SUPPORTED_TYPES = frozenset({
    GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16,
    GGMLQuantizationType.Q8_0, GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1,
})

# Bounds peak memory: one shard of float32 tensors is held at a time.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

Transform = Callable[[np.ndarray], np.ndarray]

# GGUF metadata key after "llama." -> LlamaConfig field. Absent optional keys keep LlamaConfig's
# derivation (head_dim = hidden / heads, kv heads = heads).
_LLAMA_CONFIG_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.dimension_count": "head_dim",  # Llama rotates the whole head
    "vocab_size": "vocab_size",
}

# Token ids on which generation stops; Llama 3 files name end-of-turn apart from end-of-text.
_STOP_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id")


def unpermute_rope(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation (interleaved rotary pairs -> HF's rotate-half halves).

    llama.cpp's converter applies ``w.reshape(n, 2, H // 2, D).swapaxes(1, 2)``; this is its inverse,
    the same as transformers' ``LlamaTensorProcessor._reverse_permute_weights``.

    Args:
        w: [num_heads * H, D] weight (or [num_heads * H] bias) in llama.cpp order.
        num_heads: query heads for q, kv heads for k.
    """
    head_dim = w.shape[0] // num_heads
    return w.reshape(num_heads, head_dim // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_map(num_layers: int, num_heads: int, num_kv_heads: int) -> dict[str, tuple[str, Transform]]:
    """GGUF tensor name -> (HF tensor name, transform) for a Llama model. ``output.weight`` is
    absent from files with tied embeddings."""
    unpermute_q = functools.partial(unpermute_rope, num_heads=num_heads)
    unpermute_k = functools.partial(unpermute_rope, num_heads=num_kv_heads)
    per_layer = {
        "attn_norm.weight": ("input_layernorm.weight", identity),
        "attn_q.weight": ("self_attn.q_proj.weight", unpermute_q),
        "attn_k.weight": ("self_attn.k_proj.weight", unpermute_k),
        "attn_v.weight": ("self_attn.v_proj.weight", identity),
        "attn_output.weight": ("self_attn.o_proj.weight", identity),
        "ffn_norm.weight": ("post_attention_layernorm.weight", identity),
        "ffn_gate.weight": ("mlp.gate_proj.weight", identity),
        "ffn_up.weight": ("mlp.up_proj.weight", identity),
        "ffn_down.weight": ("mlp.down_proj.weight", identity),
    }
    mapping = {
        "token_embd.weight": ("model.embed_tokens.weight", identity),
        "output_norm.weight": ("model.norm.weight", identity),
        "output.weight": ("lm_head.weight", identity),
    }
    for i in range(num_layers):
        for gguf_suffix, (hf_suffix, transform) in per_layer.items():
            mapping[f"blk.{i}.{gguf_suffix}"] = (f"model.layers.{i}.{hf_suffix}", transform)
    return mapping


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Converts a Llama GGUF file into an HF directory at ``out_dir``.

    Writes ``model.safetensors`` (float32; sharded with an index past ``max_shard_bytes``),
    ``config.json``, ``generation_config.json`` and the tokenizer files with the chat template.
    The directory is built beside ``out_dir`` under a temporary name and renamed into place at the
    end, so an interrupted conversion never leaves a directory that looks complete.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` already exists.
        ValueError: not a Llama GGUF, an unsupported tensor type, or missing/unexpected tensors.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or pick another output directory")
    reader = GGUFReader(gguf_path)
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    if metadata.get("general.architecture") != "llama":
        raise ValueError(f"{gguf_path}: architecture {metadata.get('general.architecture')!r} is not "
                         "supported (only 'llama')")
    config = _hf_config(metadata, reader.tensors)
    plan = _plan_tensors(gguf_path, reader.tensors, config)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp_dir.mkdir()
    try:
        _write_weights(plan, tmp_dir, max_shard_bytes)
        config.save_pretrained(tmp_dir)
        _generation_config(metadata).save_pretrained(tmp_dir)
        _tokenizer(metadata).save_pretrained(tmp_dir)
        os.rename(tmp_dir, out_dir)  # atomic on one filesystem; fails if out_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _hf_config(metadata: dict[str, Any], tensors: list[ReaderTensor]) -> LlamaConfig:
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling != "none":
        raise ValueError(f"rope scaling {scaling!r} in GGUF metadata is not supported")
    fields = {hf_key: metadata[f"llama.{key}"] for key, hf_key in _LLAMA_CONFIG_KEYS.items()
              if f"llama.{key}" in metadata}
    fields.setdefault("vocab_size", len(metadata["tokenizer.ggml.tokens"]))
    return LlamaConfig(
        **fields,
        architectures=["LlamaForCausalLM"],
        rope_parameters={"rope_type": "default",
                         "rope_theta": float(metadata.get("llama.rope.freq_base", 10000.0))},
        # llama.cpp writes the output projection only when it is not the embedding matrix.
        tie_word_embeddings=all(t.name != "output.weight" for t in tensors),
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
        dtype="float32",
    )


def _plan_tensors(gguf_path: Path, tensors: list[ReaderTensor],
                  config: LlamaConfig) -> list[tuple[ReaderTensor, str, Transform]]:
    """Checks names and types of every tensor before anything is written."""
    mapping = tensor_map(config.num_hidden_layers, config.num_attention_heads,
                         config.num_key_value_heads)
    if config.tie_word_embeddings:
        del mapping["output.weight"]
    problems = name_mismatches(mapping, (t.name for t in tensors))
    unsupported = sorted({t.tensor_type.name for t in tensors if t.tensor_type not in SUPPORTED_TYPES})
    if unsupported:
        supported = sorted(t.name for t in SUPPORTED_TYPES)
        problems.append(f"unsupported tensor types {unsupported} (supported: {supported})")
    if problems:
        raise ValueError(f"Cannot convert {gguf_path}: " + "; ".join(problems))
    return [(t, *mapping[t.name]) for t in tensors]


def _write_weights(plan: list[tuple[ReaderTensor, str, Transform]], out_dir: Path,
                   max_shard_bytes: int) -> None:
    shards: list[list[tuple[ReaderTensor, str, Transform]]] = [[]]
    shard_bytes = 0
    for entry in plan:
        nbytes = 4 * int(np.prod(entry[0].shape))  # float32 output
        if shards[-1] and shard_bytes + nbytes > max_shard_bytes:
            shards.append([])
            shard_bytes = 0
        shards[-1].append(entry)
        shard_bytes += nbytes

    weight_map = {}
    for i, shard in enumerate(shards):
        filename = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor, hf_name, transform in shard:
            # dequantize gives [rows, cols] in numpy order, i.e. HF's [out, in].
            w = dequantize(tensor.data, tensor.tensor_type)
            arrays[hf_name] = np.ascontiguousarray(transform(w), dtype=np.float32)
            weight_map[hf_name] = filename
        save_file(arrays, out_dir / filename, metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(4 * int(np.prod(t.shape)) for t, _, _ in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _generation_config(metadata: dict[str, Any]) -> GenerationConfig:
    stop_ids = list(dict.fromkeys(metadata[k] for k in _STOP_TOKEN_KEYS if k in metadata))
    return GenerationConfig(
        bos_token_id=metadata.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=stop_ids[0] if len(stop_ids) == 1 else (stop_ids or None),
        pad_token_id=metadata.get("tokenizer.ggml.padding_token_id"),
    )


def _tokenizer(metadata: dict[str, Any]) -> PreTrainedTokenizerFast:
    """What ``AutoTokenizer.from_pretrained(dir, gguf_file=...)`` builds, without its torch reader."""
    grouped = {
        group: {name: metadata[f"tokenizer.{key}"] for key, name in renames.items()
                if f"tokenizer.{key}" in metadata}
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer_dict, tokenizer_config = grouped["tokenizer"], grouped["tokenizer_config"]
    if tokenizer_dict.get("tokenizer_type") == "llama":
        # llama.cpp adds BOS to a sentencepiece vocabulary whose file does not say otherwise.
        tokenizer_config.setdefault("add_bos_token", True)
    tokens = tokenizer_dict["tokens"]
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        tokenizer_config[name] = tokens[token_id] if token_id is not None else None
    backend, _ = convert_gguf_tokenizer(metadata["general.architecture"], tokenizer_dict)
    return PreTrainedTokenizerFast(tokenizer_object=backend, **tokenizer_config)
