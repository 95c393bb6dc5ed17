"""LoRA training over the engine's model code: the loss falls on a toy task, and the saved
adapter gives the same logits in peft as in jaxllm."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
import torch

from jaxllm.lora import TrainBase, causal_lm_loss, forward_logits, init_lora, make_train_step, save_peft


def test_lora_train_step_lowers_loss_and_saved_adapter_matches_peft(tiny, tmp_path):
    from peft import PeftModel

    engine, hf_model = tiny
    base = TrainBase.from_engine(engine)
    lora = init_lora(base, 4, ["q_proj", "v_proj", "up_proj", "down_proj"], jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 256, (4, 12))
    tokens[:, 6:] = [7, 8, 9, 7, 8, 9]            # every completion is the same pattern
    mask = np.zeros_like(tokens)
    mask[:, 6:] = 1
    # B starts at zero: the adapter starts as the base model.
    base_loss = causal_lm_loss(base, base.params, {}, tokens, mask)
    step = make_train_step(base, optax.adamw(1e-2), lora_alpha=8)
    state = step.init(lora)
    losses = []
    for _ in range(25):
        lora, state, loss = step(lora, state, tokens, mask)
        losses.append(float(loss))
    np.testing.assert_allclose(losses[0], base_loss, rtol=1e-5)
    # The tiny random head bounds its logits (|w| ~ 0.02): ~4.4 is the floor from 5.5.
    assert losses[-1] < losses[0] - 0.5 and losses == sorted(losses, reverse=True)

    save_peft(lora, tmp_path / "adapter", lora_alpha=8, targets=base.targets)
    peft_model = PeftModel.from_pretrained(hf_model, tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = peft_model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(forward_logits(base, base.params, lora, jax.numpy.asarray(tokens), 8))
    np.testing.assert_allclose(got, expected, atol=1e-4)
    peft_model.unload()   # leaves the shared transformers model as it was


def test_init_lora_refuses_unknown_targets(tiny):
    base = TrainBase.from_engine(tiny[0])
    with pytest.raises(ValueError, match=r"unknown LoRA target modules \['lm_head'\]"):
        init_lora(base, 4, ["q_proj", "lm_head"], jax.random.key(0))
