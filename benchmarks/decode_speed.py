"""Single-request decode speed of jaxllm vs HF transformers on the same model and prompt.

    python benchmarks/decode_speed.py [--model PATH] [--dtype float32] [--tokens 128]

Decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1 token), measured
the same way for both engines in the same run, so prefill and start-up costs cancel. Also reports
the memory-bandwidth floor: weight bytes read per step over a read bandwidth measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

PROMPT = "The history of computing stretches from mechanical calculators to modern processors."


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_jaxllm(model, dtype, num_tokens, repeats):
    import jax

    from jaxllm import Engine, SamplingParams

    engine = Engine(model, dtype=dtype, max_num_seqs=1, max_model_len=1024)
    prompt_ids = engine.tokenizer.encode(PROMPT)
    run = lambda n: engine.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    run(num_tokens)  # compile every bucket the timed runs use
    t_n = _best_of(lambda: run(num_tokens), repeats)
    t_1 = _best_of(lambda: run(1), repeats)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.model_runner.params))
    model_dir = engine.model_dir
    engine.shutdown()
    return (num_tokens - 1) / (t_n - t_1), weight_bytes, model_dir


def bench_hf(model_dir, dtype, num_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor([AutoTokenizer.from_pretrained(model_dir).encode(PROMPT)])

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(4)
    t_n = _best_of(lambda: run(num_tokens), repeats)
    t_1 = _best_of(lambda: run(1), repeats)
    return (num_tokens - 1) / (t_n - t_1)


def read_bandwidth_gbs() -> float:
    """Bytes/s of a reduction over a 1 GiB float32 array, best of 5."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((256, 1024, 1024), jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    seconds = _best_of(lambda: total(x).block_until_ready(), 5)
    return x.nbytes / seconds / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = parser.parse_args()

    jax_tps, weight_bytes, model_dir = bench_jaxllm(args.model, args.dtype, args.tokens, args.repeats)
    hf_tps = bench_hf(model_dir, args.dtype, args.tokens, args.repeats)
    bandwidth = read_bandwidth_gbs()
    floor_tps = bandwidth * 1e9 / weight_bytes
    result = {
        "model": str(model_dir), "dtype": args.dtype, "tokens": args.tokens,
        "jaxllm_decode_tokens_per_s": jax_tps, "hf_decode_tokens_per_s": hf_tps,
        "ratio_vs_hf": jax_tps / hf_tps, "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bandwidth, "bandwidth_floor_tokens_per_s": floor_tps,
        "fraction_of_floor": jax_tps / floor_tps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{'engine':<14}{'decode tok/s':>14}")
    print(f"{'jaxllm':<14}{jax_tps:>14.1f}")
    print(f"{'transformers':<14}{hf_tps:>14.1f}")
    print(f"ratio {jax_tps / hf_tps:.2f}x; bandwidth floor {floor_tps:.1f} tok/s "
          f"({bandwidth:.1f} GB/s, {weight_bytes / 1e6:.0f} MB weights): "
          f"{100 * jax_tps / floor_tps:.0f}% of floor")


if __name__ == "__main__":
    main()
