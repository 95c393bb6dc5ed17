"""Maps the HF config ``architectures`` field to the model class that runs it."""

from __future__ import annotations

from jaxllm.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
}


class UnsupportedArchitectureError(ValueError):
    pass


def get_model_class(architecture: str) -> type:
    try:
        return MODEL_REGISTRY[architecture]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {architecture!r} is not supported; supported architectures: "
            f"{', '.join(sorted(MODEL_REGISTRY))}") from None
