"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import dataclasses
import enum
import math


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput carries (vLLM's semantics)."""

    CUMULATIVE = 0  # everything generated so far (the default)
    DELTA = 1       # only the tokens and text new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings, validated on construction.

    Attributes:
        n: completions per prompt (only 1 today).
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_k: keep the k most likely tokens; 0 or -1 disables.
        top_p: keep the smallest set of tokens whose probability reaches top_p; 1 disables.
        seed: per-request seed; the same seed gives the same tokens alone or in any batch.
        max_tokens: most tokens to generate.
        ignore_eos: keep generating past the model's EOS token(s).
        stop_token_ids: extra token ids that end generation (the token is kept in the output).
        skip_special_tokens: drop special tokens from the output text.
        output_kind: for streaming calls, whether each output is cumulative or a delta.
    """

    n: int = 1
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE

    def __post_init__(self) -> None:
        if self.n != 1:
            raise ValueError(f"n must be 1 (several completions per prompt are not supported yet), got {self.n}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= 1, or 0 / -1 to disable, got {self.top_k!r}")
        if self.top_k == -1:
            self.top_k = 0
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise ValueError(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        stop_ids = list(self.stop_token_ids or [])
        if any(not isinstance(t, int) or t < 0 for t in stop_ids):
            raise ValueError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = stop_ids
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0
