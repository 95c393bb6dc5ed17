"""PEFT LoRA adapters on disk: read and validated for one model (``load_adapter``), written
from trained factors (``save_peft``). numpy only: validation runs in the caller's thread.

The format: ``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``,
``use_rslora``) and ``adapter_model.safetensors`` with, per layer i and module m,
``base_model.model.model.layers.{i}.{self_attn|mlp}.{m}.lora_A.weight`` [r, in] and
``...lora_B.weight`` [out, r]. The update of a module is ``x @ A.T @ B.T * scaling`` with
scaling ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` under rsLoRA).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.lora.targets import TargetModule

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_TENSOR = re.compile(r"^(?:base_model\.model\.)?model\.layers\.(\d+)\.(\w+)\.(\w+)"
                     r"\.lora_([AB])(?:\.default)?\.weight$")
# adapter_config.json settings whose non-default values change the math: refused, not ignored.
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "bias": "none", "rank_pattern": {},
                "alpha_pattern": {}, "modules_to_save": None, "lora_bias": False}


@dataclasses.dataclass(frozen=True)
class LoRAAdapter:
    """An adapter's factors for every targeted module of a model, in layer-stacked arrays.

    ``weights[m] = (A [L, in, r], B [L, r, out])`` (float32; zero in layers it leaves alone).
    """

    rank: int
    scaling: float
    weights: dict[str, tuple[np.ndarray, np.ndarray]]


def load_adapter(path: str | os.PathLike, targets: dict[str, TargetModule], num_layers: int,
                 max_rank: int) -> LoRAAdapter:
    """Reads a PEFT adapter directory and checks it against the model's modules.

    Raises:
        ValueError: a missing file, an unsupported setting, a rank over ``max_rank``, a
            module the model has no projection for, or factors whose shapes do not match the
            model's (an adapter trained for another base model).
    """
    path = Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for f in (config_file, weights_file):
        if not f.is_file():
            raise ValueError(f"LoRA adapter {path}: no {f.name} (a PEFT adapter directory has "
                             f"{CONFIG_FILE} and {WEIGHTS_FILE})")
    config = json.loads(config_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"LoRA adapter {path}: peft_type {config['peft_type']!r} is not LORA")
    for key, default in _UNSUPPORTED.items():
        if config.get(key, default) not in (default, None, {}, False):
            raise ValueError(f"LoRA adapter {path}: {key}={config[key]!r} is not supported")
    rank = int(config["r"])
    if rank > max_rank:
        raise ValueError(f"LoRA adapter {path}: rank {rank} is over max_lora_rank={max_rank}")
    alpha = float(config.get("lora_alpha", 8))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    from safetensors.numpy import load_file

    factors: dict[str, dict[str, np.ndarray]] = {}
    for name, tensor in load_file(weights_file).items():
        match = _TENSOR.match(name)
        if match is None:
            raise ValueError(f"LoRA adapter {path}: tensor {name} targets no decoder-layer "
                             f"projection (supported: {', '.join(sorted(targets))})")
        layer, module, kind = int(match[1]), match[3], match[4]
        if module not in targets:
            raise ValueError(f"LoRA adapter {path}: unknown target module {module!r} "
                             f"(this model's: {', '.join(sorted(targets))})")
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {path}: layer {layer} of a {num_layers}-layer model")
        target = targets[module]
        expected = (rank, target.in_dim) if kind == "A" else (target.out_dim, rank)
        if tensor.shape != expected:
            raise ValueError(f"LoRA adapter {path}: {name} is {tensor.shape}, the base model "
                             f"needs {expected} (an adapter of another model?)")
        entry = factors.setdefault(module, {})
        if kind not in entry:
            entry[kind] = np.zeros((num_layers, *expected[::-1]), np.float32)
        entry[kind][layer] = tensor.T
    if not factors:
        raise ValueError(f"LoRA adapter {path}: {WEIGHTS_FILE} holds no LoRA tensors")
    for module, entry in factors.items():
        if set(entry) != {"A", "B"}:
            raise ValueError(f"LoRA adapter {path}: {module} has lora_{set(entry).pop()} only")
    return LoRAAdapter(rank, scaling, {m: (e["A"], e["B"]) for m, e in factors.items()})


def save_peft(lora_params: dict[str, dict[str, Any]], directory: str | os.PathLike, *,
              lora_alpha: float, targets: dict[str, TargetModule],
              base_model_name_or_path: str | None = None) -> Path:
    """Writes trained factors as a PEFT adapter directory (what ``load_adapter``, the engine's
    ``LoRARequest`` and ``peft.PeftModel.from_pretrained`` read).

    Args:
        lora_params: ``{module: {"a": [L, in, r], "b": [L, r, out]}}`` (``jaxllm.lora.train``).
        lora_alpha: the scaling numerator the factors were trained with (scaling alpha / r).
        targets: the model's modules (``lora_targets``), for each module's parent name.
    """
    from safetensors.numpy import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, rank = {}, None
    for module, ab in lora_params.items():
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        rank = a.shape[-1]
        parent = targets[module].placements[0].projection.split("/")[0]
        for i in range(a.shape[0]):
            prefix = f"base_model.model.model.layers.{i}.{parent}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b[i].T)
    save_file(tensors, directory / WEIGHTS_FILE, metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": lora_alpha,
              "target_modules": sorted(lora_params), "lora_dropout": 0.0, "bias": "none",
              "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return directory
