"""Prompts and SamplingParams in, validated ``Request``s out: everything checked before submission.

The engine's facade hands each call here: prompts are normalised and tokenized (or applied to
the chat template), every limit that depends on the model or the engine (vocabulary, context
length, KV pool, logprob width, group sizes, registered strategies, beam search's constraints)
is checked, and the request gets its own read-only copy of its SamplingParams and a seed.
Nothing here imports jax.
"""

from __future__ import annotations

import itertools
import numbers
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxllm import chat_messages
from jaxllm.beam_search import BeamSearchState
from jaxllm.grammar import GrammarCompiler
from jaxllm.sampling_params import SamplingParams, is_int
from jaxllm.sampling_rows import SamplingLimits, check_sampling_limits
from jaxllm.sequence import Request
from jaxllm.structured_outputs import StructuredOutputsParams

PromptType = str | list[int] | dict[str, Any]


class InputProcessor:
    """Turns user inputs into validated requests for one engine.

    Args:
        tokenizer: the model's tokenizer, or None (prompts must then be token ids).
        vocab_size: the model's vocabulary size.
        eos_token_ids: the model's EOS ids, given to every request.
        max_model_len, max_num_seqs, max_logprobs: the engine's resolved limits.
        num_usable_blocks, block_size: the KV pool a request must fit in.
        strategies: the registered strategies the engine's sampler serves, by name.
        seed: base seed of the generator that seeds requests without one.
        model_source: what the user passed as the model, named in errors.
        limits: the widths of the compiled sampler's token lists.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int], *,
                 max_model_len: int, max_num_seqs: int, max_logprobs: int, num_usable_blocks: int,
                 block_size: int, strategies: dict[str, Any], seed: int, model_source: Any,
                 limits: SamplingLimits = SamplingLimits()) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.max_logprobs = max_logprobs
        self.num_usable_blocks = num_usable_blocks
        self.block_size = block_size
        self.strategies = strategies
        self.model_source = model_source
        self.limits = limits
        self._request_counter = itertools.count()
        self._seed_rng = np.random.default_rng(seed)
        self._seed_lock = threading.Lock()
        self._grammars = (None if tokenizer is None
                          else GrammarCompiler(tokenizer, vocab_size, eos_token_ids))
        # The engine's LoRA serving state (``jaxllm.lora.serving``) with enable_lora, else None.
        self.lora: Any = None

    def requests(self, prompts: PromptType | Sequence[PromptType],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None,
                 priority: Sequence[int] | None, lora_request: Any = None) -> tuple[bool, list[Request]]:
        """(whether a single prompt was given, one request per prompt), all validated.
        ``lora_request``: one LoRARequest (or None) for all prompts, or a list, one per prompt."""
        single, prompt_list = normalize_prompts(prompts)
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(f"got {len(params_list)} sampling_params for {len(prompt_list)} prompts")
        priorities = [0] * len(prompt_list) if priority is None else list(priority)
        if len(priorities) != len(prompt_list) or not all(isinstance(p, int) for p in priorities):
            raise ValueError(f"priority must be one int per prompt ({len(prompt_list)}), got {priority!r}")
        loras = (list(lora_request) if isinstance(lora_request, (list, tuple))
                 else [lora_request] * len(prompt_list))
        if len(loras) != len(prompt_list):
            raise ValueError(f"got {len(loras)} lora_requests for {len(prompt_list)} prompts")
        return single, [self.request(p, sp, priority=pr, lora_request=lr)
                        for p, sp, pr, lr in zip(prompt_list, params_list, priorities, loras)]

    def request(self, prompt: PromptType, params: SamplingParams, request_id: str | None = None,
                priority: int = 0, lora_request: Any = None) -> Request:
        """One validated request, with its own read-only SamplingParams and a seed."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params must be SamplingParams, got {type(params).__name__}")
        if lora_request is not None:
            if self.lora is None:
                raise ValueError("lora_request needs an engine built with enable_lora=True")
            self.lora.adapter(lora_request)   # read and validated on first use
        params = params.read_only_copy()
        text, token_ids = self.tokenize(prompt)
        self.validate_prompt(token_ids, params)
        self.validate_sampling(params)
        grammar = None if params.structured_outputs is None else self.grammar(params.structured_outputs)
        if params.seed is None:
            with self._seed_lock:
                seed = int(self._seed_rng.integers(0, 2**63 - 1))
        else:
            seed = params.seed
        return Request(
            request_id=str(next(self._request_counter)) if request_id is None else str(request_id),
            prompt=text, prompt_token_ids=tuple(token_ids), sampling_params=params, seed=seed,
            eos_token_ids=self.eos_token_ids, arrival_time=time.monotonic(), priority=priority,
            grammar=grammar, lora_request=lora_request)

    def grammar(self, constraint: StructuredOutputsParams) -> Any:
        """The constraint's matcher at its start, compiled here in the caller's thread (cached
        by content), so a bad one is refused before submission and the executor never waits."""
        if self._grammars is None:
            raise ValueError(f"structured_outputs needs the model's tokenizer, and {self.model_source} "
                             "has none")
        return self._grammars.matcher(constraint)

    def chat_prompts(self, messages: Any) -> tuple[bool, list[dict[str, Any]]]:
        """(whether one conversation was given, a prompt per conversation) through the model's
        chat template, with the generation prompt. Every message is checked first
        (``chat_messages.conversations``: what ``messages`` may be), so a malformed one is named
        by its index and field, with or without a tokenizer, before any template runs."""
        single, conversations = chat_messages.conversations(messages)
        tokenizer = self._require_tokenizer()
        if not tokenizer.chat_template:
            where = (f"{self.model_source} carries no tokenizer.chat_template in its metadata"
                     if str(self.model_source).endswith(".gguf")
                     else f"the tokenizer of {self.model_source} has no chat template")
            raise ValueError(f"chat() needs a chat template, and {where}: format the prompt "
                             "yourself and call generate()")
        prompts = []
        for conversation in conversations:
            text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
            # The template already wrote any BOS/special tokens as text: do not add them twice.
            ids = tokenizer.encode(text, add_special_tokens=False)
            prompts.append({"prompt": text, "prompt_token_ids": ids})
        return single, prompts

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            return prompt, self._require_tokenizer().encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" not in prompt:
                raise ValueError(f"a dict prompt needs 'prompt_token_ids', got keys {sorted(prompt)}")
            return prompt.get("prompt"), token_ids(prompt["prompt_token_ids"], "prompt_token_ids")
        if isinstance(prompt, (list, tuple, np.ndarray)):
            return None, token_ids(prompt, "prompt token ids")
        raise TypeError(f"a prompt must be a str, a list of token ids or a dict, got {type(prompt).__name__}")

    def validate_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise ValueError("prompt is empty (0 tokens)")
        vocab = self.vocab_size
        bad = [t for t in token_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be integers in [0, {vocab}); got {bad[:5]}")
        if len(token_ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(token_ids)} tokens long, but max_model_len is "
                             f"{self.max_model_len}: it must be shorter to leave room for output")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(f"prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens}) = "
                             f"{total} exceeds max_model_len ({self.max_model_len})")
        needed = -(-total // self.block_size)
        if needed > self.num_usable_blocks:
            raise ValueError(f"prompt + max_tokens needs {needed} KV blocks but the whole pool has "
                             f"{self.num_usable_blocks}; raise num_blocks")

    def validate_sampling(self, params: SamplingParams) -> None:
        """The checks SamplingParams cannot do alone: vocabulary, engine limits, strategies."""
        vocab = self.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids),
                          ("allowed_token_ids", params.allowed_token_ids),
                          ("logit_bias", list(params.logit_bias or {}))):
            bad = [t for t in ids or () if t >= vocab]
            if bad:
                raise ValueError(f"{name} must be token ids in [0, {vocab}); got {bad[:5]}")
        check_sampling_limits(params, self.limits, self.eos_token_ids)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(params, name)
            if value is not None and value > self.max_logprobs:
                raise ValueError(f"{name}={value} exceeds the engine's max_logprobs "
                                 f"({self.max_logprobs}); raise Engine(max_logprobs=...)")
        if params.strategy is not None:
            strategy = self.strategies.get(params.strategy)
            if strategy is None:
                raise ValueError(f"strategy {params.strategy!r} is not registered in this engine; "
                                 f"registered: {sorted(self.strategies)} (register before creating the Engine)")
            strategy.validate_args(params.strategy_args)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"stop strings need a tokenizer, and {self.model_source} has none; "
                             "use stop_token_ids")
        group_size = params.beam_width if params.use_beam_search else params.n
        if group_size > self.max_num_seqs:
            name = "beam_width" if params.use_beam_search else "n"
            raise ValueError(f"{name}={group_size} exceeds max_num_seqs ({self.max_num_seqs})")
        if params.use_beam_search:
            self._validate_beam_search(params)

    def _validate_beam_search(self, params: SamplingParams) -> None:
        """Beam search ranks raw log-probabilities, so logits-changing options do not apply."""
        unsupported = [name for name, used in (
            ("stop", bool(params.stop)), ("logit_bias", bool(params.logit_bias)),
            ("allowed_token_ids", params.allowed_token_ids is not None),
            ("penalties", params.needs_penalties), ("logits_processors", bool(params.logits_processors)),
            ("logprobs", params.logprobs is not None)) if used]
        if unsupported:
            raise ValueError(f"use_beam_search does not support {', '.join(unsupported)}")
        search = BeamSearchState.for_request(params, self.eos_token_ids)
        num_eos, needed = len(search.eos_token_ids), search.num_candidates
        if needed > self.max_logprobs:
            raise ValueError(f"beam_width={params.beam_width} with {num_eos} EOS / stop token ids needs "
                             f"{needed} candidates per beam, over max_logprobs ({self.max_logprobs}); "
                             "raise Engine(max_logprobs=...)")

    def _require_tokenizer(self) -> Any:
        if self.tokenizer is None:
            raise ValueError(f"{self.model_source} has no tokenizer: pass prompts as token ids")
        return self.tokenizer


def normalize_prompts(prompts: Any) -> tuple[bool, list[PromptType]]:
    """(is_single, prompts): a str, a dict, a 1-D array or a flat list of numbers is one prompt
    (numbers that are not ints, such as bools and floats, are refused as token ids later)."""
    if isinstance(prompts, (str, dict)):
        return True, [prompts]
    if isinstance(prompts, np.ndarray) and prompts.ndim == 1:
        return True, [prompts.tolist()]
    if isinstance(prompts, (list, tuple)):
        if not prompts:
            raise ValueError("prompts is an empty list")
        if all(isinstance(t, (numbers.Number, np.generic)) for t in prompts):
            return True, [list(prompts)]
        return False, list(prompts)
    raise TypeError(f"prompts must be a str, a list of token ids, a dict or a list of those, "
                    f"got {type(prompts).__name__}")


def token_ids(value: Any, field: str) -> list[int]:
    """``value`` as a list of Python ints: a list, tuple or 1-D array of integers (numpy's
    included). Bools, floats and anything else are refused, naming ``field`` and the index."""
    if value is None:
        raise TypeError(f"{field} is None; expected a list of token ids")
    if isinstance(value, np.ndarray):
        if value.ndim != 1:
            raise TypeError(f"{field} must be a list or a 1-D array, got shape {value.shape}")
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{field} must be a list of token ids, got {type(value).__name__}")
    for index, token in enumerate(value):
        if not is_int(token):
            raise TypeError(f"{field} must be ints: [{index}] is {type(token).__name__} {token!r}")
    return [int(t) for t in value]
