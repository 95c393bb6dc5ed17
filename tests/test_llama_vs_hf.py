"""The paged, compiled model against transformers' LlamaForCausalLM on the same random weights."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_llama
from hf_compare import hf_greedy, logits_match

from jaxllm import Engine, SamplingParams
from jaxllm.models.layers import dot_general

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


@pytest.fixture(scope="module")
def unrolled_engine(tiny):
    """The config's engine with unrolled layers, shared by its logits and greedy tests (the
    logits check drives ``engine.model`` on a cache of its own)."""
    with Engine(str(tiny[0]), **ENGINE_OPTIONS) as engine:
        yield engine


def test_model_logits_match_hf_at_every_step(tiny, unrolled_engine):
    """Prefill (chunked: budget 32 < prompt) and every decode step, through the paged path."""
    assert logits_match(unrolled_engine, tiny[1], (3, 17, 45), num_decodes=12) == 3 * 12


def test_scanned_model_logits_match_hf_at_every_step(tiny):
    path, hf_model = tiny
    with Engine(str(path), scan_layers=True, **ENGINE_OPTIONS) as engine:
        assert logits_match(engine, hf_model, (3, 17, 45), num_decodes=12) == 3 * 12


def test_engine_greedy_32_tokens_match_hf_generate(tiny, unrolled_engine):
    hf_model = tiny[1]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, 256, n).tolist() for n in (1, 9, 40)]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    outputs = unrolled_engine.generate(prompts, params, use_tqdm=False)
    for prompt, output in zip(prompts, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, prompt, 32)
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


def test_engine_bfloat16_runs_close_to_float32(tmp_path):
    """bfloat16 weights, activations and cache against float32 on the same weights: every
    prompt token's logprob within 0.25 (bf16 keeps ~3 significant digits; the model's
    logprobs span several nats, so a broken bf16 path would be far off) and the same first
    greedy tokens."""
    make_tiny_llama(tmp_path, initializer_range=0.2)   # peaked distributions, few near-ties
    prompt = list(range(1, 40))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        with Engine(str(tmp_path), dtype=dtype, **ENGINE_OPTIONS) as engine:
            assert engine.config.dtype == dtype
            out = engine.generate(prompt, params)
        logprobs = [entry[token].logprob for token, entry in zip(prompt[1:], out.prompt_logprobs[1:])]
        runs[dtype] = np.array(logprobs), out.outputs[0].token_ids
    (f32, f32_tokens), (bf16, bf16_tokens) = runs["float32"], runs["bfloat16"]
    assert f32.max() - f32.min() > 2.0
    np.testing.assert_allclose(bf16, f32, atol=0.25, rtol=0)
    assert bf16_tokens[:4] == f32_tokens[:4]
