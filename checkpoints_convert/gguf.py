"""GGUF file -> ordinary HF model directory (safetensors + config + tokenizer), for every family.

The family comes from ``general.architecture`` (``jaxllm.models.registry``); its module says
how llama.cpp wrote it (``ModelFamily.gguf``: the HF config from the metadata, and each GGUF
tensor's HF name and transform). The output loads with ``transformers.AutoModelForCausalLM`` /
``AutoTokenizer`` and with the engine's own loader. Every tensor is written as float32,
dequantized with the ``gguf`` package's own routines: every type it dequantizes
(``SUPPORTED_TYPES``: the legacy 4/5/8-bit blocks and the K-quants real files use) is exact in
float32, so the directory is a lossless view of the GGUF (the engine casts to its dtype on load).

Nothing here imports torch: transformers' own GGUF readers (``AutoConfig``/``AutoTokenizer`` with
``gguf_file=``) need torch installed, so the config is rebuilt by the family and the tokenizer
from transformers' torch-free GGUF tokenizer builder.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import tqdm.auto as tqdm
from gguf import GGMLQuantizationType, ReaderTensor
from gguf.quants import dequantize
from safetensors.numpy import save_file
from transformers import GenerationConfig, PreTrainedTokenizerFast
from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

from .gguf_reader import open_gguf
from .hf_safetensors import INDEX_FILE, SINGLE_FILE, name_mismatches
from .weight_spec import Transform

_T = GGMLQuantizationType
SUPPORTED_TYPES = frozenset({
    _T.F32, _T.F16, _T.BF16, _T.Q8_0, _T.Q4_0, _T.Q4_1, _T.Q5_0, _T.Q5_1,
    _T.Q2_K, _T.Q3_K, _T.Q4_K, _T.Q5_K, _T.Q6_K,
})

# Bounds peak memory: one shard of float32 tensors is held at a time.
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3

# Token ids on which generation stops; Llama 3 files name end-of-turn apart from end-of-text.
_STOP_TOKEN_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                    "tokenizer.ggml.eom_token_id")


def gguf_to_hf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *,
               max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> Path:
    """Converts a GGUF file of a supported family into an HF directory at ``out_dir``.

    Writes ``model.safetensors`` (float32; sharded with an index past ``max_shard_bytes``),
    ``config.json``, ``generation_config.json`` and the tokenizer files with the chat template.
    The directory is built beside ``out_dir`` under a temporary name and renamed into place at the
    end, so an interrupted conversion never leaves a directory that looks complete.

    Returns:
        ``out_dir`` as a Path.

    Raises:
        FileExistsError: ``out_dir`` already exists.
        CheckpointFileError: the file is empty, truncated or corrupt (the message says how).
        ValueError: an unsupported architecture or tensor type, or missing/unexpected tensors.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; remove it or pick another output directory")
    reader = open_gguf(gguf_path)
    metadata = {key: field.contents() for key, field in reader.fields.items()}
    from jaxllm.models.registry import get_gguf_family

    family = get_gguf_family(metadata.get("general.architecture")).gguf
    config = family.hf_config(metadata, [t.name for t in reader.tensors])
    plan = _plan_tensors(gguf_path, reader.tensors, family.tensor_map(config))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared cache.
    tmp_dir = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp_dir.mkdir()
    try:
        _write_weights(plan, tmp_dir, max_shard_bytes, f"Converting {gguf_path.name} to float32")
        config.save_pretrained(tmp_dir)
        _generation_config(metadata).save_pretrained(tmp_dir)
        _tokenizer(metadata).save_pretrained(tmp_dir)
        os.rename(tmp_dir, out_dir)  # atomic on one filesystem; fails if out_dir appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _plan_tensors(gguf_path: Path, tensors: list[ReaderTensor],
                  mapping: dict[str, tuple[str, Transform]]) -> list[tuple[ReaderTensor, str, Transform]]:
    """Checks names and types of every tensor before anything is written."""
    problems = name_mismatches(mapping, (t.name for t in tensors))
    unsupported = sorted({t.tensor_type.name for t in tensors if t.tensor_type not in SUPPORTED_TYPES})
    if unsupported:
        supported = sorted(t.name for t in SUPPORTED_TYPES)
        problems.append(f"unsupported tensor types {unsupported} (supported: {supported})")
    if problems:
        raise ValueError(f"Cannot convert {gguf_path}: " + "; ".join(problems))
    return [(t, *mapping[t.name]) for t in tensors]


def _write_weights(plan: list[tuple[ReaderTensor, str, Transform]], out_dir: Path,
                   max_shard_bytes: int, description: str) -> None:
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
    bar = tqdm.tqdm(total=len(plan), desc=description, unit="tensor")
    for i, shard in enumerate(shards):
        filename = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = {}
        for tensor, hf_name, transform in shard:
            bar.update()
            # dequantize gives [rows, cols] in numpy order, i.e. HF's [out, in].
            w = dequantize(tensor.data, tensor.tensor_type)
            arrays[hf_name] = np.ascontiguousarray(transform(w), dtype=np.float32)
            weight_map[hf_name] = filename
        save_file(arrays, out_dir / filename, metadata={"format": "pt"})
    bar.close()
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
