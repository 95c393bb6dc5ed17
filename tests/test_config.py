"""EngineConfig.resolve and ModelConfig's derived values, without a model or a device."""

from __future__ import annotations

import dataclasses

import pytest

from jaxllm.config import CPU_KV_CACHE_BYTES, EngineConfig, ModelConfig
from jaxllm.models.rope import RopeSpec

MODEL = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64,
                    intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=16, rope=(RopeSpec(16),),
                    max_position_embeddings=512)


def test_model_config_kv_bytes_and_defaults():
    # K and V, 2 layers, 2 kv heads of 16: 128 values a token.
    assert MODEL.kv_cache_bytes_per_token("float32") == 512
    assert MODEL.kv_cache_bytes_per_token("bfloat16") == 256
    assert MODEL.layer_windows == (0, 0) and MODEL.sliding_window is None
    assert MODEL.softmax_scale == 16 ** -0.5


def test_model_config_rejects_inconsistent_layers():
    with pytest.raises(ValueError, match="layer_windows has 3 entries for 2 layers"):
        dataclasses.replace(MODEL, layer_windows=(0, 4, 4))
    with pytest.raises(ValueError, match="indexes 1 rotary tables"):
        dataclasses.replace(MODEL, layer_rope=(0, 1))
    with pytest.raises(ValueError, match="hidden_act 'relu' is not supported"):
        dataclasses.replace(MODEL, hidden_act="relu")


def test_resolve_fills_cpu_defaults():
    c = EngineConfig(attention="reference").resolve(MODEL, "cpu")
    assert (c.dtype, c.max_model_len, c.scan_layers, c.prefill_first) == ("float32", 512, False, True)
    # Never more blocks than every sequence could use at once: 64 rows x 32 blocks + block 0.
    assert c.num_blocks == 64 * 32 + 1
    budget_blocks = CPU_KV_CACHE_BYTES // (16 * 512)
    assert c.num_blocks <= budget_blocks


def test_resolve_fills_accelerator_defaults_from_its_memory():
    c = EngineConfig(attention="reference", max_num_seqs=1024, max_num_batched_tokens=2048).resolve(
        MODEL, "gpu", accelerator_memory_bytes=64 * 1024**2)
    assert (c.dtype, c.scan_layers, c.prefill_first) == ("bfloat16", True, False)
    # 25% of 64 MiB over 16 tokens x 256 bytes a block.
    assert c.num_blocks == 16 * 1024**2 // (16 * 256)


def test_resolve_keeps_explicit_values_and_refuses_a_budget_without_a_block():
    c = EngineConfig(attention="reference", dtype="bfloat16", max_model_len=100, num_blocks=7,
                     scan_layers=True).resolve(MODEL, "cpu")
    assert (c.dtype, c.max_model_len, c.num_blocks, c.scan_layers) == ("bfloat16", 100, 7, True)
    with pytest.raises(ValueError, match="max_logit_bias must be at least 1"):
        EngineConfig(max_logit_bias=0)
    assert EngineConfig(max_allowed_token_ids=7).sampling_limits.max_allowed_token_ids == 7
    with pytest.raises(ValueError, match="kv_cache_memory_bytes=100 holds no KV block"):
        EngineConfig(attention="reference", kv_cache_memory_bytes=100).resolve(MODEL, "cpu")
