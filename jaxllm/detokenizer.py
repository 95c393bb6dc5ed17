"""Incremental detokenization: token ids in, text deltas out, never half a character.

Byte-level BPE splits one multi-byte character (CJK, emoji) over several tokens; decoding such a
prefix gives U+FFFD. Each step decodes a small window twice, the text it already emitted
(prefix_offset:read_offset) and the window with the new tokens (prefix_offset:), and emits the
difference only once it no longer ends in U+FFFD. A few prompt tokens seed the window so
tokenizers that drop a leading space when decoding a sequence start (SentencePiece) still get
the spacing of the first output token right. Cost per token: two decodes of a few tokens.
The caller keeps the text: it may cut it (stop strings) without the window noticing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_token_ids: Sequence[int],
                 skip_special_tokens: bool) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def _advance(self, allow_partial: bool) -> str:
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not allow_partial):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return delta

    def add(self, token_id: int) -> str:
        """Appends one token; returns the newly complete text (maybe empty)."""
        self._ids.append(token_id)
        return self._advance(allow_partial=False)

    def flush(self) -> str:
        """At the end of generation: emits whatever is held back, complete or not."""
        return self._advance(allow_partial=True)
