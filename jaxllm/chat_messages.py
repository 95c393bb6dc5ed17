"""Chat messages checked before the chat template sees them (no jax).

A template given a malformed conversation fails far from the mistake (a jinja2
``UndefinedError`` for a message without ``content``, transformers' ``... but got 'h'`` for a
string split into characters), so ``Engine.chat`` checks its messages here first and names the
index and field of the first bad one.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Message = dict[str, Any]
Conversation = list[Message]

_SHAPES = ("a string (one user message), a conversation (a list of {'role': str, 'content': str} "
           "dicts) or a list of conversations")


def conversations(messages: Any) -> tuple[bool, list[Conversation]]:
    """(whether one conversation was given, the conversations), each message checked.

    ``messages`` is a string (taken as one user message), one conversation (a list of
    ``{"role": str, "content": str}`` dicts) or a list of conversations. A message's content may
    also be a list of ``{"type": "text", "text": str}`` parts (vLLM's and OpenAI's form), joined
    with newlines. Other keys of a message go to the template unchanged.

    Raises:
        TypeError: ``messages``, a conversation, a message or a field has the wrong type.
        ValueError: a conversation is empty, or a message lacks a role or content.
    """
    if isinstance(messages, str):
        return True, [[{"role": "user", "content": messages}]]
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"chat messages must be {_SHAPES}; got {type(messages).__name__}")
    if not messages:
        raise ValueError("chat messages are empty")
    if isinstance(messages[0], (list, tuple)):
        return False, [_conversation(conv, f"messages[{i}]") for i, conv in enumerate(messages)]
    return True, [_conversation(messages, "messages")]


def _conversation(conversation: Any, where: str) -> Conversation:
    if not isinstance(conversation, (list, tuple)):
        raise TypeError(f"{where} must be a conversation (a list of message dicts), got "
                        f"{type(conversation).__name__}")
    if not conversation:
        raise ValueError(f"{where} is an empty conversation")
    return [_message(message, f"{where}[{i}]") for i, message in enumerate(conversation)]


def _message(message: Any, where: str) -> Message:
    if not isinstance(message, Mapping):
        hint = " (a single string is taken as one user message)" if isinstance(message, str) else ""
        raise TypeError(f"{where} must be a dict with 'role' and 'content', got "
                        f"{type(message).__name__} {_short(message)}{hint}")
    for field in ("role", "content"):
        if field not in message:
            raise ValueError(f"{where} has no {field!r} (keys: {sorted(map(str, message))})")
    role = message["role"]
    if not isinstance(role, str):
        raise TypeError(f"{where}['role'] must be a str, got {_short(role)}")
    if not role:
        raise ValueError(f"{where}['role'] is empty")
    return {**message, "content": _content(message["content"], f"{where}['content']")}


def _content(content: Any, where: str) -> str:
    """A message's text: a str, or the texts of a list of text parts joined with newlines."""
    if isinstance(content, str):
        return content
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{where} must be a str or a list of {{'type': 'text', 'text': str}} "
                        f"parts, got {type(content).__name__} {_short(content)}")
    texts = []
    for i, part in enumerate(content):
        if not (isinstance(part, Mapping) and part.get("type") == "text"
                and isinstance(part.get("text"), str)):
            raise TypeError(f"{where}[{i}] must be a {{'type': 'text', 'text': str}} part (only "
                            f"text is supported), got {_short(part)}")
        texts.append(part["text"])
    return "\n".join(texts)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
