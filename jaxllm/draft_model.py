"""The draft model of speculative decoding: loaded, checked against the target, or carved out
of it (layer skip).

``speculative_config={"model": path_or_id, ...}`` loads a second, smaller model with the
target's tokenizer (``open_draft`` refuses any other before the target's weights are read);
``{"method": "layer_skip", "num_layers": n, ...}`` runs the target's own first n layers, final
norm and head (``layer_skip_params``: the same arrays, no copy). Either way the draft is a
``DraftModel``: a ``CausalLM`` and its params, which ``jaxllm.draft_proposer`` runs.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm import model_files
from jaxllm.config import ModelConfig
from jaxllm.models.causal_lm import CausalLM, unstack_layers
from jaxllm.models.family import ModelFamily
from jaxllm.models.registry import get_family

SPECIAL_TOKENS = ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id")


@dataclasses.dataclass(frozen=True)
class DraftSource:
    """A draft model's files, checked against the target's tokenizer (weights not read yet)."""

    model_dir: Path
    family: ModelFamily
    hf_config: Any
    model_config: ModelConfig
    gguf_file: Path | None   # the .gguf file it was converted from, if any


@dataclasses.dataclass(frozen=True)
class DraftModel:
    model: CausalLM
    params: Any
    model_config: ModelConfig


def tokenizer_mismatch(target: Any, target_vocab_size: int, draft: Any, draft_vocab_size: int
                       ) -> list[str]:
    """How two models' vocabularies differ (empty if they do not): sizes, tokenizers' token
    -> id maps, special token ids. ``target``/``draft``: tokenizers, or None (ids only)."""
    problems = []
    if target_vocab_size != draft_vocab_size:
        problems.append(f"vocabulary sizes {target_vocab_size} vs {draft_vocab_size}")
    if (target is None) != (draft is None):
        problems.append("one has a tokenizer and the other none")
    elif target is not None:
        if target.get_vocab() != draft.get_vocab():
            problems.append("their tokenizers' vocabularies differ")
        for name in SPECIAL_TOKENS:
            ids = getattr(target, name, None), getattr(draft, name, None)
            if ids[0] != ids[1]:
                problems.append(f"{name} {ids[0]} vs {ids[1]}")
    return problems


def check_draft(config: Any, target_name: str, target_tokenizer: Any, target_config: ModelConfig,
                tensor_parallel_size: int) -> DraftSource | None:
    """Checks a draft-model or layer-skip ``SpeculativeConfig`` before the target loads;
    the draft model's files (None for layer skip, or n-gram)."""
    if config is None or config.method == "ngram":
        return None
    if tensor_parallel_size != 1:
        raise ValueError(f"speculative_config: method {config.method!r} runs on one device; "
                         f"got tensor_parallel_size={tensor_parallel_size}")
    if config.method == "layer_skip":
        layer_skip_config(target_config, config.num_layers)
        return None
    return open_draft(config.model, target_name, target_tokenizer, target_config)


def open_draft(draft: str | os.PathLike, target_name: str, target_tokenizer: Any,
               target_config: ModelConfig) -> DraftSource:
    """Resolves the draft model and checks that it shares the target's tokenizer.

    Raises:
        ValueError: naming both models and how their vocabularies differ.
    """
    from jaxllm.model_source import gguf_file, resolve_model

    model_dir = resolve_model(draft)
    hf_config = model_files.load_hf_config(model_dir)
    family = get_family((getattr(hf_config, "architectures", None) or ["LlamaForCausalLM"])[0])
    config = family.config_from_hf(hf_config)
    problems = tokenizer_mismatch(target_tokenizer, target_config.vocab_size,
                                  model_files.load_tokenizer(model_dir), config.vocab_size)
    if problems:
        raise ValueError(f"speculative_config: the draft model {str(draft)!r} does not share the "
                         f"target model {target_name!r}'s tokenizer: {'; '.join(problems)}")
    return DraftSource(model_dir, family, hf_config, config, gguf_file(draft))


def load_draft(source: DraftSource, dtype: str, attention: Any, scan_layers: bool,
               device: jax.Device | None, quantization: str | None) -> DraftModel:
    """The draft's weights in the target's dtype on the target's device; a GGUF draft keeps
    its blocks when the target's ``quantization`` is "gguf", else it is dense."""
    mc, np_dtype = source.model_config, np.dtype(jax.numpy.dtype(dtype))
    if quantization == "gguf" and source.gguf_file is not None:
        from jaxllm.quantization import matmul_implementation, use_int_dot
        from jaxllm.quantization.gguf_params import load_gguf_params

        params = use_int_dot(load_gguf_params(
            source.gguf_file, source.family, source.hf_config, mc, np_dtype,
            scan_layers=scan_layers, implementation=matmul_implementation(jax.default_backend())))
    else:
        params = source.family.load_params(source.model_dir, mc, np_dtype)
        if not scan_layers:
            params = unstack_layers(params, mc.num_hidden_layers)
    model = CausalLM(config=mc, dtype=jax.numpy.dtype(dtype), attention_fn=attention,
                     scan_layers=scan_layers, layer_cls=source.family.layer)
    return DraftModel(model, jax.device_put(params, device), mc)


def layer_skip_config(config: ModelConfig, num_layers: int) -> ModelConfig:
    """The target's config cut to its first ``num_layers`` layers."""
    if not 1 <= num_layers < config.num_hidden_layers:
        raise ValueError(f"speculative_config['num_layers'] must be in [1, "
                         f"{config.num_hidden_layers - 1}] (the target has "
                         f"{config.num_hidden_layers} layers), got {num_layers}")
    return dataclasses.replace(config, num_hidden_layers=num_layers,
                               layer_windows=config.layer_windows[:num_layers],
                               layer_rope=config.layer_rope[:num_layers])


def layer_skip_params(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """The target's params for its first ``num_layers`` layers: the same arrays (unrolled
    layers are left out; stacked ones are sliced, which inside a jitted step reads the slice
    in place)."""
    kept = {name: value for name, value in params.items()
            if not name.startswith("layers_") or int(name.removeprefix("layers_")) < num_layers}
    if "layers" in params:
        kept["layers"] = jax.tree.map(lambda a: a[:num_layers], params["layers"])
    return kept


def layer_skip_draft(model: CausalLM, num_layers: int) -> CausalLM:
    """The target's module, cut to its first ``num_layers`` layers (params:
    ``layer_skip_params`` of the target's)."""
    return model.clone(config=layer_skip_config(model.config, num_layers))
