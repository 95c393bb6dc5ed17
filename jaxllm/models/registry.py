"""Maps HF ``architectures`` and GGUF ``general.architecture`` names to their model family."""

from __future__ import annotations

from jaxllm.models import gemma3, llama, phi3, qwen2, qwen3
from jaxllm.models.family import ModelFamily

FAMILIES: tuple[ModelFamily, ...] = (
    llama.FAMILY, qwen2.FAMILY, qwen3.FAMILY, gemma3.FAMILY, phi3.FAMILY,
)
ARCHITECTURES: dict[str, ModelFamily] = {arch: f for f in FAMILIES for arch in f.architectures}
GGUF_ARCHITECTURES: dict[str, ModelFamily] = {f.gguf.architecture: f for f in FAMILIES if f.gguf}


class UnsupportedArchitectureError(ValueError):
    pass


def get_family(architecture: str) -> ModelFamily:
    """The family serving an HF ``architectures`` entry."""
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(ARCHITECTURES))}") from None


def get_gguf_family(architecture: str | None) -> ModelFamily:
    """The family serving a GGUF file's ``general.architecture``."""
    try:
        return GGUF_ARCHITECTURES[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"GGUF architecture {architecture!r} is not supported; supported: "
            f"{', '.join(sorted(GGUF_ARCHITECTURES))}") from None
