"""The paged, compiled model against transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxllm import Engine, SamplingParams
from jaxllm.kv_cache import allocate_kv_cache
from jaxllm.kv_cache_manager import KVCacheManager
from jaxllm.model_runner import ModelRunner
from jaxllm.models.layers import dot_general
from jaxllm.scheduler import Scheduler
from jaxllm.sequence import Request, Sequence

from conftest import make_tiny_llama

CONFIGS = {
    "gqa_untied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
    "mha_tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "odd_heads_bias": dict(hidden_size=48, num_attention_heads=3, num_key_value_heads=1,
                           attention_bias=True, mlp_bias=True, num_hidden_layers=3),
    "llama3_rope": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 8.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 32}),
}
ENGINE_OPTIONS = dict(max_model_len=128, num_blocks=64, block_size=8, max_num_seqs=8,
                      max_num_batched_tokens=32)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def tiny(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    model = make_tiny_llama(path, **CONFIGS[request.param])
    return path, model


def _hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
def test_model_logits_match_hf_at_every_step(tiny, scan_layers):
    """Prefill (chunked: budget 32 < prompt) and every decode step, through the paged path."""
    path, hf_model = tiny
    with Engine(str(path), scan_layers=scan_layers, **ENGINE_OPTIONS) as engine:
        import jax

        c = engine.config
        forward = jax.jit(lambda p, kv, x: engine.model.apply({"params": p}, kv, x))
        kv_cache = allocate_kv_cache(engine.model_config, c.num_blocks, c.block_size, c.dtype)
        scheduler = Scheduler(KVCacheManager(c.num_blocks, c.block_size), 4, c.max_num_batched_tokens)
        runner = ModelRunner(None, engine.model_runner.params, kv_cache, c.block_size,
                             c.max_num_batched_tokens, 4, c.max_model_len // c.block_size,
                             c.max_model_len, engine.model_config.vocab_size,
                             engine.model_runner.rotary)
        rng = np.random.default_rng(1)
        for i, n in enumerate((3, 17, 45)):
            prompt = tuple(rng.integers(0, 256, n).tolist())
            scheduler.add(Sequence.from_request(Request(
                str(i), None, prompt, SamplingParams(temperature=0), 0, frozenset(), 0.0)))
        num_checked = 0
        while scheduler.has_unfinished:
            batch = scheduler.schedule()
            inputs, _, _ = runner.prepare_inputs(batch)
            runner.kv_cache, logits = forward(runner.params, runner.kv_cache, inputs)
            logits = np.asarray(logits)
            for row, item in enumerate(batch.scheduled):
                seq = item.seq
                completes = item.completes_prefill
                seq.num_computed_tokens += item.num_new_tokens
                if not completes:
                    continue
                with torch.no_grad():
                    expected = hf_model(torch.tensor([seq.token_ids])).logits[0, -1].numpy()
                np.testing.assert_allclose(logits[row], expected, atol=1e-4, rtol=0)
                num_checked += 1
                seq.token_ids.append(int(expected.argmax()))
                if seq.num_output_tokens == 12:
                    scheduler.finish(seq, "length")
        assert num_checked == 3 * 12


def test_engine_greedy_32_tokens_match_hf_generate(tiny):
    path, hf_model = tiny
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    with Engine(str(path), **ENGINE_OPTIONS) as engine:
        outputs = engine.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == _hf_greedy(hf_model, prompt, 32)
        assert output.outputs[0].finish_reason == "length"
        assert output.prompt_token_ids == prompt


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("contract_rhs", [0, 1], ids=["dense", "tied_head"])
def test_bfloat16_matmuls_accumulate_in_float32(rows, contract_rhs):
    """models.layers.dot_general: bf16 in, bf16 out, one float32 accumulation (on CPU a one-row
    product goes through a two-row GEMM and must come back as one row)."""
    rng = np.random.default_rng(rows)
    x = jnp.asarray(rng.normal(size=(rows, 64)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(64, 40) if contract_rhs == 0 else (40, 64)), jnp.bfloat16)
    got = jax.jit(lambda x, w: dot_general(x, w, (((1,), (contract_rhs,)), ((), ()))))(x, w)
    w32 = np.asarray(w, np.float32)
    want = np.asarray(x, np.float32) @ (w32 if contract_rhs == 0 else w32.T)
    assert got.shape == (rows, 40) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=8e-3, atol=1e-2)


def test_engine_bfloat16_runs_close_to_float32(tiny_llama_dir):
    path, _ = tiny_llama_dir
    prompt = list(range(1, 20))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with Engine(str(path), dtype="bfloat16", **ENGINE_OPTIONS) as engine:
        assert engine.config.dtype == "bfloat16"
        out = engine.generate(prompt, params)
    assert len(out.outputs[0].token_ids) == 4
    assert np.isfinite(out.outputs[0].cumulative_logprob)
