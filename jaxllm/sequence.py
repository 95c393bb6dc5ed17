"""Request (immutable input) and Sequence (host-side progress of one generation)."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING, Any

from jaxllm.outputs import PositionLogprobs, RequestMetrics
from jaxllm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from jaxllm.groups import SequenceGroup


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated, tokenized request as it enters the engine."""

    request_id: str
    prompt: str | None
    prompt_token_ids: tuple[int, ...]
    sampling_params: SamplingParams
    seed: int  # sampling_params.seed, or one drawn by the engine so sampling is reproducible
    eos_token_ids: frozenset[int]
    arrival_time: float
    cache_salt: str | None = None  # joins the prefix-cache key: equal salts share cached blocks
    priority: int = 0  # lower is served first; equal priorities are first come, first served
    # structured outputs: the constraint's matcher at its start (``jaxllm.grammar``), which
    # each sequence copies; never advanced itself
    grammar: Any = None
    lora_request: Any = None  # the LoRARequest it runs under (``jaxllm.lora``); None: the base

    @property
    def prefix_cache_key(self) -> Any:
        """What joins the token ids in the prefix-cache key: the salt, and the adapter (the
        same prompt under two adapters has different K/V)."""
        if self.lora_request is None:
            return self.cache_salt
        return (self.cache_salt, self.lora_request.lora_int_id)


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclasses.dataclass(slots=True, eq=False)
class Sequence:
    """One generation's progress. ``num_computed_tokens`` of its tokens have K/V in the cache.

    Its tokens are ``token_ids`` followed by ``num_pending_tokens`` more that dispatched steps
    are sampling and the host has not seen yet. The executor schedules the next step before the
    last one's tokens come back, so a step can compute a pending token: the device takes its
    id straight from the previous step's outputs.

    Writers: the Scheduler (and the KVCacheManager it calls) writes the progress: ``status``,
    ``finish_reason``, ``num_computed_tokens``, ``num_pending_tokens`` and the blocks. The
    Postprocessor writes the outputs (tokens, logprobs, ``stop_reason``, the group's state) and
    decides every finish.
    """

    request: Request
    token_ids: list[int]
    metrics: RequestMetrics
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0
    block_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    # Filled only when the request asks (SamplingParams.logprobs / prompt_logprobs).
    output_top_logprobs: list[PositionLogprobs] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[PositionLogprobs | None] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # stop token id or stop string; None for EOS
    num_preemptions: int = 0
    # Prefix caching (owned by the KVCacheManager): the chained hashes of the full blocks of
    # token_ids, and how many leading block_ids have already been offered to the cache.
    block_hashes: list[bytes] = dataclasses.field(default_factory=list)
    num_registered_blocks: int = 0
    # n > 1 and beam search: the completion index and the group of the request's sequences.
    index: int = 0
    group: SequenceGroup | None = None
    # structured outputs: this sequence's copy of the request's matcher, made on first use
    # (``grammar.sequence_matcher``) and fed every token it samples
    matcher: Any = None
    # speculative decoding: its record and back-off (``jaxllm.speculative.SpecState``), made
    # the first time it may speculate
    spec: Any = None

    @classmethod
    def from_request(cls, request: Request) -> "Sequence":
        metrics = RequestMetrics(arrival_time=request.arrival_time,
                                 num_prompt_tokens=len(request.prompt_token_ids))
        return cls(request=request, token_ids=list(request.prompt_token_ids), metrics=metrics)

    def fork(self, index: int, token_ids: list[int], request: Request | None = None) -> Sequence:
        """A sibling in the same group (its KV blocks are shared by the KVCacheManager)."""
        metrics = RequestMetrics(arrival_time=self.metrics.arrival_time,
                                 first_scheduled_time=self.metrics.first_scheduled_time,
                                 num_prompt_tokens=self.num_prompt_tokens,
                                 num_cached_tokens=self.metrics.num_cached_tokens)
        return Sequence(request=request or self.request, token_ids=token_ids, metrics=metrics,
                        status=SequenceStatus.RUNNING, index=index, group=self.group,
                        output_logprobs=list(self.output_logprobs),
                        output_top_logprobs=list(self.output_top_logprobs),
                        prompt_logprobs=self.prompt_logprobs)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Asked for prompt logprobs that are not all collected yet (so no prefix-cache hits)."""
        return (self.request.sampling_params.prompt_logprobs is not None
                and len(self.prompt_logprobs) < self.num_prompt_tokens - 1)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens the next step may compute, the pending one included, except while that one
        must reach the host first (see ``needs_host_tokens``) or ends the sequence anyway."""
        if self.num_pending_tokens and (
                self.needs_host_tokens or self.num_output_tokens + self.num_pending_tokens
                >= self.request.sampling_params.max_tokens):
            return 0
        return self.num_tokens + self.num_pending_tokens - self.num_computed_tokens

    @property
    def needs_host_tokens(self) -> bool:
        """Whether the next step needs the host to know every token so far: beam search picks
        tokens on the host; Python logits processors read the token history; a structured
        output's mask follows from every token. (Penalties count the tokens on the device.)"""
        return ((self.group is not None and self.group.beam is not None)
                or bool(self.request.sampling_params.logits_processors)
                or self.request.grammar is not None)

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
