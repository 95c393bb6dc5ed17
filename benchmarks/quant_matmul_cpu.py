"""Few-row products with quantized weights on CPU: the C++ kernel (kernels/cpu_quant_matmul.cc)
vs the float32 kernel (kernels/cpu_matmul.cc) and XLA's dot on float32 weights.

    python benchmarks/quant_matmul_cpu.py [--rows 1 2 4 8 16] [--types Q4_1 Q8_0 int8 ...]
        [--cases smollm2_step ...] [--repeats 5] [--out benchmarks/results/quant_matmul_cpu.json]

Each case is one jitted call chaining products as a decode step does, every product with its
own weights (so they stream from memory, not cache): ``x = tanh(x @ w.T)[:, :K]`` (repeated
along features where a product narrows). Cases (SmolLM2-135M: D 576, F 1536, q|k|v 960, tied
head 49152 x 576; the K-quants need K a multiple of 256, which SmolLM2's 576 is not, so they run
on Gemma 3 270M's attention output 1024 -> 640 and MLP down 2048 -> 640):

- ``smollm2_step``: 30 x (q|k|v, o, gate, up, down) + the head: all of a step's products;
- ``qkv``, ``up``, ``down`` (30 copies each), ``head`` (one): SmolLM2's matrices one by one;
- ``gemma3_o_down``: 18 x (o, down).

Per case, type and row count: ms (minimum over the repeats; the implementations alternate call
by call so that on a shared machine all see the same load), GB/s of packed weights read (bytes
of the quantized weights / time), the speedups over the float32 kernel (``cpu_matmul``, the
model's layout: [K, N] projections, [N, K] head) and over XLA's dot on float32 weights
(``jnp.dot``; a lower bound on dequantize + dot, which also dequantizes). Weights are random
bytes with sane float16 scales (speed does not depend on the values). For scale, a plain
reduction's read bandwidth is measured first. The speedups are also given in process CPU time
(all threads), steadier than the wall clock when other jobs share the cores. Writes the table
as JSON to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxllm.kernels import cpu_matmul, cpu_quant_matmul

sys.path.insert(0, str(Path(__file__).resolve().parent))
from attention_cpu import cpu_model  # noqa: E402
from decode_speed import read_bandwidth_gbs  # noqa: E402

_SMOLLM2_LAYER = [(576, 960), (576, 576), (576, 1536), (576, 1536), (1536, 576)]
_HEAD = (576, 49152)
# name -> list of (K, N) products in order, and whether the last is the tied head ([N, K]).
CASES: dict[str, tuple[list[tuple[int, int]], bool]] = {
    "smollm2_step": (_SMOLLM2_LAYER * 30 + [_HEAD], True),
    "qkv": ([(576, 960)] * 30, False),
    "up": ([(576, 1536)] * 30, False),
    "down": ([(1536, 576)] * 30, False),
    "head": ([_HEAD], True),
    "gemma3_o_down": ([(1024, 640), (2048, 640)] * 18, False),
}
# Byte offsets of each block's float16 scales, set to small finite values in random blocks.
_SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q8_0": (0,), "Q4_K": (0, 2),
                  "Q5_K": (0, 2), "Q6_K": (208,)}


def random_weights(k: int, n: int, qtype: str, rng: np.random.Generator) -> tuple:
    """(data, scale) of a random [n, k] weight of ``qtype`` as the kernel takes them."""
    if qtype == "int8":
        data = rng.integers(-127, 128, (n, k), dtype=np.int8)
        return jnp.asarray(data), jnp.asarray(rng.uniform(1e-3, 1e-2, n).astype(np.float32))
    weights, size = cpu_quant_matmul.QTYPES[qtype]
    blocks = rng.integers(0, 256, (n * k // weights, size), dtype=np.uint8)
    for offset in _SCALE_OFFSETS[qtype]:
        scales = rng.uniform(1e-3, 2e-2, (blocks.shape[0], 1)).astype(np.float16)
        blocks[:, offset:offset + 2] = scales.view(np.uint8)
    return jnp.asarray(blocks.reshape(n, -1)), None


def _next_x(y: jax.Array, k: int) -> jax.Array:
    """The next product's input [R, k] from this one's output [R, N]."""
    return jnp.tanh(jnp.tile(y, (1, -(-k // y.shape[1])))[:, :k])


def chained(products: list[tuple[int, int]], head: bool, qtype: str | None, impl: str):
    """A jitted chain of the products: impl "quant" (cpu_quant_matmul), "f32" (cpu_matmul) or
    "xla" (jnp.dot on float32)."""
    def run(x, weights):
        for i, ((k, n), w) in enumerate(zip(products, weights)):
            is_head = head and i == len(products) - 1
            if impl == "quant":
                y = cpu_quant_matmul.quantized_matmul(x, *w, qtype=qtype, out_features=n)
            elif impl == "f32":
                y = cpu_matmul.matmul(x, w, transposed=is_head)
            else:
                y = jnp.dot(x, w.T if is_head else w)
            x = y if is_head else _next_x(y, products[(i + 1) % len(products)][0])
        return x

    return jax.jit(run)


def measure(case: str, qtype: str, rows_list: list[int], repeats: int, seed: int = 0) -> dict:
    """ms per call and rates for each row count: quant kernel, float32 kernel, XLA dot."""
    products, head = CASES[case]
    rng = np.random.default_rng(seed)
    quant = [random_weights(k, n, qtype, rng) for k, n in products]
    quant_bytes = sum(d.nbytes + (0 if s is None else s.nbytes) for d, s in quant)
    floats = [jnp.asarray(rng.standard_normal((n, k) if head and i == len(products) - 1
                                              else (k, n), np.float32))
              for i, (k, n) in enumerate(products)]
    float_bytes = sum(w.nbytes for w in floats)
    fns = {impl: chained(products, head, qtype, impl) for impl in ("quant", "f32", "xla")}
    args = {"quant": quant, "f32": floats, "xla": floats}
    results = {}
    for rows in rows_list:
        x = jnp.asarray(rng.standard_normal((rows, products[0][0])), jnp.float32)
        usable = {impl: fn for impl, fn in fns.items()
                  if impl != "f32" or rows <= cpu_matmul.MAX_ROWS}
        times: dict[str, list[float]] = {impl: [] for impl in usable}
        cpu_times: dict[str, list[float]] = {impl: [] for impl in usable}
        for repeat in range(repeats + 1):                                # the first compiles
            for impl, fn in usable.items():
                start, cpu_start = time.perf_counter(), time.process_time()
                fn(x, args[impl]).block_until_ready()
                if repeat:
                    times[impl].append(time.perf_counter() - start)
                    cpu_times[impl].append(time.process_time() - cpu_start)
        best = {impl: min(t) for impl, t in times.items()}
        cpu = {impl: min(t) for impl, t in cpu_times.items()}
        results[rows] = {
            "ms": {impl: 1000 * s for impl, s in best.items()},
            "cpu_ms": {impl: 1000 * s for impl, s in cpu.items()},
            "cpu_speedup_vs_f32": cpu["f32"] / cpu["quant"] if "f32" in cpu else None,
            "cpu_speedup_vs_xla": cpu["xla"] / cpu["quant"],
            "quant_gb_per_s": quant_bytes / best["quant"] / 1e9,
            "f32_gb_per_s": float_bytes / best["f32"] / 1e9 if "f32" in best else None,
            "speedup_vs_f32": best["f32"] / best["quant"] if "f32" in best else None,
            "speedup_vs_xla": best["xla"] / best["quant"]}
    return {"quant_bytes": quant_bytes, "float_bytes": float_bytes, "rows": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--types", nargs="+", choices=list(cpu_quant_matmul.QTYPES),
                        default=list(cpu_quant_matmul.QTYPES))
    parser.add_argument("--cases", nargs="+", choices=list(CASES),
                        default=["smollm2_step", "gemma3_o_down"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="benchmarks/results/quant_matmul_cpu.json")
    args = parser.parse_args()
    if not (cpu_quant_matmul.is_available() and cpu_matmul.is_available()):
        raise SystemExit("a CPU kernel could not be built (see the log)")
    bandwidth = read_bandwidth_gbs()
    print(f"read bandwidth (XLA reduction over 1 GiB): {bandwidth:.1f} GB/s; "
          f"load average {os.getloadavg()[0]:.2f}")
    print(f"{'case':<15}{'type':<6}{'rows':>5}{'ms':>9}{'GB/s':>7}{'of bw':>7}"
          f"{'f32 ms':>9}{'xla ms':>9}{'vs f32':>8}{'vs xla':>8}{'cpu ms':>9}{'cpu vs f32':>11}"
          f"{'cpu vs xla':>11}")
    report = {"machine": cpu_model(), "cores": len(os.sched_getaffinity(0)),
              "jax": jax.__version__, "read_bandwidth_gb_per_s": bandwidth, "cases": {}}
    for case in args.cases:
        k_quants_fit = all(k % 256 == 0 for k, _ in CASES[case][0])
        for qtype in args.types:
            if not k_quants_fit and cpu_quant_matmul.QTYPES[qtype][0] == 256:
                continue
            result = measure(case, qtype, args.rows, args.repeats)
            report["cases"].setdefault(case, {})[qtype] = result
            for rows, r in result["rows"].items():
                f32 = r["ms"].get("f32")
                print(f"{case:<15}{qtype:<6}{rows:>5}{r['ms']['quant']:>9.2f}"
                      f"{r['quant_gb_per_s']:>7.1f}{r['quant_gb_per_s'] / bandwidth:>7.0%}"
                      f"{f32 if f32 is not None else float('nan'):>9.2f}{r['ms']['xla']:>9.2f}"
                      f"{r['speedup_vs_f32'] or float('nan'):>7.2f}x{r['speedup_vs_xla']:>7.2f}x"
                      f"{r['cpu_ms']['quant']:>9.2f}"
                      f"{r['cpu_speedup_vs_f32'] or float('nan'):>10.2f}x"
                      f"{r['cpu_speedup_vs_xla']:>10.2f}x")
    report["load_average_after"] = os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
