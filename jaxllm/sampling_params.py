"""SamplingParams: how one request samples and when it stops (vLLM's names and defaults)."""

from __future__ import annotations

import copy
import dataclasses
import enum
import math
import numbers
from collections.abc import Callable
from typing import Any

from jaxllm.structured_outputs import StructuredOutputsParams

LOGIT_BIAS_LIMIT = 100.0  # logit_bias values are clamped to [-100, 100], as vLLM does


class RequestOutputKind(enum.Enum):
    """What each streamed RequestOutput carries (vLLM's semantics)."""

    CUMULATIVE = 0  # everything generated so far (the default)
    DELTA = 1       # only the tokens and text new since the previous output
    FINAL_ONLY = 2  # a single output when the request finishes


def is_int(value: Any) -> bool:
    """An integer, numpy's included; not a bool (an int to Python, never meant as a number)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    """A finite number (ints included, bools and NaN/inf excluded)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# field: (is it an int (else a finite real), the allowed range, its description in errors).
_NUMBERS: dict[str, tuple[bool, Callable[[Any], bool], str]] = {
    "n": (True, lambda v: v >= 1, ">= 1"),
    "temperature": (False, lambda v: v >= 0, ">= 0"),
    "top_p": (False, lambda v: 0 < v <= 1, "in (0, 1]"),
    "top_k": (True, lambda v: v >= -1, ">= 1, or 0 / -1 to disable"),
    "min_p": (False, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "repetition_penalty": (False, lambda v: v > 0, "> 0"),
    "presence_penalty": (False, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "frequency_penalty": (False, lambda v: -2 <= v <= 2, "in [-2, 2]"),
    "max_tokens": (True, lambda v: v >= 1, ">= 1"),
    "min_tokens": (True, lambda v: v >= 0, ">= 0"),
    "beam_width": (True, lambda v: v >= 1, ">= 1"),
    "length_penalty": (False, lambda v: True, "a finite number"),
}
_OPTIONAL_INTS = {"seed": (lambda v: 0 <= v < 2**63, "in [0, 2**63)"),
                  "logprobs": (lambda v: v >= 0, ">= 0"),
                  "prompt_logprobs": (lambda v: v >= 0, ">= 0")}


def _token_ids(name: str, value: Any, allow_empty: bool) -> list[int]:
    ids = list(value) if isinstance(value, (list, tuple)) else None
    if ids is None or not all(is_int(t) and t >= 0 for t in ids) or (not ids and not allow_empty):
        empty = "" if allow_empty else "a non-empty "
        raise ValueError(f"{name} must be {empty}list of non-negative integer token ids, got {value!r}")
    return [int(t) for t in ids]


@dataclasses.dataclass
class SamplingParams:
    """Per-request sampling settings, validated on construction (each error names its field).

    Token ids are checked against the vocabulary by the engine when the request is submitted.

    Attributes:
        n: completions per prompt, >= 1.
        temperature: 0 means greedy; otherwise logits are divided by it before sampling.
        top_p: keep the smallest set of tokens whose probability reaches top_p; 1 disables.
        top_k: keep the k most likely tokens; 0 or -1 disables (-1 is stored as 0).
        min_p: drop tokens less likely than min_p times the most likely one; 0 disables.
        repetition_penalty: > 0; divides positive (multiplies negative) logits of tokens in the
            prompt or output so far; 1 disables.
        presence_penalty: in [-2, 2]; subtracted once from the logit of every token already
            generated; 0 disables.
        frequency_penalty: in [-2, 2]; subtracted from a token's logit once per time it was
            generated; 0 disables.
        seed: per-request seed; the same seed gives the same tokens alone or in any batch.
        stop: strings that end generation when the output text contains one (a str or a list,
            stored as a list; empty strings are refused). Matching spans token boundaries.
        stop_token_ids: extra token ids that end generation (the token is kept in token_ids).
        include_stop_str_in_output: keep the matched stop string at the end of the text.
        ignore_eos: keep generating past the model's EOS token(s).
        max_tokens: most tokens to generate, >= 1.
        min_tokens: EOS, stop_token_ids and stop strings do not end generation before this
            many tokens; 0 <= min_tokens <= max_tokens.
        logprobs: return the log-probabilities of this many most likely alternatives per
            generated token (the sampled token's is always included); None for none.
        prompt_logprobs: as logprobs, for every prompt token; None for none.
        skip_special_tokens: drop special tokens from the output text.
        logit_bias: {token id: bias} added to the logits before sampling; biases must be finite
            and are clamped to [-100, 100] as in vLLM.
        allowed_token_ids: if given (non-empty), only these tokens can be sampled.
        use_beam_search: beam search instead of sampling. It is deterministic, so it requires
            temperature 0 and no top_p / top_k / min_p truncation (as vLLM's beam search did),
            and it returns the n <= beam_width best beams.
        beam_width: beams kept per step; > 1 only with use_beam_search.
        length_penalty: beam scores are cumulative logprob / length ** length_penalty (beam
            search only).
        early_stopping: beam search stopping rule, as in transformers: True stops when
            beam_width beams have finished; False stops when no running beam can beat them
            (under the length penalty); "never" runs until no beam can improve at all.
        strategy: the name of a registered sampling strategy to use instead of the built-in
            one (the registry checks the name); None for the built-in sampler.
        strategy_args: keyword arguments for that strategy (string keys); needs strategy.
        logits_processors: Python callables, each called on the host as
            ``fn(output_token_ids: list[int], logits: np.ndarray) -> np.ndarray`` and applied
            in order before sampling; slow (one host round trip per step), an escape hatch.
        output_kind: for streaming calls, whether each output is cumulative or a delta.
        structured_outputs: constrain the output to a JSON schema, regex, choice or grammar
            (``StructuredOutputsParams``; needs the model's tokenizer and ``jaxllm[grammar]``).
            Not with beam search.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    use_beam_search: bool = False
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    strategy: str | None = None
    strategy_args: dict[str, Any] | None = None
    logits_processors: list[Callable[[list[int], Any], Any]] | None = None
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens",
                     "use_beam_search"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        self._check_numbers()
        self._check_stopping()
        self._check_token_controls()
        self._check_beam_search()
        self._check_strategy()
        if not isinstance(self.output_kind, RequestOutputKind):
            raise ValueError(f"output_kind must be a RequestOutputKind, got {self.output_kind!r}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams, got "
                                 f"{type(self.structured_outputs).__name__}")
            if self.use_beam_search:
                raise ValueError("structured_outputs is not supported with beam search")

    def _check_numbers(self) -> None:
        for name, (integer, in_range, allowed) in _NUMBERS.items():
            value = getattr(self, name)
            if not (is_int(value) if integer else _is_real(value)) or not in_range(value):
                kind = "an integer" if integer else "a finite number"
                raise ValueError(f"{name} must be {kind} {allowed}, got {value!r}")
            setattr(self, name, int(value) if integer else float(value))
        for name, (in_range, allowed) in _OPTIONAL_INTS.items():
            value = getattr(self, name)
            if value is not None and (not is_int(value) or not in_range(value)):
                raise ValueError(f"{name} must be None or an integer {allowed}, got {value!r}")
            setattr(self, name, None if value is None else int(value))
        if self.top_k == -1:
            self.top_k = 0

    def _check_stopping(self) -> None:
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        if stop is None:
            stop = []
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {self.stop!r}")
        self.stop = list(stop)
        self.stop_token_ids = _token_ids("stop_token_ids", self.stop_token_ids or [], allow_empty=True)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens must be <= max_tokens ({self.max_tokens}), "
                             f"got {self.min_tokens}")

    def _check_token_controls(self) -> None:
        if self.logit_bias is not None:
            bias = self.logit_bias
            if not isinstance(bias, dict) or not all(is_int(t) and t >= 0 and _is_real(b)
                                                     for t, b in bias.items()):
                raise ValueError("logit_bias must map non-negative integer token ids to finite "
                                 f"numbers, got {bias!r}")
            limit = LOGIT_BIAS_LIMIT
            self.logit_bias = {int(t): min(limit, max(-limit, float(b))) for t, b in bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = _token_ids("allowed_token_ids", self.allowed_token_ids,
                                                allow_empty=False)

    def _check_beam_search(self) -> None:
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise ValueError(f"early_stopping must be True, False or 'never', got {self.early_stopping!r}")
        if not self.use_beam_search:
            for name, neutral in (("beam_width", 1), ("length_penalty", 1.0), ("early_stopping", False)):
                if getattr(self, name) != neutral:
                    raise ValueError(f"{name} is only used by beam search: set use_beam_search=True "
                                     f"or leave {name}={neutral!r}")
            return
        if self.n > self.beam_width:
            raise ValueError(f"n must be <= beam_width ({self.beam_width}) with beam search, got {self.n}")
        for name, neutral in (("temperature", 0.0), ("top_p", 1.0), ("top_k", 0), ("min_p", 0.0)):
            if getattr(self, name) != neutral:
                raise ValueError(f"{name} must be {neutral} with beam search (it is deterministic), "
                                 f"got {getattr(self, name)!r}")
        if self.strategy is not None:
            raise ValueError(f"strategy must be None with beam search, got {self.strategy!r}")

    def _check_strategy(self) -> None:
        if self.strategy is not None and (not isinstance(self.strategy, str) or not self.strategy):
            raise ValueError(f"strategy must be None or a strategy's name, got {self.strategy!r}")
        args = self.strategy_args
        if args is not None:
            if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
                raise ValueError(f"strategy_args must be a dict with string keys, got {args!r}")
            if self.strategy is None:
                raise ValueError("strategy_args needs a strategy: name one with strategy=...")
        processors = self.logits_processors
        if processors is not None:
            if not isinstance(processors, (list, tuple)) or not all(callable(f) for f in processors):
                raise ValueError(f"logits_processors must be a list of callables, got {processors!r}")
            self.logits_processors = list(processors)

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_read_only", False):
            raise AttributeError(f"cannot set {name}: this SamplingParams belongs to a submitted "
                                 "request; build a new one (or dataclasses.replace it)")
        super().__setattr__(name, value)

    def read_only_copy(self) -> SamplingParams:
        """What a request keeps: a copy validated again (so a field changed after construction
        is checked too), sharing no container with this object, and read-only. Python logits
        processors are the same callables."""
        values = {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                  if f.name != "logits_processors"}
        clone = SamplingParams(**values, logits_processors=self.logits_processors)
        object.__setattr__(clone, "_read_only", True)
        return clone

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_penalties(self) -> bool:
        """Whether any of the repetition, presence or frequency penalties is active."""
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)
