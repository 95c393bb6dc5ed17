"""The padding layout of a step: every host array's shape and padding value, declared once.

``ModelRunner.prepare_inputs`` fills views of preallocated buffers that start out as padding
(``HostBuffers.views``); warm-up runs steps made of padding only (``StepLayout.padding``); the
compiled step cuts its packed buffers by ``StepLayout.packed``. All three read the table below,
so they cannot disagree.

Padding is inert: padding tokens have row -1, no feedback and no prompt logprob, and write
their K/V into slots 0 .. block_size - 1 of the reserved block 0; padding rows have zero block
tables and contexts and neutral sampling rows (``jaxllm.sampling_rows``); padding block copies
copy block 0 onto itself. So a step of padding only changes nothing outside block 0.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import numpy as np

from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.packing import PackedLayout, layout_of
from jaxllm.sampling_rows import ROW_FIELDS, SamplingLimits, row_widths
from jaxllm.step_inputs import SamplingTensors, StepArrays, StepInputs, StepKey

SLOT_PATTERN = "slots 0 .. block_size - 1 of block 0, cyclically"


@dataclasses.dataclass(frozen=True)
class ArrayField:
    dims: tuple[str, ...]   # T, S, P, R, Hr, C, 2, Ks, or a sampling row width's name
    dtype: type
    pad: Any                # a value, or SLOT_PATTERN


# Every array of StepArrays but the sampling rows (those are sampling_rows.ROW_FIELDS).
ARRAY_FIELDS: dict[str, ArrayField] = {
    "token_ids": ArrayField(("T",), np.int32, 0),
    "positions": ArrayField(("T",), np.int32, 0),
    "slot_mapping": ArrayField(("T",), np.int32, SLOT_PATTERN),
    "token_rows": ArrayField(("T",), np.int32, -1),
    "feedback_rows": ArrayField(("T",), np.int32, -1),
    "prompt_next_ids": ArrayField(("T",), np.int32, -1),
    "rotary": ArrayField(("R", "T", "Hr"), np.float32, 0.0),
    "block_tables": ArrayField(("S", "P"), np.int32, 0),
    "context_lens": ArrayField(("S",), np.int32, 0),
    "logits_indices": ArrayField(("S",), np.int32, 0),
    "block_copies": ArrayField(("C", "2"), np.int32, 0),
    "draft_token_ids": ArrayField(("S", "Ks"), np.int32, -1),
    "lora_slots": ArrayField(("T",), np.int32, -1),
    **{name: ArrayField(("S",) if f.width is None else ("S", name), f.dtype, f.pad)
       for name, f in ROW_FIELDS.items()},
}


def assemble(arrays: dict[str, Any]) -> StepArrays:
    """The StepArrays pytree of arrays named as in ``ARRAY_FIELDS``."""
    attention = AttentionMetadata(
        positions=arrays["positions"], slot_mapping=arrays["slot_mapping"],
        token_rows=arrays["token_rows"], block_tables=arrays["block_tables"],
        context_lens=arrays["context_lens"])
    inputs = StepInputs(token_ids=arrays["token_ids"], attention=attention,
                        logits_indices=arrays["logits_indices"], rotary=arrays["rotary"])
    sampling = SamplingTensors(**{name: arrays[name] for name in ROW_FIELDS})
    return StepArrays(inputs=inputs, sampling=sampling, feedback_rows=arrays["feedback_rows"],
                      prompt_next_ids=arrays["prompt_next_ids"], block_copies=arrays["block_copies"],
                      draft_token_ids=arrays["draft_token_ids"], lora_slots=arrays["lora_slots"])


@dataclasses.dataclass(frozen=True)
class StepLayout:
    """The engine's fixed widths, which with a step key give every array's shape.

    Args:
        block_size: tokens per KV block (the padding slots).
        rotary_shape: (R, Hr) of the model's rotary tables.
        max_block_copies: C, the most copy-on-write block copies one step makes.
        num_strategy_args: A, the widest registered strategy's argument count (at least 1).
        limits: the widths of the sparse sampling rows.
        mask_words: W of the structured-outputs bitmask in steps with a constrained row,
            ceil(V / 32) (0 in the others).
    """

    block_size: int
    rotary_shape: tuple[int, int]
    max_block_copies: int
    num_strategy_args: int = 1
    limits: SamplingLimits = SamplingLimits()
    mask_words: int = 0
    num_speculative_tokens: int = 0

    @functools.lru_cache(maxsize=None)
    def shapes(self, key: StepKey) -> dict[str, tuple[int, ...]]:
        """Each array's shape in a step of ``key``."""
        sizes = {"T": key.num_tokens, "S": key.num_rows, "P": key.num_blocks,
                 "R": self.rotary_shape[0], "Hr": self.rotary_shape[1],
                 "C": self.max_block_copies, "2": 2, "Ks": self.num_speculative_tokens,
                 **row_widths(self.limits, self.num_strategy_args,
                              self.mask_words if key.structured else 0)}
        return {name: tuple(sizes[d] for d in f.dims) for name, f in ARRAY_FIELDS.items()}

    def reset(self, arrays: dict[str, np.ndarray]) -> None:
        """Fills arrays named as in ``ARRAY_FIELDS`` with their padding, in place."""
        for name, field in ARRAY_FIELDS.items():
            if field.pad is SLOT_PATTERN:
                arrays[name][...] = np.arange(arrays[name].shape[0]) % self.block_size
            else:
                arrays[name][...] = field.pad

    def padding(self, key: StepKey) -> StepArrays:
        """New host arrays of a step of padding only."""
        arrays = {name: np.empty(shape, ARRAY_FIELDS[name].dtype)
                  for name, shape in self.shapes(key).items()}
        self.reset(arrays)
        return assemble(arrays)

    @functools.lru_cache(maxsize=None)
    def packed(self, key: StepKey) -> PackedLayout:
        """Where each array of a step of ``key`` lives in the packed buffers."""
        return layout_of(self.padding(key))


class HostBuffers:
    """Preallocated host arrays for the largest step key, handed out as views per step."""

    def __init__(self, layout: StepLayout, largest: StepKey) -> None:
        self.layout = layout
        self._arrays = {name: np.empty(shape, ARRAY_FIELDS[name].dtype)
                        for name, shape in layout.shapes(largest).items()}

    def views(self, key: StepKey) -> dict[str, np.ndarray]:
        """Views shaped for ``key``, filled with padding: valid until the next call."""
        views = {name: self._arrays[name][tuple(slice(0, n) for n in shape)]
                 for name, shape in self.layout.shapes(key).items()}
        self.layout.reset(views)
        return views
