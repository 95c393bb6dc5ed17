"""LoRA adapters: serving many per batch (``Engine(enable_lora=True)``) and training one.

Serving: ``jaxllm.lora.adapter`` reads (and validates) PEFT adapters onto the engine's
projections (``jaxllm.lora.targets``), ``jaxllm.lora.slots`` assigns them device slots,
``jaxllm.lora.slab`` holds the slots' weights and adds each token's low-rank product after
every projection. Training: ``jaxllm.lora.train`` (``init_lora``, ``causal_lm_loss``,
``make_train_step``), ``save_peft`` writes what the engine and the ``peft`` package load.
Names are imported on first use: the host-side modules load without jax.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LoRARequest": "jaxllm.lora.request",
    "load_adapter": "jaxllm.lora.adapter",
    "save_peft": "jaxllm.lora.adapter",
    "init_lora": "jaxllm.lora.train",
    "causal_lm_loss": "jaxllm.lora.train",
    "make_train_step": "jaxllm.lora.train",
    "TrainBase": "jaxllm.lora.train",
    "forward_logits": "jaxllm.lora.train",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxllm.lora' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
