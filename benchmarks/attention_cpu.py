"""Attention time per engine step on CPU: the pure-JAX reference vs the C++ FFI kernel.

    python benchmarks/attention_cpu.py [--repeats 5] [--cases decode_64x512 prefill_512]

SmolLM2-135M attention shapes (30 layers, 9 query heads, 3 kv heads, head dim 64, block size
16, float32). Each case is one jitted step: a ``lax.scan`` over the 30 layers (the layer index
traced, as in the scanned model), each layer writing this step's K/V into the donated cache and
attending, its output feeding the next layer's q/k/v. Rows' blocks are shuffled through the
pool, and block tables are exactly as wide as the cached context (the reference's best case:
the model runner pads them to a bucket, and the reference gathers the padding too).

Windowed cases give every layer a sliding window (Gemma 3 has one on 5 layers of 6): the
kernel reads only the keys in the window, the reference reads them all and masks. They also time
the kernel on the same step without the window, in the same alternation (timed in separate runs
on a shared machine, the two differed by up to 2x from load alone), and report its speedup.

Reported per case: ms per step (minimum over the repeats; the two implementations alternate
call by call, so that on a shared machine both see the same load), and the K/V the step needs
from the cache in GB/s (cached keys the window leaves to a row's first token x rows x 30 layers
x K x H x 2 x 4 bytes, over the step time). For scale, one thread's plain streaming read is
measured first. Prints a table and writes ``benchmarks/results/attention_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jaxllm.kernels.paged_attention import cpu_ffi, reference
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata

NUM_LAYERS, NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 30, 9, 3, 64, 16

# name -> (rows, cached context per row, new tokens per row, sliding window; 0 = none)
CASES = {
    "decode_1x512": (1, 512, 1, 0),
    "decode_64x512": (64, 512, 1, 0),
    "decode_64x2048": (64, 2048, 1, 0),
    "decode_64x2048_w512": (64, 2048, 1, 512),
    "prefill_512": (1, 0, 512, 0),
    "chunk_512_on_1024": (1, 1024, 512, 0),
}
IMPLEMENTATIONS = {"reference": reference.paged_attention, "cpu": cpu_ffi.paged_attention}


def cpu_model() -> str:
    """The CPU's model name where /proc/cpuinfo has one, else the architecture."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


def streaming_read_gb_per_s(num_bytes: int = 1 << 30, repeats: int = 3) -> float:
    """One thread's plain streaming read (numpy max over a 1 GiB array): the scale for the
    GB/s columns on a machine whose bandwidth depends on what else runs on it."""
    array = np.ones(num_bytes // 4, np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        array.max()
        times.append(time.perf_counter() - start)
    return num_bytes / min(times) / 1e9


def make_step(rows: int, context: int, new: int, seed: int = 0):
    """The step's queries, a pool just big enough for it (block 0 reserved) and its token
    layout."""
    rng = np.random.default_rng(seed)
    context_blocks = -(-context // BLOCK_SIZE)
    blocks_per_row = -(-(context + new) // BLOCK_SIZE)
    num_blocks = 1 + rows * blocks_per_row
    block_ids = rng.permutation(np.arange(1, num_blocks)).reshape(rows, blocks_per_row)
    positions = np.tile(np.arange(context, context + new), rows)
    token_rows = np.repeat(np.arange(rows), new)
    slots = block_ids[token_rows, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE
    i32 = jnp.int32
    metadata = AttentionMetadata(
        positions=jnp.asarray(positions, i32), slot_mapping=jnp.asarray(slots, i32),
        token_rows=jnp.asarray(token_rows, i32),
        block_tables=jnp.asarray(block_ids[:, :max(context_blocks, 1)], i32),
        context_lens=jnp.full(rows, context, i32))
    x = jnp.asarray(rng.normal(size=(rows * new, NUM_HEADS, HEAD_DIM)), jnp.float32)
    return x, num_blocks, metadata


def compile_step(attention, window: int):
    """30 layers of attention under lax.scan, caches donated; every layer has the sliding
    ``window`` (0: none, a static full-attention layer)."""
    group = NUM_HEADS // NUM_KV_HEADS

    def step(x, k_cache, v_cache, metadata):
        def layer(carry, index):
            x, k_cache, v_cache = carry
            kv = x[:, ::group]                                         # [T, K, H]
            out, k_cache, v_cache = attention(x, kv, 0.5 * kv, k_cache, v_cache, index, metadata,
                                              scale=HEAD_DIM ** -0.5,
                                              sliding_window=window or None)
            return (out, k_cache, v_cache), None

        (x, k_cache, v_cache), _ = jax.lax.scan(layer, (x, k_cache, v_cache),
                                                jnp.arange(NUM_LAYERS, dtype=jnp.int32))
        return x, k_cache, v_cache

    return jax.jit(step, donate_argnums=(1, 2))


def measure(rows: int, context: int, new: int, repeats: int, window: int = 0) -> dict:
    """Times both implementations (and with a window, the kernel without it: "cpu_no_window"),
    alternating call by call so that all see the same load on a shared machine; the caches pass
    from one to the next (all write the same K/V)."""
    x, num_blocks, metadata = make_step(rows, context, new)
    shape = (NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    keys = min(context, window - 1) if window > 0 else context   # cached keys a row's first sees
    kv_bytes = rows * keys * NUM_LAYERS * NUM_KV_HEADS * HEAD_DIM * 2 * 4
    steps = {name: compile_step(attention, window) for name, attention in IMPLEMENTATIONS.items()}
    if window:
        steps["cpu_no_window"] = compile_step(cpu_ffi.paged_attention, 0)
    k_cache, v_cache = jnp.zeros(shape), jnp.zeros(shape)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for repeat in range(repeats + 1):                                   # the first compiles
        for name, step in steps.items():
            start = time.perf_counter()
            out, k_cache, v_cache = step(x, k_cache, v_cache, metadata)
            out.block_until_ready()
            if repeat:
                times[name].append(time.perf_counter() - start)
    result = {"rows": rows, "context": context, "new_tokens": new, "window": window,
              "kv_bytes": kv_bytes}
    for name, seconds in times.items():
        result[name] = {"ms": 1000 * min(seconds), "gb_per_s": kv_bytes / min(seconds) / 1e9}
    result["speedup"] = result["reference"]["ms"] / result["cpu"]["ms"]
    if window:
        result["window_speedup"] = result["cpu_no_window"]["ms"] / result["cpu"]["ms"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", default="benchmarks/results/attention_cpu.json")
    args = parser.parse_args()
    if not cpu_ffi.is_available():
        raise SystemExit("the CPU attention kernel could not be built (see the log)")
    roof = streaming_read_gb_per_s()
    results = {}
    for name in args.cases:
        rows, context, new, window = CASES[name]
        results[name] = measure(rows, context, new, args.repeats, window=window)
    report = {"machine": cpu_model(),
              "cores": len(os.sched_getaffinity(0)), "load_average": os.getloadavg(),
              "jax": jax.__version__, "streaming_read_gb_per_s": roof,
              "shapes": {"layers": NUM_LAYERS, "heads": NUM_HEADS, "kv_heads": NUM_KV_HEADS,
                         "head_dim": HEAD_DIM, "block_size": BLOCK_SIZE, "dtype": "float32"},
              "cases": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"streaming read, 1 thread: {roof:.1f} GB/s")
    print(f"{'case':<22}{'ref ms':>10}{'cpu ms':>10}{'speedup':>9}{'ref GB/s':>10}{'cpu GB/s':>10}")
    for name, r in results.items():
        rates = [f"{r[impl]['gb_per_s']:>10.2f}" if r["context"] else f"{'-':>10}"
                 for impl in ("reference", "cpu")]
        print(f"{name:<22}{r['reference']['ms']:>10.1f}{r['cpu']['ms']:>10.1f}"
              f"{r['speedup']:>8.1f}x{''.join(rates)}")
    for name, r in results.items():
        if r["window"]:
            print(f"{name}: cpu with window {r['window']} {r['cpu']['ms']:.1f} ms, without "
                  f"{r['cpu_no_window']['ms']:.1f} ms: {r['window_speedup']:.1f}x")


if __name__ == "__main__":
    main()
