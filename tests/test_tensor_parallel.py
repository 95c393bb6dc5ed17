"""Tensor parallelism (``jaxllm.sharding``) on faked CPU devices: the same greedy tokens and
logprobs as one device, params and KV cache really split, impossible splits refused.

The equality checks need 4 CPU devices, which XLA only fakes when told before jax initialises:
they run in one subprocess (``--xla_force_host_platform_device_count=4``) over three tiny
random float32 models: Llama with biases (4 query / 2 kv heads: split at TP=2, replicated at
TP=4), Qwen3 (q/k norms, 1 kv head: replicated; the reference attention) and Gemma 3 with scanned layers (traced
per-layer windows, tied head over a vocabulary-split embedding, soft-capped logits); the slow
test does the same for SmolLM2-135M (9 query / 3 kv heads) at TP=3.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import make_tiny_llama
from hf_compare import save_tiny
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, Qwen3Config, Qwen3ForCausalLM

from jaxllm import Engine
from jaxllm.config import EngineConfig, ModelConfig
from jaxllm.models.rope import RopeSpec

COMMON = dict(vocab_size=256, intermediate_size=96, max_position_embeddings=256,
              eos_token_id=None, bos_token_id=None, pad_token_id=None)

# Runs with 4 CPU devices: argv[1] is a JSON list of (name, path, tensor-parallel sizes,
# engine options); prints one JSON line of per-check results.
CHECKS = r"""
import json, sys
import numpy as np
from jaxllm import Engine, SamplingParams

cases = json.loads(sys.argv[1])
prompts = [[1, 2, 3, 4, 5], list(range(10, 22)), [7, 8, 9]]   # one prefill step
params = SamplingParams(temperature=0, max_tokens=8, logprobs=3, ignore_eos=True)
report = {}
for name, path, sizes, options in cases:
    baseline = None
    for tp in [1] + sizes:
        with Engine(path, max_model_len=64, num_blocks=32, block_size=8, max_num_seqs=4,
                    max_num_batched_tokens=32, tensor_parallel_size=tp, **options) as engine:
            outs = [o.outputs[0] for o in engine.generate(prompts, params, use_tqdm=False)]
            runner = engine.model_runner
            layer = runner.params["layers"] if "layers" in runner.params else runner.params["layers_0"]
            qkv, down = layer["self_attn"]["qkv_proj"]["kernel"], layer["mlp"]["down_proj"]["kernel"]
            cache = runner.kv_cache.k
        tokens = [o.token_ids for o in outs]
        logprobs = np.array([[lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)] for o in outs])
        if baseline is None:
            baseline = tokens, logprobs
            continue
        report[f"{name}/tp{tp}"] = dict(
            same_tokens=tokens == baseline[0],
            max_logprob_diff=float(np.abs(logprobs - baseline[1]).max()),
            qkv_spec=[str(a) for a in qkv.sharding.spec], down_spec=[str(a) for a in down.sharding.spec],
            qkv_shard=list(qkv.addressable_shards[0].data.shape), qkv_shape=list(qkv.shape),
            cache_spec=[str(a) for a in cache.sharding.spec],
            cache_shard=list(cache.addressable_shards[0].data.shape), cache_shape=list(cache.shape),
            devices=len(cache.sharding.device_set))
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp")
    make_tiny_llama(root / "llama", num_attention_heads=4, num_key_value_heads=2,
                    attention_bias=True)
    save_tiny(root / "qwen3", Qwen3ForCausalLM, Qwen3Config(
        **COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16))
    save_tiny(root / "gemma3", Gemma3ForCausalLM, Gemma3TextConfig(
        **COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16,
        layer_types=["sliding_attention", "full_attention"], final_logit_softcapping=5.0))
    make_tiny_llama(root / "odd_kv", hidden_size=48, num_attention_heads=6, num_key_value_heads=3)
    return root


def run_checks(cases: list) -> dict:
    """Runs ``CHECKS`` on ``cases`` in a subprocess with 4 CPU devices; its report."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    result = subprocess.run([sys.executable, "-c", CHECKS, json.dumps(cases)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def assert_matches_one_device(report: dict, kv_heads: dict[str, int], tolerance: float = 1e-4) -> None:
    """Every check: same tokens, logprobs within ``tolerance``, q|k|v and down_proj split Megatron-style,
    the KV cache split over ``kv_heads[check]`` kv heads (the model's, or replicated ones)."""
    assert sorted(report) == sorted(kv_heads)
    for check, r in report.items():
        tp = int(check.split("tp")[-1])
        assert r["same_tokens"], check
        assert r["max_logprob_diff"] < tolerance, (check, r["max_logprob_diff"])
        assert r["qkv_spec"][-2:] == ["None", "tp"] and r["down_spec"][-2:] == ["tp", "None"], check
        assert r["qkv_shard"][-1] * tp == r["qkv_shape"][-1], check
        assert r["cache_spec"] == ["None", "None", "None", "tp"] and r["devices"] == tp, check
        assert r["cache_shape"][3] == kv_heads[check], check
        assert r["cache_shard"][3] == kv_heads[check] // tp, check


def test_tensor_parallel_matches_one_device(models):
    report = run_checks([("llama", str(models / "llama"), [2, 4], {}),
                         ("qwen3", str(models / "qwen3"), [2], {"attention": "reference"}),
                         ("gemma3", str(models / "gemma3"), [2], {"scan_layers": True})])
    # llama's 2 kv heads are split at 2 and repeated at 4; qwen3's one is repeated.
    assert_matches_one_device(report, {"llama/tp2": 2, "llama/tp4": 4, "qwen3/tp2": 2,
                                       "gemma3/tp2": 2})


@pytest.mark.slow
def test_smollm2_tensor_parallel_3_matches_one_device():
    """The default model: 9 query heads and 3 kv heads, one of each kind per device at 3.

    On one device its Q4_1 blocks stay packed and run the integer-dot kernel (x rounded to
    int16 per block of 32: logprobs move by ~1e-3); split, quantization "auto" dequantizes them
    to float32 (quantized weights run on one device), hence the looser logprob bound; the
    tokens must still be the same."""
    assert_matches_one_device(run_checks([("smollm2", None, [3], {})]), {"smollm2/tp3": 3},
                              tolerance=3e-3)


@pytest.mark.parametrize(("name", "size", "message"), [
    ("llama", 3, r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"),
    ("odd_kv", 2, r"num_key_value_heads \(3\) and tensor_parallel_size \(2\)"),
    ("llama", 2, r"tensor_parallel_size=2 needs 2 devices; cpu has 1"),
])
def test_impossible_splits_are_refused_at_engine(models, name, size, message):
    with pytest.raises(ValueError, match=message):
        Engine(str(models / name), max_model_len=64, num_blocks=8, tensor_parallel_size=size)


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_tensor_parallel_size_must_be_a_positive_integer(size):
    with pytest.raises(ValueError, match="tensor_parallel_size must be a positive integer"):
        EngineConfig(tensor_parallel_size=size)


def test_kv_cache_budget_is_per_device():
    """Each device holds its kv heads of every block: the per-device budget buys N times the
    blocks when N splits the kv heads, 2 / N times with replicated heads (2 kv heads here);
    CPU's default 2 GiB is shared by its faked devices."""
    model = ModelConfig(architecture="LlamaForCausalLM", vocab_size=100, hidden_size=64,
                        intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16, rope=(RopeSpec(16),),
                        max_position_embeddings=512)

    def blocks(tp: int, platform: str = "gpu") -> int:
        config = EngineConfig(tensor_parallel_size=tp, kv_cache_memory_bytes=None if platform == "cpu"
                              else 2 ** 20, max_num_seqs=10 ** 4,
                              max_num_batched_tokens=10 ** 4)
        return config.resolve(model, platform).num_blocks

    assert model.kv_cache_bytes_per_token("float32", 2) == model.kv_cache_bytes_per_token("float32") // 2
    assert model.kv_cache_bytes_per_token("float32", 4) == model.kv_cache_bytes_per_token("float32", 2)
    assert (blocks(2), blocks(4)) == (2 * blocks(1), 2 * blocks(1))
    assert blocks(2, "cpu") == blocks(1, "cpu")
