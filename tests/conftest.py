"""Shared fixtures: tiny random Llama checkpoints saved by transformers, the real SmolLM2."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest

# Keep tests hermetic: never reach a hub, keep converted models and XLA caches per session.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# torch (the transformers/peft reference) on one thread: beside the engine's XLA threads on a
# 2-core machine, its 2-thread OpenMP pool spin-waits for a busy core, ~4-10x slower (SmolLM2's
# greedy comparison: 92 s -> 21 s under load). Set before torch is imported. (jaxllm's own C++
# kernels do not use OpenMP, XLA has its own pool: only the reference runs single-threaded.)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_tiny_llama(path: Path, seed: int = 0, **overrides):
    """Saves a random float32 ``LlamaForCausalLM`` to ``path``; returns the torch model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None)
    fields.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    # Random init leaves biases at zero; make them count.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
    model.save_pretrained(path)
    return model


CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}<|im_end|>{% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


def save_byte_tokenizer(path: Path):
    """Saves a small byte-level BPE tokenizer (256 bytes + merges + "<|im_end|>" = 300 ids, EOS
    0) with a chat template to ``path``; returns it. Made here, so no test needs a hub."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|im_end|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    text = ['{"name": "Ada", "age": 36, "tags": ["math", "code"], "ok": true}',
            "Hello world, the quick brown fox jumps over the lazy dog. 0123456789"]
    tokenizer.train_from_iterator(text * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)
    return fast


def random_prompts(lengths, seed: int = 0, vocab: int = 256) -> list[list[int]]:
    """Prompts of the given lengths, random token ids below ``vocab`` (the tiny models')."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    model = make_tiny_llama(path)
    return path, model


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory):
    """A tiny random Llama (320-token vocabulary, EOS 0) with a byte-level tokenizer and a chat
    template: text prompts, chat and structured outputs on a tiny model."""
    path = tmp_path_factory.mktemp("tiny_chat_llama")
    model = make_tiny_llama(path, seed=3, vocab_size=320, eos_token_id=0)
    tokenizer = save_byte_tokenizer(path)
    return path, model, tokenizer


# The engine options of the tiny Llama's shared engine. Tests that need an engine of their own
# (another budget, a pool to exhaust, one to break or shut down) start from these, so most of
# their step shapes are already in the persistent compilation cache.
TINY_ENGINE_OPTIONS = dict(max_model_len=96, num_blocks=96, block_size=8, max_num_seqs=16,
                           max_num_batched_tokens=64, max_logprobs=16)


@pytest.fixture(scope="session")
def tiny_engine(tiny_llama_dir):
    """One engine over the tiny Llama for every test that only submits requests to it: the
    engine-level tests leave it idle (no running request, every block free) when they end."""
    from jaxllm import Engine

    path, _ = tiny_llama_dir
    with Engine(str(path), **TINY_ENGINE_OPTIONS) as engine:
        yield engine


@pytest.fixture
def tiny(tiny_engine, tiny_llama_dir):
    """(the shared tiny engine, the transformers model with its weights)."""
    yield tiny_engine, tiny_llama_dir[1]
    # Aborts (a closed stream) take effect at the loop's next iteration: wait for it, briefly.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        stats = tiny_engine.stats()
        if stats["num_running"] == 0 and stats["num_waiting"] == 0:
            break
        time.sleep(0.01)
    assert stats["num_running"] == 0 and stats["num_waiting"] == 0, "a test left requests behind"


class FakeModelRunner:
    """The ModelRunner protocol the executor drives, without a model: subclasses say in
    ``dispatch(batch, prepared)`` which token each scheduled row samples (a list, one per row).

    ``prepare_inputs(batch, previous)`` returns what ``dispatch`` gets (here None); ``fetch``
    hands the rows' tokens back with a fixed logprob of -0.5.
    """

    uses_host_callbacks = False

    def prepare_inputs(self, batch, previous=None):
        return None

    def dispatch(self, batch, prepared) -> list[int]:
        raise NotImplementedError

    def fetch(self, batch, outputs):
        from jaxllm.row_results import RowResults

        return RowResults(outputs, [-0.5] * len(outputs), {}, {})
