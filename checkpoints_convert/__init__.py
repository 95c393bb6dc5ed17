"""Checkpoint converters: HF safetensors -> the engine's params pytree; GGUF -> HF directory."""

from .gguf import gguf_to_hf
from .hf_safetensors import load_params, weight_map

__all__ = ["gguf_to_hf", "load_params", "weight_map"]
