"""Step-time overhead of LoRA rows: one 64-row decode step with 0, 1 and 4 distinct adapters
in the batch vs the same step without LoRA.

    python benchmarks/lora.py [--model PATH] [--rows 64] [--rank 16] [--repeats 20]
        [--targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj] [--out PATH.json]

One engine (``enable_lora=True, max_loras=4, max_lora_rank=--rank``; the default model,
SmolLM2-135M) holds 4 random adapters of rank ``--rank`` on ``--targets`` (PEFT files written
by ``save_peft``). The compiled step is called directly on one decode step's arrays (``--rows``
one-token rows, cache block 0: the matmuls of a real decode step, attention over a short
context), with the slab (LoRA on) or without it (the ``enable_lora=False`` step: the same
function compiled without the "lora" collection). Cases alternate call by call, so that on a
shared machine all see the same load; reported: the minimum and median ms per step, the
overhead over no LoRA, and the process CPU time per step (steadier than wall time when other
processes compete for the cores). Writes ``benchmarks/results/lora.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import Engine
from jaxllm.lora.adapter import load_adapter, save_peft
from jaxllm.model_runner import PreparedStep
from jaxllm.packing import pack
from jaxllm.step_inputs import StepKey

ALL_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
MAX_LORAS = 4


def random_adapters(engine: Engine, directory: Path, rank: int, targets: list[str]) -> list:
    """MAX_LORAS random adapters (A and B both non-zero) written as PEFT directories."""
    lora, num_layers = engine.lora, engine.model_config.num_hidden_layers
    rng = np.random.default_rng(0)
    adapters = []
    for i in range(MAX_LORAS):
        params = {m: {"a": rng.normal(0, 0.02, (num_layers, lora.targets[m].in_dim, rank)),
                      "b": rng.normal(0, 0.02, (num_layers, rank, lora.targets[m].out_dim))}
                  for m in targets}
        save_peft(params, directory / f"a{i}", lora_alpha=2 * rank, targets=lora.targets)
        adapters.append(load_adapter(directory / f"a{i}", lora.targets, num_layers, rank))
    return adapters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--targets", default=ALL_TARGETS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "lora.json"))
    args = parser.parse_args()

    engine = Engine(args.model, enable_lora=True, max_loras=MAX_LORAS, max_lora_rank=args.rank,
                    max_num_seqs=args.rows, max_num_batched_tokens=max(512, args.rows),
                    max_model_len=512, num_blocks=64)
    runner, lora = engine.model_runner, engine.lora
    with tempfile.TemporaryDirectory() as tmp:
        for slot, adapter in enumerate(random_adapters(engine, Path(tmp), args.rank, args.targets.split(","))):
            lora.slab.load(slot, slot + 1, adapter)
    key = StepKey(args.rows, args.rows, 1)
    layout = runner.layout.packed(key)
    cases = {"no LoRA (enable_lora=False step)": None, "LoRA on, 0 adapters in the batch": -1,
             "LoRA on, 1 adapter": 1, f"LoRA on, {MAX_LORAS} distinct adapters": MAX_LORAS}
    buffers = {}
    for name, distinct in cases.items():
        arrays = runner.layout.padding(key)
        if distinct is not None:
            arrays.lora_slots[:] = -1 if distinct < 0 else np.arange(args.rows) % distinct
        buffers[name] = pack(PreparedStep(key, arrays, []).arrays, layout)

    def run(name: str) -> tuple[float, float]:
        slab = None if cases[name] is None else lora.slab.arrays
        start, cpu_start = time.perf_counter(), time.process_time()
        state, outputs = runner.step(runner.params, runner.state, key, layout, buffers[name], slab)
        jax.block_until_ready(outputs.token_ids)
        runner.kv_cache, runner.last_tokens, runner.token_counts = (
            state.kv_cache, state.last_tokens, state.token_counts)
        return time.perf_counter() - start, time.process_time() - cpu_start

    for name in cases:            # compile each variant
        run(name)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for _ in range(args.repeats):
        for name in cases:
            times[name].append(run(name))
    engine.shutdown()
    first = next(iter(cases))
    base, base_cpu = min(w for w, _ in times[first]), min(c for _, c in times[first])
    results = {}
    for name, t in times.items():
        wall, cpu = [w for w, _ in t], [c for _, c in t]
        results[name] = {"min_ms": 1e3 * min(wall), "median_ms": 1e3 * statistics.median(wall),
                         "min_cpu_ms": 1e3 * min(cpu), "overhead_vs_no_lora": min(wall) / base - 1,
                         "cpu_overhead_vs_no_lora": min(cpu) / base_cpu - 1}
    print(f"{args.rows}-row decode step, rank {args.rank}, targets {args.targets}, "
          f"{jax.default_backend()}, dtype {engine.config.dtype}")
    for name, r in results.items():
        print(f"  {name:36s} min {r['min_ms']:7.2f} ms  median {r['median_ms']:7.2f} ms  "
              f"overhead {100 * r['overhead_vs_no_lora']:+5.1f}%   CPU time min "
              f"{r['min_cpu_ms']:7.2f} ms ({100 * r['cpu_overhead_vs_no_lora']:+5.1f}%)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": args.rows, "rank": args.rank, "targets": args.targets,
                               "backend": jax.default_backend(), "dtype": engine.config.dtype,
                               "results": results}, indent=2))


if __name__ == "__main__":
    main()
