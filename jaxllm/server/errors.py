"""OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and how the
engine's own exceptions map onto it.

Requests are validated by the same code ``Engine.generate`` runs (SamplingParams, the input
processor, the chat-message checks), whose messages start with the field at fault
(``temperature must be ...``, ``messages[1] has no 'content'``); the server passes those messages
on unchanged and names that field as ``param``, translated to the request's own field name.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from jaxllm.request_handle import EngineDeadError, RequestError

_UNION_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})
_LEADING_FIELD = re.compile(r"[A-Za-z_][\w.]*(?:\[[^\]]*\])*")


class APIError(Exception):
    """An error answered with an HTTP status and OpenAI's error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def invalid_request(exc: BaseException, field_names: Mapping[str, str]) -> APIError:
    """A 400 for a ValueError/TypeError from the engine's validation.

    Args:
        exc: the exception; its message is kept as it is.
        field_names: engine field name -> the request field that set it (e.g. chat's
            ``logprobs`` -> ``top_logprobs``); a message starting with one names it as param.
    """
    message = str(exc)
    match = _LEADING_FIELD.match(message)
    param = None
    if match:
        leading = match.group(0)
        root = re.split(r"[.\[=]", leading, maxsplit=1)[0]
        if root in field_names:
            param = field_names[root] + leading[len(root):]
    return APIError(400, message, param=param)


def from_pydantic(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first field pydantic refused (``messages[0].content: ...``)."""
    first = errors[0]
    param = ""
    for part in first.get("loc", ()):
        if isinstance(part, int):
            param += f"[{part}]"
        elif part.isidentifier() and part not in _UNION_TAGS:  # not a union member's tag
            param += f".{part}" if param else part
    message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "")
    return APIError(400, message, param=param or None)


def from_engine(exc: BaseException) -> APIError:
    """The engine stopped or failed a request after it was accepted."""
    if isinstance(exc, EngineDeadError):
        return engine_dead(str(exc))
    if isinstance(exc, RequestError):
        return APIError(500, str(exc), type="server_error", code="request_failed")
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


def engine_dead(reason: str | None) -> APIError:
    return APIError(503, f"the engine is dead: {reason or 'shut down'}", type="server_error",
                    code="engine_dead")
