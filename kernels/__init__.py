"""Attention implementations behind one interface, chosen by name.

Every implementation has the signature of ``paged_attention.reference.paged_attention``.
"""

from __future__ import annotations

from typing import Callable

from jaxllm.kernels.paged_attention import reference

ATTENTION_IMPLEMENTATIONS: dict[str, Callable] = {
    "reference": reference.paged_attention,
}


def get_attention(name: str) -> Callable:
    """Returns the attention implementation registered as ``name``."""
    try:
        return ATTENTION_IMPLEMENTATIONS[name]
    except KeyError:
        raise ValueError(f"unknown attention implementation {name!r}; "
                         f"available: {sorted(ATTENTION_IMPLEMENTATIONS)}") from None
