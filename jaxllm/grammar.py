"""Structured outputs on the host: grammars compiled by llguidance, one matcher per sequence,
and the token bitmask rows each step applies (no jax).

Why llguidance (over xgrammar): it is torch-free (xgrammar needs torch, which the GPU image
has but a serving install should not), it takes JSON schemas, regexes, choices and Lark/GBNF
grammars in one engine, and its numpy API fills the ``[S, ceil(V/32)]`` int32 bitmask rows the
compiled step takes directly, for many sequences at once off the GIL. It is the optional
``grammar`` extra (``pip install "jaxllm[grammar]"``).

Life of a constraint: at submission (the caller's thread, never the executor's) the request's
``StructuredOutputsParams`` become a grammar, validated against the tokenizer and cached by
content, and a matcher; each sequence of the request owns a copy. The executor's
postprocessing feeds each sampled token to the sequence's matcher (a matcher that stops ends
the sequence), and the model runner asks for the next step's bitmask row of every constrained
row. A constrained sequence waits for its token to reach the host before its next step (its
mask depends on it), as beam search and Python logits processors do.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

import numpy as np

from jaxllm.structured_outputs import StructuredOutputsParams

# Free whitespace between JSON tokens, when any is allowed: one space, or a newline and up to
# MAX_JSON_INDENT spaces of indentation, so compact and pretty-printed JSON are both possible
# but a model cannot loop on whitespace until max_tokens (a known failure of unbounded
# ``[ \t\n\r]*``: random tiny models here wrote 100 tokens of tabs and carriage returns).
MAX_JSON_INDENT = 16
JSON_WHITESPACE = rf"(?: ?|\n {{0,{MAX_JSON_INDENT}}})"


def _llguidance() -> Any:
    try:
        import llguidance
        import llguidance.hf
        import llguidance.numpy
    except ImportError:
        raise ImportError('structured outputs need llguidance: pip install "jaxllm[grammar]"') from None
    return llguidance


def mask_words(vocab_size: int) -> int:
    """int32 words of one bitmask row: one bit per token id."""
    return (vocab_size + 31) // 32


def grammar_text(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet checked against a tokenizer)."""
    llg = _llguidance()
    matcher = llg.LLMatcher
    if params.json is not None or params.json_object:
        schema = params.json if params.json is not None else {"type": "object"}
        if params.disable_any_whitespace:
            options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
        else:
            options = {"whitespace_pattern": JSON_WHITESPACE}
        return matcher.grammar_from_json_schema(schema, overrides=options)
    if params.regex is not None:
        return matcher.grammar_from_regex(params.regex)
    if params.choice is not None:
        return llg.grammar_from("choice", params.choice)
    return llg.grammar_from("grammar", params.grammar)


class GrammarCompiler:
    """Grammars for one engine's tokenizer: validated once per distinct constraint (LRU), and
    a fresh matcher per request. Thread-safe: callers submit from many threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int],
                 cache_size: int = 256) -> None:
        if tokenizer is None:
            raise ValueError("structured outputs need the model's tokenizer, and this model has none")
        self._hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._eos = sorted(eos_token_ids)
        self._lock = threading.Lock()
        self._lltokenizer: Any = None
        self.validate = functools.lru_cache(maxsize=cache_size)(self._validate)

    @property
    def lltokenizer(self) -> Any:
        """llguidance's view of the tokenizer (built on first use: ~1 s for a 49k vocabulary)."""
        with self._lock:
            if self._lltokenizer is None:
                llg = _llguidance()
                self._lltokenizer = llg.hf.from_tokenizer(
                    self._hf_tokenizer, n_vocab=self.vocab_size, eos_token=self._eos or None)
            return self._lltokenizer

    def _validate(self, grammar: str, kind: str) -> None:
        """Checks a grammar against the tokenizer, once per distinct grammar text."""
        is_error, messages = _llguidance().LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if is_error:
            raise ValueError(f"structured_outputs.{kind} is invalid: {messages[0]}")

    def matcher(self, params: StructuredOutputsParams) -> Any:
        """A matcher at the start of ``params``' grammar; ValueError naming the problem if the
        constraint is invalid."""
        grammar = grammar_text(params)   # cheap; it keeps a schema's property order
        self.validate(grammar, params.kind)
        matcher = _llguidance().LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"structured_outputs.{params.kind} is invalid: {matcher.get_error()}")
        return matcher


class GrammarMasks:
    """Fills bitmask rows for the constrained rows of a step, in parallel."""

    def __init__(self) -> None:
        self._executor: Any = None

    def fill(self, matchers: list[tuple[Any, int]], out: np.ndarray) -> None:
        """Writes the next-token bitmask of each (matcher, row) into ``out[row]`` ([S, W]
        int32, C-contiguous); other rows are left as they are."""
        if not matchers:
            return
        llg = _llguidance()
        if self._executor is None:
            self._executor = llg.LLExecutor()
        llg.numpy.fill_next_token_bitmask_par(self._executor, matchers, out)


def sequence_matcher(seq: Any) -> Any:
    """A constrained sequence's matcher: on first use, a copy of its request's grammar fed the
    tokens the sequence already has (none, except for a sample forked after its first token)."""
    if seq.matcher is None:
        seq.matcher = seq.request.grammar.deep_copy()
        if seq.output_token_ids and not seq.matcher.consume_tokens(seq.output_token_ids):
            raise RuntimeError(f"request {seq.request_id}: its tokens do not fit its grammar: "
                               f"{seq.matcher.get_error()}")
    return seq.matcher


def consume(matcher: Any, token_id: int) -> str | None:
    """Feeds one sampled token to a sequence's matcher. Returns None to go on, "stop" when the
    grammar is complete (only EOS could follow), or an error message if the token broke it."""
    if not matcher.consume_token(token_id):
        return matcher.get_error() or f"token {token_id} is not allowed by the grammar"
    return "stop" if matcher.is_stopped() else None
