"""The engine's LoRA state: adapters read on first use, their slots, and the device slab.

``adapter(request)`` runs in the caller's thread at submission (so a bad adapter is refused
before any work starts); the scheduler assigns slots (``slots``) when it admits a request;
``slot_for`` runs in the runner as it prepares a step and loads the adapter into its slot
when the slot holds another.
"""

from __future__ import annotations

import threading
from typing import Any

import jax

from jaxllm.config import ModelConfig
from jaxllm.lora.adapter import LoRAAdapter, load_adapter
from jaxllm.lora.request import LoRARequest
from jaxllm.lora.slab import LoRASlab
from jaxllm.lora.slots import LoRASlots
from jaxllm.lora.targets import lora_targets


class LoRAServing:
    def __init__(self, family: Any, config: ModelConfig, max_loras: int, max_lora_rank: int,
                 dtype: Any, device: jax.Device | None = None) -> None:
        self.targets, self.projections = lora_targets(family.weight_map(config))
        self.num_layers = config.num_hidden_layers
        self.max_lora_rank = max_lora_rank
        self.slots = LoRASlots(max_loras)
        self.slab = LoRASlab(self.projections, self.targets, self.num_layers, max_loras,
                             max_lora_rank, dtype, device)
        self._adapters: dict[int, tuple[LoRARequest, LoRAAdapter]] = {}
        self._lock = threading.Lock()

    def adapter(self, request: LoRARequest) -> LoRAAdapter:
        """The request's adapter, read and validated on its first use (ValueError if bad)."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        with self._lock:
            known = self._adapters.get(request.lora_int_id)
            if known is not None:
                if known[0].lora_path != request.lora_path:
                    raise ValueError(f"lora_int_id {request.lora_int_id} is already adapter "
                                     f"{known[0].lora_path}, not {request.lora_path}")
                return known[1]
            adapter = load_adapter(request.lora_path, self.targets, self.num_layers,
                                   self.max_lora_rank)
            self._adapters[request.lora_int_id] = (request, adapter)
            return adapter

    def slot_for(self, request: LoRARequest | None) -> int:
        """The slot a request's rows read (-1: the base model), loaded with its adapter."""
        if request is None:
            return -1
        slot = self.slots.slot_of(request.lora_int_id)
        self.slab.load(slot, request.lora_int_id, self._adapters[request.lora_int_id][1])
        return slot
