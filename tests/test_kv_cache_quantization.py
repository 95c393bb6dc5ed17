"""kv_cache_dtype "int8" / "fp8" (vLLM's option): the engine on a tiny model against "auto",
forks and prefix hits over quantized blocks, the memory accounting, refused values.

Every attention implementation on quantized caches, against the float64 ground truth, is in
``test_attention_kernels`` (the harness's quantized layouts).
"""

from __future__ import annotations

import types

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_ENGINE_OPTIONS, random_prompts

from jaxllm import Engine, SamplingParams
from jaxllm.cli_options import Parser, add_engine_options, engine_options
from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV, check_supported
from jaxllm.kv_cache import KVCache
from jaxllm.models.rope import RopeSpec
from jaxllm.step import copy_blocks

PROMPTS = random_prompts([5, 23, 40], seed=4)
GREEDY = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)
# Largest |logprob difference| from "auto" allowed for a token both engines chose. Measured on
# these prompts: int8 <= 0.001, fp8 <= 0.004 (3 mantissa bits: ~10x int8's rounding). A
# greedy token may differ where the auto engine's top two logprobs are closer than twice this
# (each may move by the tolerance): a near-tie, not an error.
LOGPROB_TOLERANCE = {"int8": 0.005, "fp8": 0.02}


@pytest.fixture(scope="module", params=["int8", "fp8"])
def quantized(request, tiny_llama_dir):
    with Engine(str(tiny_llama_dir[0]), kv_cache_dtype=request.param,
                **TINY_ENGINE_OPTIONS) as engine:
        yield engine


def _chosen(completion):
    return [lp[t].logprob for t, lp in zip(completion.token_ids, completion.logprobs)]


def test_quantized_cache_greedy_tokens_and_logprobs_match_auto_up_to_near_ties(quantized, tiny):
    auto_engine, _ = tiny
    tolerance = LOGPROB_TOLERANCE[quantized.config.kv_cache_dtype]
    auto = [o.outputs[0] for o in auto_engine.generate(PROMPTS, GREEDY, use_tqdm=False)]
    quant = [o.outputs[0] for o in quantized.generate(PROMPTS, GREEDY, use_tqdm=False)]
    compared = 0
    for want, got in zip(auto, quant):
        same = next((i for i, (a, b) in enumerate(zip(want.token_ids, got.token_ids)) if a != b),
                    len(want.token_ids))
        np.testing.assert_allclose(_chosen(got)[:same], _chosen(want)[:same], atol=tolerance)
        compared += same
        if same < len(want.token_ids):                         # where they part: a near-tie
            top_two = sorted((lp.logprob for lp in want.logprobs[same].values()), reverse=True)
            assert top_two[0] - top_two[1] < 2 * tolerance
    assert compared >= 2 * len(auto[0].token_ids)             # most tokens were compared


def test_quantized_cache_forks_and_prefix_hits_read_the_kv_as_written(quantized):
    """n > 1 copies the shared partial prompt block on write (copy-on-write: its scales too),
    and a repeated prompt attaches its cached blocks: both read the K/V the first run wrote,
    so the logprobs equal a single run's (up to float summation order), where keys read with
    lost or zero scales would move them by far more."""
    prompt = random_prompts([37], seed=5)[0]                  # 4 full blocks of 8 + 5 tokens
    params = SamplingParams(temperature=0, max_tokens=6, logprobs=1, ignore_eos=True)
    single = quantized.generate(prompt, params).outputs[0]
    hits = quantized.stats()["prefix_cache_hit_tokens"]
    again = quantized.generate(prompt, params).outputs[0]
    assert quantized.stats()["prefix_cache_hit_tokens"] - hits >= 32
    forked = quantized.generate(prompt, SamplingParams(n=3, temperature=0, max_tokens=6,
                                                       logprobs=1, ignore_eos=True)).outputs
    for completion in (again, *forked):
        assert completion.token_ids == single.token_ids
        np.testing.assert_allclose(_chosen(completion), _chosen(single), atol=1e-4)


def test_quantized_cache_engine_reports_its_dtype_and_capacity(quantized):
    stats = quantized.stats()
    assert stats["kv_cache_dtype"] == quantized.config.kv_cache_dtype
    assert stats["kv_cache_max_tokens"] == (TINY_ENGINE_OPTIONS["num_blocks"] - 1) * 8
    assert isinstance(quantized.model_runner.kv_cache.k, QuantizedKV)


def test_copy_blocks_copies_values_and_scales():
    values = jnp.arange(2 * 4 * 2 * 1 * 2, dtype=jnp.int8).reshape(2, 4, 2, 1, 2)  # L B Z K H
    scales = jnp.arange(2 * 4 * 2 * 1, dtype=jnp.float32).reshape(2, 4, 2, 1) + 1
    cache = KVCache(k=QuantizedKV(values, scales), v=QuantizedKV(values + 1, scales * 2))
    copied = copy_blocks(cache, jnp.array([[1, 3], [0, 0]], jnp.int32))
    for got, was in ((copied.k, cache.k), (copied.v, cache.v)):
        for field in ("values", "scales"):
            want = np.asarray(getattr(was, field)).copy()
            want[:, 3] = want[:, 1]
            np.testing.assert_array_equal(np.asarray(getattr(got, field)), want)


SMOLLM2_SHAPE = ModelConfig(architecture="LlamaForCausalLM", vocab_size=49152, hidden_size=576,
                            intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                            num_key_value_heads=3, head_dim=64, rope=(RopeSpec(64),),
                            max_position_embeddings=8192)


def test_kv_budget_holds_more_blocks_by_the_quantized_bytes_per_token():
    # SmolLM2: K and V x 30 layers x 3 kv heads x (64 values + a float32 scale for int8/fp8).
    per_token = {"auto": 2 * 30 * 3 * 64 * 4, "int8": 2 * 30 * 3 * (64 + 4),
                 "fp8": 2 * 30 * 3 * (64 + 4)}
    budget = 1024**3
    blocks = {}
    for dtype, nbytes in per_token.items():
        config = EngineConfig(attention="reference", kv_cache_dtype=dtype,
                              kv_cache_memory_bytes=budget).resolve(SMOLLM2_SHAPE, "cpu")
        assert SMOLLM2_SHAPE.kv_cache_bytes_per_token(config.cache_dtype) == nbytes
        assert config.num_blocks == budget // (16 * nbytes)
        blocks[dtype] = config.num_blocks
    assert blocks["int8"] == blocks["fp8"]
    assert blocks["int8"] / blocks["auto"] == pytest.approx(256 / 68, rel=1e-3)   # 3.76x
    bf16 = EngineConfig(dtype="bfloat16", attention="reference", kv_cache_dtype="int8",
                        kv_cache_memory_bytes=budget).resolve(SMOLLM2_SHAPE, "cpu")
    assert bf16.cache_dtype == "int8" and bf16.num_blocks == blocks["int8"]


@pytest.mark.parametrize("value", ["fp8_e5m2", "int4", "float16", None, ["int8"]])
def test_kv_cache_dtype_refuses_unsupported_values(value, tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        EngineConfig(kv_cache_dtype=value)
    if value == "int4":                                       # before any model is loaded
        with pytest.raises(ValueError, match="kv_cache_dtype"):
            Engine(str(tiny_llama_dir[0]), kv_cache_dtype=value)


def test_kv_cache_dtype_alias_and_cli_flag():
    assert EngineConfig(kv_cache_dtype="fp8_e4m3").kv_cache_dtype == "fp8"
    assert EngineConfig(attention="reference").resolve(SMOLLM2_SHAPE, "cpu").cache_dtype == "float32"
    parser = Parser(prog="jaxllm")
    add_engine_options(parser, warmup=False)
    assert engine_options(parser.parse_args([]))["kv_cache_dtype"] == "auto"
    assert engine_options(parser.parse_args(["--kv-cache-dtype", "int8"]))["kv_cache_dtype"] == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(["--kv-cache-dtype", "int4"])


def test_fp8_cache_refused_where_triton_lacks_float8():
    ampere = types.SimpleNamespace(platform="gpu", compute_capability="8.0")
    with pytest.raises(ValueError, match="compute capability 8.9"):
        check_supported("fp8", "pallas_gpu", ampere)
