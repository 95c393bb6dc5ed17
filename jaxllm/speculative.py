"""Speculative decoding on the host (no jax): the config, the n-gram proposer, per-row policy.

``Engine(model, speculative_config={"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_max": 4, "prompt_lookup_min": 2})`` (vLLM's keys), or a draft model:
``{"model": path_or_id, "num_speculative_tokens": k}`` or ``{"method": "layer_skip",
"num_layers": n, "num_speculative_tokens": k}`` (the target's first n layers and its head;
both in ``jaxllm.draft_proposer``). Each step the scheduler asks the proposer for up to k
tokens for every decode row that may speculate (a draft model fills them in for all its rows
at once, ``Proposer.complete``); a row with d > 0
proposals computes its last token and the d proposals (one ragged row of d + 1 tokens), the
compiled step verifies them (``jaxllm.rejection_sampler``), and the row emits 1 .. d + 1
tokens. The scheduler rolls back the positions of rejected proposals.

When speculation pays (``when_to_speculate``):
  - per row: a row whose proposals keep failing (``SpecState``: fewer than
    ``MIN_ACCEPTED_PER_STEP`` accepted tokens per step over a window of ``WINDOW`` steps) backs
    off for 2x, 4x, ... ``WINDOW`` steps, then tries again. While a row speculates its steps
    cannot overlap host work (the proposer needs its last token), so backing off also brings
    back async scheduling.
  - per batch: only while at most ``disable_by_batch_size`` sequences run (vLLM's key; default
    4). A decode step of many rows is compute-bound on CPU (64 rows of SmolLM2: ~13 GFLOP), so
    k extra tokens per row cost ~k times the step while a single row's step is bound by reading
    the weights, where k + 1 tokens cost about one.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.sequence import Sequence

if TYPE_CHECKING:   # the scheduler imports this module
    from jaxllm.scheduler import ScheduledSequence

WINDOW = 16                 # steps per acceptance window
MIN_ACCEPTED_PER_STEP = 0.3  # below this many accepted tokens per step, a row backs off
MAX_SPECULATIVE_TOKENS = 16
DEFAULT_DISABLE_BY_BATCH_SIZE = 4
METHODS = ("ngram", "draft_model", "layer_skip")


@dataclasses.dataclass(frozen=True)
class SpeculativeConfig:
    """Validated ``speculative_config`` (vLLM's keys).

    Attributes:
        method: "ngram" (prompt lookup in the request's own tokens), "draft_model" (a smaller
            model with the target's tokenizer; the default when ``model`` is given) or
            "layer_skip" (the target's first ``num_layers`` layers, its final norm and head).
        num_speculative_tokens: k, the most tokens proposed per row and step.
        prompt_lookup_max, prompt_lookup_min: the longest and shortest suffix n-gram looked up.
        disable_by_batch_size: speculate only in steps where at most this many sequences run.
        model: the draft model (a local HF directory, a .gguf file or a hub id).
        num_layers: the layers a layer-skip draft keeps.
    """

    method: str
    num_speculative_tokens: int
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    disable_by_batch_size: int = DEFAULT_DISABLE_BY_BATCH_SIZE
    model: str | None = None
    num_layers: int | None = None

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> SpeculativeConfig:
        """Raises ValueError naming the first bad or unknown key."""
        if not isinstance(config, dict):
            raise ValueError(f"speculative_config must be a dict, got {type(config).__name__}")
        if "model" in config:
            config = {"method": "draft_model", **config}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"speculative_config: unknown key(s) {unknown} (known: {sorted(known)})")
        method = config.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config['method'] must be one of {METHODS}, got {method!r}")
        if "num_speculative_tokens" not in config:
            raise ValueError("speculative_config needs 'num_speculative_tokens'")
        needs = {"draft_model": "model", "layer_skip": "num_layers"}
        for other, key in needs.items():
            if (method == other) != (key in config):
                raise ValueError(f"speculative_config[{key!r}] goes with (and only with) method "
                                 f"{other!r}; got method {method!r}")
        return cls(**config)

    def __post_init__(self) -> None:
        for name in ("num_speculative_tokens", "prompt_lookup_max", "prompt_lookup_min",
                     "disable_by_batch_size", "num_layers"):
            value = getattr(self, name)
            if value is None and name == "num_layers":
                continue
            if type(value) is not int or value < 1:
                raise ValueError(f"speculative_config[{name!r}] must be a positive integer, got {value!r}")
        if self.num_speculative_tokens > MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config['num_speculative_tokens'] must be at most "
                             f"{MAX_SPECULATIVE_TOKENS}, got {self.num_speculative_tokens}")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) "
                             f"exceeds prompt_lookup_max ({self.prompt_lookup_max})")


def ngram_proposal(token_ids: np.ndarray, min_n: int, max_n: int, k: int) -> np.ndarray:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix
    n-gram (``max_n`` down to ``min_n`` tokens) of ``token_ids`` [L]; empty if none occurs."""
    num = len(token_ids)
    for n in range(min(max_n, num - 1), min_n - 1, -1):
        suffix = token_ids[num - n:]
        # Candidate starts i < num - n (an occurrence other than the suffix itself).
        windows = np.lib.stride_tricks.sliding_window_view(token_ids[:num - 1], n)
        hits = np.flatnonzero((windows == suffix).all(axis=1))
        if len(hits):
            start = hits[-1] + n
            return token_ids[start:start + k]
    return token_ids[:0]


@dataclasses.dataclass(slots=True)
class SpecState:
    """One sequence's speculation record: counters and its back-off."""

    num_drafts: int = 0           # steps with proposals
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    window_steps: int = 0
    window_accepted: int = 0
    backoff_steps: int = 0        # steps left without speculating
    num_backoffs: int = 0
    in_flight: bool = False       # a row with proposals is in a dispatched step

    def record(self, num_drafted: int, num_accepted: int) -> None:
        """A speculating step came back: ``num_drafted`` proposals, ``num_accepted`` taken."""
        if num_drafted:
            self.num_drafts += 1
            self.num_draft_tokens += num_drafted
            self.num_accepted_tokens += num_accepted
        self.window_steps += 1
        self.window_accepted += num_accepted
        if self.window_steps >= WINDOW:
            if self.window_accepted < MIN_ACCEPTED_PER_STEP * self.window_steps:
                self.num_backoffs += 1
                self.backoff_steps = WINDOW * 2 ** self.num_backoffs
            self.window_steps = self.window_accepted = 0


class Proposer:
    """What the scheduler asks of a proposer: which rows speculate, and their proposals."""

    def __init__(self, config: SpeculativeConfig, max_model_len: int) -> None:
        self.config = config
        self.max_model_len = max_model_len
        self.num_rows_proposed = 0

    def may_speculate(self, seq: Sequence) -> bool:
        """Whether ``seq`` speculates this step: a single completion without beam search,
        Python logits processors, structured outputs or logprobs (those read one position per
        step), and not backing off. Counts a back-off step when it is."""
        params = seq.request.sampling_params
        if (seq.group is not None or seq.request.grammar is not None or params.logits_processors
                or params.logprobs is not None):
            return False
        state = seq.spec
        if state is None:
            state = seq.spec = SpecState()
        if state.backoff_steps:
            return False
        return True

    def tick_backoff(self, seq: Sequence) -> None:
        """A scheduled step of ``seq`` that did not speculate because it backs off."""
        if seq.spec is not None and seq.spec.backoff_steps:
            seq.spec.backoff_steps -= 1

    def room(self, seq: Sequence) -> int:
        """How many tokens ``seq`` may propose (all its tokens on the host): at most k, never
        past max_tokens or max_model_len, as a row of d proposals emits up to d + 1 tokens."""
        params = seq.request.sampling_params
        room = min(params.max_tokens - seq.num_output_tokens, self.max_model_len - seq.num_tokens) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    def propose(self, seq: Sequence) -> list[int]:
        """Up to ``room(seq)`` proposals for ``seq`` (their count, as for a draft model, may
        be all that is known before ``complete``)."""
        raise NotImplementedError

    def complete(self, scheduled: list[ScheduledSequence]) -> list[ScheduledSequence]:
        """The step's rows with their final proposals: as proposed, unless a proposer fills
        them in for all rows at once."""
        return scheduled


class NgramProposer(Proposer):
    """Proposes tokens for decode rows from their own prompt and output (prompt lookup)."""

    def propose(self, seq: Sequence) -> list[int]:
        k = self.room(seq)
        if k <= 0:
            return []
        tokens = np.asarray(seq.token_ids, np.int64)
        return ngram_proposal(tokens, self.config.prompt_lookup_min,
                              self.config.prompt_lookup_max, k).tolist()


def speculative_stats(stats: Any) -> dict[str, Any]:
    """The executor's speculation counters as ``Engine.stats()`` entries (vLLM's names)."""
    proposed = stats.num_draft_tokens
    return {
        "spec_decode_num_drafts": stats.num_drafts,
        "spec_decode_num_draft_tokens": proposed,
        "spec_decode_num_accepted_tokens": stats.num_accepted_tokens,
        "spec_decode_num_accepted_tokens_per_pos": list(stats.num_accepted_tokens_per_pos),
        "spec_decode_acceptance_rate": stats.num_accepted_tokens / proposed if proposed else 0.0,
    }
