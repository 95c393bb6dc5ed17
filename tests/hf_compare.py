"""Comparing the engine with transformers on the same random weights, for any family.

``save_tiny`` builds a float32 transformers model from a config and saves it; ``logits_match``
drives the paged model step by step (chunked prefill, then decodes) and checks every row's
logits against a full transformers forward over the same tokens; ``hf_greedy`` is the
reference for greedy generation.
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import torch

from jaxllm import SamplingParams
from jaxllm.kv_cache import allocate_kv_cache
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.model_runner import ModelRunner
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request, Sequence


def save_tiny(path: Path, model_cls: type, config, seed: int = 0):
    """Saves a random float32 ``model_cls(config)`` to ``path``; returns the torch model.

    Random init leaves biases at zero and norm weights at their constant: both are redrawn, so
    a bias or norm loaded into the wrong place changes the logits.
    """
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.5)
            elif "norm" in name:
                param.add_(torch.randn_like(param) * 0.2)
    model.save_pretrained(path)
    return model


def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_with_gaps(model, prompt_ids: list[int], num_tokens: int) -> tuple[list[int], list[float]]:
    """Plain argmax decoding with transformers' KV cache (no logits processors at all), and
    the top-2 logprob gap at each step: where it is under ~1e-3, float implementations may
    legitimately pick different tokens. (``generate(min_new_tokens=...)`` would mask EOS.)"""
    tokens, gaps = [], []
    inputs, past = torch.tensor([prompt_ids]), None
    with torch.no_grad():
        for _ in range(num_tokens):
            out = model(input_ids=inputs, cache=past, use_cache=True)
            logprobs = torch.log_softmax(out.logits[0, -1].float(), -1)
            top2 = logprobs.topk(2)
            gaps.append(float(top2.values[0] - top2.values[1]))
            tokens.append(int(top2.indices[0]))
            inputs, past = torch.tensor([[tokens[-1]]]), out.cache
    return tokens, gaps


def logits_match(engine, hf_model, prompt_lengths, num_decodes: int, *, seed: int = 1,
                 max_rows: int = 4, atol: float = 1e-4) -> int:
    """Runs prompts of ``prompt_lengths`` through ``engine.model`` on a fresh cache, chunked
    by the engine's token budget, then ``num_decodes`` decode steps each; asserts every row's
    logits (after each completed prefill and each decode) equal transformers' within ``atol``.

    Returns the number of logits rows compared.
    """
    c = engine.config
    forward = jax.jit(lambda p, kv, x: engine.model.apply({"params": p}, kv, x))
    kv_cache = allocate_kv_cache(engine.model_config, c.num_blocks, c.block_size, c.dtype)
    scheduler = Scheduler(KVCacheManager(c.num_blocks, c.block_size), max_rows,
                          c.max_num_batched_tokens)
    runner = ModelRunner(None, engine.model_runner.params, kv_cache, c.block_size,
                         c.max_num_batched_tokens, max_rows, c.max_model_len // c.block_size,
                         c.max_model_len, engine.model_config.vocab_size, engine.model_runner.rotary)
    rng = np.random.default_rng(seed)
    vocab = engine.model_config.vocab_size
    for i, n in enumerate(prompt_lengths):
        prompt = tuple(rng.integers(0, vocab, n).tolist())
        scheduler.add(Sequence.from_request(Request(
            str(i), None, prompt, SamplingParams(temperature=0), 0, frozenset(), 0.0)))
    num_checked = 0
    while scheduler.has_unfinished:
        batch = scheduler.schedule()
        inputs = runner.prepare_inputs(batch).inputs
        runner.kv_cache, logits = forward(runner.params, runner.kv_cache, inputs)
        logits = np.asarray(logits)
        scheduler.advance(batch)
        for row, item in enumerate(batch.scheduled):
            seq = item.seq
            if not item.completes_prefill:
                continue
            with torch.no_grad():
                expected = hf_model(torch.tensor([seq.token_ids])).logits[0, -1].numpy()
            np.testing.assert_allclose(logits[row], expected, atol=atol, rtol=0,
                                       err_msg=f"request {seq.request.request_id} at {seq.num_tokens} tokens")
            num_checked += 1
            seq.token_ids.append(int(expected.argmax()))
            scheduler.record_outputs(seq, sampled=True)
            if seq.num_output_tokens == num_decodes:
                scheduler.finish(seq, "length")
    return num_checked
