"""jaxllm: a JAX/XLA-compiled inference engine for large language models.

Public names are imported on first use (PEP 562), so ``import jaxllm`` and the host-side
modules (scheduler, KV manager, sequences, output processing) load without jax; ``Engine``
brings in jax, flax and the model code when it is first touched.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_EXPORTS = {
    "Engine": "jaxllm.engine",
    "EngineDeadError": "jaxllm.request_handle",
    "RequestError": "jaxllm.request_handle",
    "LogitsProcessorError": "jaxllm.request_handle",
    "SamplingParams": "jaxllm.sampling_params",
    "RequestOutputKind": "jaxllm.sampling_params",
    "StructuredOutputsParams": "jaxllm.structured_outputs",
    "RequestOutput": "jaxllm.outputs",
    "CompletionOutput": "jaxllm.outputs",
    "RequestMetrics": "jaxllm.outputs",
    "Logprob": "jaxllm.outputs",
    "LoRARequest": "jaxllm.lora.request",
    "register_strategy": "jaxllm.strategies",
    "registered_strategies": "jaxllm.strategies",
    "unregister_strategy": "jaxllm.strategies",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
