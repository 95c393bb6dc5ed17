"""What a local HF model directory holds besides weights: its config, tokenizer and EOS ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_hf_config(model_dir: Path) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_dir)


def load_tokenizer(model_dir: Path) -> Any:
    """The directory's tokenizer, or None when it has none (prompts must then be token ids)."""
    from transformers import AutoTokenizer

    if not any((model_dir / name).exists() for name in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(model_dir)


def eos_token_ids(model_dir: Path, hf_config: Any, tokenizer: Any) -> frozenset[int]:
    """EOS ids from generation_config.json (an int or a list), else config / tokenizer."""
    from transformers import GenerationConfig

    eos = None
    if (model_dir / "generation_config.json").exists():
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)
