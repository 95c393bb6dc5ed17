"""Checkpoint converters: HF safetensors -> the engine's params pytree; GGUF -> HF directory.

``gguf_to_hf`` is imported on first use: the ``gguf`` package is only needed for GGUF files
(and is absent from some GPU images).
"""

from typing import Any

from .hf_safetensors import load_params

__all__ = ["gguf_to_hf", "load_params"]


def __getattr__(name: str) -> Any:
    if name == "gguf_to_hf":
        from .gguf import gguf_to_hf

        return gguf_to_hf
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
