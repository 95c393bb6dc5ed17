"""Which adapter each of the engine's ``max_loras`` device slots holds (host side, no jax).

The scheduler admits a request under an adapter only when the adapter has a slot or one can
be taken: a free slot, else the least recently assigned adapter that no running request uses
(its weights are overwritten when the runner next prepares a step). When every slot serves
running requests, the request waits. Slot contents change only between steps, and a step in
flight keeps the slab arrays it was given (they are replaced, never written in place).
"""

from __future__ import annotations

from collections import OrderedDict


class LoRASlots:
    def __init__(self, max_loras: int) -> None:
        self.max_loras = max_loras
        self._slot_by_id: OrderedDict[int, int] = OrderedDict()   # least recently assigned first

    def slot_of(self, lora_int_id: int) -> int:
        return self._slot_by_id[lora_int_id]

    def can_assign(self, lora_int_id: int, busy: set[int]) -> bool:
        """Whether ``assign`` would succeed while the adapters in ``busy`` are in use."""
        return (lora_int_id in self._slot_by_id or len(self._slot_by_id) < self.max_loras
                or any(i not in busy for i in self._slot_by_id))

    def assign(self, lora_int_id: int, busy: set[int]) -> int:
        """The adapter's slot, taking a free one or evicting the least recently assigned idle
        adapter. Raises RuntimeError when every slot is busy (``can_assign`` said no)."""
        if lora_int_id in self._slot_by_id:
            self._slot_by_id.move_to_end(lora_int_id)
            return self._slot_by_id[lora_int_id]
        if len(self._slot_by_id) < self.max_loras:
            slot = min(set(range(self.max_loras)) - set(self._slot_by_id.values()))
        else:
            victim = next((i for i in self._slot_by_id if i not in busy), None)
            if victim is None:
                raise RuntimeError(f"all {self.max_loras} LoRA slots serve running requests")
            slot = self._slot_by_id.pop(victim)
        self._slot_by_id[lora_int_id] = slot
        return slot
