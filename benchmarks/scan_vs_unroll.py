"""Compile time and step time of the engine step with scanned vs unrolled layers.

    python benchmarks/scan_vs_unroll.py [--model PATH] [--dtype float32]

For each layout, compiles the decode step (1 token) and a prefill step (64 tokens) and times
them. This is the measurement behind EngineConfig.scan_layers=None picking per platform.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from jaxllm import Engine
from jaxllm.step import CompiledStep
from jaxllm.step_inputs import SamplingTensors, StepInputs


def _inputs(num_tokens: int, context: int, block_size: int) -> tuple[StepInputs, SamplingTensors]:
    i32 = jnp.int32
    num_blocks = -(-context // block_size) or 1
    inputs = StepInputs(
        token_ids=jnp.zeros(num_tokens, i32),
        positions=jnp.arange(context, context + num_tokens, dtype=i32),
        slot_mapping=jnp.arange(num_tokens, dtype=i32) + (num_blocks + 1) * block_size,
        token_rows=jnp.zeros(num_tokens, i32),
        block_tables=jnp.arange(1, num_blocks + 1, dtype=i32)[None, :],
        context_lens=jnp.array([context], i32), logits_indices=jnp.array([num_tokens - 1], i32))
    sampling = SamplingTensors(
        temperature=jnp.zeros(1), top_k=jnp.zeros(1, i32), top_p=jnp.ones(1),
        seeds=jnp.zeros(1, jnp.uint32), output_index=jnp.zeros(1, i32))
    return inputs, sampling


def measure(model, dtype: str, scan: bool, repeats: int) -> dict:
    engine = Engine(model, dtype=dtype, scan_layers=scan, max_num_seqs=1, max_model_len=1024,
                    num_blocks=80)
    runner = engine.model_runner
    result = {}
    for name, num_tokens, context in (("decode", 1, 256), ("prefill64", 64, 0)):
        step = CompiledStep(engine.model)
        inputs, sampling = _inputs(num_tokens, context, engine.config.block_size)
        start = time.perf_counter()
        runner.kv_cache, out = step(runner.params, runner.kv_cache, inputs, sampling)
        out.token_ids.block_until_ready()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.kv_cache, out = step(runner.params, runner.kv_cache, inputs, sampling)
            out.token_ids.block_until_ready()
            times.append(time.perf_counter() - start)
        result[name] = {"compile_s": compile_s, "step_ms": 1000 * min(times)}
    engine.shutdown()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results/scan_vs_unroll.json")
    args = parser.parse_args()
    # Measure real compilations, not hits in the persistent cache.
    jax.config.update("jax_enable_compilation_cache", False)
    results = {layout: measure(args.model, args.dtype, layout == "scanned", args.repeats)
               for layout in ("unrolled", "scanned")}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"platform": jax.default_backend(), **results}, indent=2))
    print(f"platform {jax.default_backend()}, dtype {args.dtype}")
    print(f"{'layout':<10}{'step':<11}{'compile s':>10}{'step ms':>10}")
    for layout, steps in results.items():
        for name, r in steps.items():
            print(f"{layout:<10}{name:<11}{r['compile_s']:>10.1f}{r['step_ms']:>10.1f}")


if __name__ == "__main__":
    main()
