"""StructuredOutputsParams: constrain a request's output to a JSON schema, a regex, a choice or a
grammar (vLLM's names). The constraint is compiled by the grammar engine (``jaxllm.grammar``)
into a per-step token mask; this module only says what was asked for, validated."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclasses.dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one constraint per request.

    Attributes:
        json: a JSON schema (a dict, or its JSON text) the output must validate against.
        regex: a regular expression the whole output must match.
        choice: the output is exactly one of these strings.
        grammar: a Lark grammar (llguidance's dialect, with ``start``) the output must match.
        json_object: any JSON object (OpenAI's ``response_format={"type": "json_object"}``).
        disable_any_whitespace: JSON without free whitespace (compact separators only). When
            False (the default) whitespace between JSON tokens is still limited, so a model
            cannot loop on spaces until ``max_tokens``.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError("structured_outputs needs exactly one of json, regex, choice, grammar "
                             f"or json_object; got {given or 'none'}")
        if isinstance(self.json, str):
            try:
                object.__setattr__(self, "json", json.loads(self.json))
            except ValueError as exc:
                raise ValueError(f"structured_outputs.json is not valid JSON: {exc}") from None
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError(f"structured_outputs.json must be a JSON schema object, got {type(self.json).__name__}")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None:
            if (not isinstance(self.choice, (list, tuple)) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise ValueError("structured_outputs.choice must be a non-empty list of non-empty strings")
            object.__setattr__(self, "choice", list(self.choice))
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be True when given")

    @property
    def kind(self) -> str:
        """Which constraint this is: one of json, regex, choice, grammar, json_object."""
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))
