"""Random LoRA adapters made by the ``peft`` package (non-zero A and B: peft starts B at 0)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch


def save_random_adapter(model, path: Path, targets: list[str], rank: int = 4, alpha: float = 8,
                        seed: int = 0, use_rslora: bool = False, std: float = 0.3, copy_model: bool = True):
    """Wraps (a copy of) a transformers model in a random LoRA adapter, saves it to ``path``;
    returns the ``PeftModel`` (eval mode)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=use_rslora,
                        lora_dropout=0.0)
    peft_model = get_peft_model(copy.deepcopy(model) if copy_model else model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.normal_(0, std)
    peft_model.save_pretrained(path)
    return peft_model.eval()
