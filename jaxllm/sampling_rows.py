"""The sampling-row schema: every per-row sampling setting the step takes, declared once.

Each field is one column of ``SamplingTensors``: [S] per row, or [S, W] for the sparse token
lists, whose width W is an engine limit (``SamplingLimits``), so that no request changes a
shape. A padding row holds every field's ``pad``, which makes it a neutral, greedy row that
samples nothing anyone keeps. ``source`` says where a row's value comes from; fields with a
``param`` are that ``SamplingParams`` attribute, copied verbatim.

Per-request values that cannot exceed a fixed width are refused at submission
(``check_sampling_limits``), never truncated.

The structured-outputs bitmask is the one field whose width depends on the step key: W =
ceil(V / 32) words in steps with a constrained row (``StepKey.structured``), 0 in the others,
so a plain step ships no mask at all.

Shape legend: S rows, A strategy arguments, W a limit's width.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxllm.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class SamplingLimits:
    """Widths of the sparse per-row token lists: fixed, so every step keeps its shape.

    Attributes:
        max_logit_bias: most ``logit_bias`` entries of one request.
        max_allowed_token_ids: most ``allowed_token_ids`` of one request.
        max_min_tokens_stop_ids: most tokens ``min_tokens`` bans (``stop_token_ids`` plus the
            model's EOS ids unless ``ignore_eos``) for a request with ``min_tokens > 0``.
    """

    max_logit_bias: int = 128
    max_allowed_token_ids: int = 256
    max_min_tokens_stop_ids: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 1:
                raise ValueError(f"SamplingLimits.{field.name} must be at least 1, "
                                 f"got {getattr(self, field.name)}")


@dataclasses.dataclass(frozen=True)
class RowField:
    """One column of ``SamplingTensors``.

    Attributes:
        dtype: its numpy dtype.
        pad: the value of a padding row (and of unused entries of a sparse row).
        source: where a row's value comes from.
        param: the ``SamplingParams`` attribute copied verbatim into an [S] column, if it is
            a plain copy.
        width: None for an [S] column; else the ``SamplingLimits`` attribute giving W of an
            [S, W] column, "strategy_args" for the engine's widest strategy (A), or
            "mask_words" for the structured-outputs bitmask.
    """

    dtype: type
    pad: Any
    source: str
    param: str | None = None
    width: str | None = None


def _param(dtype: type, pad: Any, name: str) -> RowField:
    return RowField(dtype, pad, f"SamplingParams.{name}", param=name)


ROW_FIELDS: dict[str, RowField] = {
    "temperature": _param(np.float32, 0.0, "temperature"),                 # 0 = greedy
    "top_k": _param(np.int32, 0, "top_k"),                                 # 0 = disabled
    "top_p": _param(np.float32, 1.0, "top_p"),                             # 1 = disabled
    "min_p": _param(np.float32, 0.0, "min_p"),                             # 0 = disabled
    "repetition_penalty": _param(np.float32, 1.0, "repetition_penalty"),   # 1 = disabled
    "frequency_penalty": _param(np.float32, 0.0, "frequency_penalty"),     # 0 = disabled
    "presence_penalty": _param(np.float32, 0.0, "presence_penalty"),       # 0 = disabled
    "min_tokens": _param(np.int32, 0, "min_tokens"),
    "seeds": RowField(np.uint32, 0, "the request's seed, folded to 32 bits"),
    "output_index": RowField(np.int32, 0, "index in the output of the token being sampled"),
    "num_logprobs": RowField(np.int32, -1, "SamplingParams.logprobs, or a beam's candidates; -1 = none"),
    "strategy_ids": RowField(np.int32, 0, "SamplingParams.strategy's 1-based index; 0 = none"),
    "strategy_args": RowField(np.float32, 0.0, "SamplingParams.strategy_args, in the strategy's order",
                              width="strategy_args"),
    "penalty_slots": RowField(np.int32, -1, "the row's token-count slot if it has penalties; -1 = none"),
    "samples": RowField(np.bool_, False, "the row computes its sequence's last token"),
    "use_processors": RowField(np.bool_, False, "SamplingParams.logits_processors given"),
    "beam": RowField(np.bool_, False, "a beam of beam search (min_tokens masks its candidates)"),
    "bias_ids": RowField(np.int32, -1, "SamplingParams.logit_bias keys", width="max_logit_bias"),
    "bias_values": RowField(np.float32, 0.0, "SamplingParams.logit_bias values", width="max_logit_bias"),
    "allowed_ids": RowField(np.int32, -1, "SamplingParams.allowed_token_ids",
                            width="max_allowed_token_ids"),
    "min_tokens_stop_ids": RowField(np.int32, -1, "SamplingParams.stop_token_ids + EOS ids (unless "
                                    "ignore_eos), banned while output_index < min_tokens",
                                    width="max_min_tokens_stop_ids"),
    "grammar_mask": RowField(np.int32, -1, "the structured-outputs bitmask of the row's next token "
                             "(bit t % 32 of word t // 32 allows token t; -1 words allow all)",
                             width="mask_words"),
}
COPIED_FIELDS = tuple((name, f.param) for name, f in ROW_FIELDS.items() if f.param is not None)


def row_widths(limits: SamplingLimits, num_strategy_args: int, mask_words: int) -> dict[str, int]:
    """The W (or A) of every [S, W] field."""
    special = {"strategy_args": num_strategy_args, "mask_words": mask_words}
    return {name: special[f.width] if f.width in special else getattr(limits, f.width)
            for name, f in ROW_FIELDS.items() if f.width is not None}


def seed32(seed: int) -> int:
    """A 64-bit request seed folded to the 32 bits the device's keys take."""
    return (seed ^ (seed >> 32)) & 0xFFFFFFFF


def min_tokens_stop_ids(params: SamplingParams, eos_token_ids: frozenset[int]) -> list[int]:
    """The tokens ``min_tokens`` bans until reached; none when ``min_tokens`` is 0."""
    if not params.min_tokens:
        return []
    return list(params.stop_token_ids) + ([] if params.ignore_eos else sorted(eos_token_ids))


def check_sampling_limits(params: SamplingParams, limits: SamplingLimits,
                          eos_token_ids: frozenset[int]) -> None:
    """Refuses a request whose token lists exceed the engine's fixed widths.

    Raises:
        ValueError: naming the field, its size and the limit to raise.
    """
    sizes = (("logit_bias", len(params.logit_bias or {}), "max_logit_bias"),
             ("allowed_token_ids", len(params.allowed_token_ids or ()), "max_allowed_token_ids"),
             ("min_tokens' stop_token_ids + EOS ids", len(min_tokens_stop_ids(params, eos_token_ids)),
              "max_min_tokens_stop_ids"))
    for name, size, limit in sizes:
        if size > getattr(limits, limit):
            raise ValueError(f"{name} has {size} entries, over the engine's {limit} "
                             f"({getattr(limits, limit)}); raise it in the engine's SamplingLimits")


def fill_row(rows: dict[str, np.ndarray], r: int, params: SamplingParams, *, seed: int,
             eos_token_ids: frozenset[int], output_index: int, num_logprobs: int | None,
             samples: bool, beam: bool, penalty_slot: int,
             strategy: tuple[int, list[float]] | None) -> None:
    """Writes row ``r`` of host arrays holding pads (``rows``: name -> [S] or [S, W]).

    Args:
        strategy: (1-based index, argument values) of the row's registered strategy.
    """
    for name, attribute in COPIED_FIELDS:
        rows[name][r] = getattr(params, attribute)
    rows["seeds"][r] = seed32(seed)
    rows["output_index"][r] = output_index
    rows["num_logprobs"][r] = -1 if num_logprobs is None else num_logprobs
    rows["penalty_slots"][r] = penalty_slot
    rows["samples"][r] = samples
    rows["use_processors"][r] = bool(params.logits_processors)
    rows["beam"][r] = beam
    if strategy is not None:
        rows["strategy_ids"][r] = strategy[0]
        rows["strategy_args"][r, :len(strategy[1])] = strategy[1]
    if params.logit_bias:
        rows["bias_ids"][r, :len(params.logit_bias)] = list(params.logit_bias)
        rows["bias_values"][r, :len(params.logit_bias)] = list(params.logit_bias.values())
    if params.allowed_token_ids is not None:
        rows["allowed_ids"][r, :len(params.allowed_token_ids)] = params.allowed_token_ids
    stop_ids = min_tokens_stop_ids(params, eos_token_ids)
    if stop_ids:
        rows["min_tokens_stop_ids"][r, :len(stop_ids)] = stop_ids
