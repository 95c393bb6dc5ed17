"""LoRARequest: which adapter a request runs under (vLLM's names)."""

from __future__ import annotations

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class LoRARequest:
    """An adapter in the PEFT format (``adapter_config.json`` + ``adapter_model.safetensors``).

    Attributes:
        lora_name: a name for people (and the server's ``model`` field).
        lora_int_id: a positive integer that identifies the adapter: requests with equal ids
            share one loaded copy and one slot, and it joins the prefix-cache key.
        lora_path: the adapter's directory.
    """

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise ValueError(f"lora_name must be a non-empty string, got {self.lora_name!r}")
        if type(self.lora_int_id) is not int or self.lora_int_id < 1:
            raise ValueError(f"lora_int_id must be a positive integer, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)):
            raise ValueError(f"lora_path must be a path, got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))
