"""Data parallelism (``jaxllm.data_parallel``) on faked CPU devices: replicas on their own
devices (alone, and as tensor-parallel groups) give one engine's tokens, share the work, free
every block, and route streams, async requests and aborts; impossible sizes are refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import TINY_ENGINE_OPTIONS

from jaxllm import Engine

# Runs with 4 CPU devices: argv[1] the model path, argv[2] the engine options; prints a JSON
# report on its last line.
CHECKS = r"""
import asyncio, json, sys
from conftest import random_prompts
from jaxllm import Engine, SamplingParams

path, options = sys.argv[1], json.loads(sys.argv[2])
prompts = random_prompts([5, 9, 17, 30, 12, 7, 3, 22, 14, 6], seed=1)
params = [SamplingParams(temperature=t, seed=i, max_tokens=10, ignore_eos=True)
          for i, t in enumerate([0.0, 0.8] * 5)]
with Engine(path, **options) as one:
    reference = [o.outputs[0].token_ids for o in one.generate(prompts, params, use_tqdm=False)]
report = {}
for tp in (1, 2):
    with Engine(path, data_parallel_size=2, tensor_parallel_size=tp, **options) as dp:
        got = [o.outputs[0].token_ids for o in dp.generate(prompts, params, use_tqdm=False)]
        streamed = list(dp.generate_stream(prompts[0], params[0]))[-1].outputs[0].token_ids

        async def run_async():
            outs = [o async for o in dp.generate_async(prompts[1], params[1])]
            return outs[-1].outputs[0].token_ids

        from_async = asyncio.run(run_async())
        stream = dp.generate_stream(prompts[2], SamplingParams(max_tokens=60, ignore_eos=True),
                                    request_id="to-abort")
        next(stream)
        dp.abort("to-abort")
        aborted = list(stream)[-1].outputs[0].finish_reason
        stats = dp.stats()
        report[f"tp{tp}"] = dict(
            type=type(dp).__name__, same=got == reference, streamed=streamed == reference[0],
            from_async=from_async == reference[1], aborted=aborted,
            steps=[s["num_steps"] for s in stats["replicas"]], blocks_used=stats["kv_blocks_used"],
            devices=[sorted(d.id for d in r.model_runner.kv_cache.k.devices()) for r in dp.replicas])
print(json.dumps(report))
"""


def test_replicas_give_one_engines_tokens_on_their_own_devices(tiny_llama_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", CHECKS, str(tiny_llama_dir[0]),
                             json.dumps(TINY_ENGINE_OPTIONS)], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for tp, devices in (("tp1", [[0], [1]]), ("tp2", [[0, 1], [2, 3]])):
        r = report[tp]
        assert r["type"] == "DataParallelEngine"
        assert r["same"] and r["streamed"] and r["from_async"], r
        assert r["aborted"] == "abort"
        assert all(steps > 0 for steps in r["steps"]), r        # both replicas served
        assert r["blocks_used"] == 0
        assert r["devices"] == devices


def test_data_parallel_size_1_is_a_plain_engine(tiny_llama_dir):
    with Engine(str(tiny_llama_dir[0]), data_parallel_size=1, **TINY_ENGINE_OPTIONS) as engine:
        assert type(engine) is Engine and engine.generate([1, 2, 3]).finished


@pytest.mark.parametrize("options, message", [
    ({"data_parallel_size": 2}, "needs 2 devices"),
    ({"data_parallel_size": 0}, "data_parallel_size must be a positive integer"),
    ({"data_parallel_size": 1.5}, "data_parallel_size must be a positive integer"),
])
def test_impossible_data_parallel_sizes_are_refused(tiny_llama_dir, options, message):
    with pytest.raises(ValueError, match=message):
        Engine(str(tiny_llama_dir[0]), **TINY_ENGINE_OPTIONS, **options)
