"""Single-request decode speed of jaxllm vs HF transformers and llama.cpp on one model and prompt.

    python benchmarks/decode_speed.py [--model PATH] [--dtype float32|bfloat16] [--tokens 128]
        [--quantization auto|none|gguf|int8] [--repeats 3] [--llamacpp-model FILE.gguf]
        [--skip-llamacpp] [--skip-hf] [--out PATH.json]

Decode tokens/s = (N - 1) / (time to generate N tokens - time to generate 1 token), best of
``--repeats`` each, measured the same way for every engine in the same run (greedy, the same
prompt token ids, exactly N tokens), so prefill and start-up costs cancel. jaxllm and
transformers (``os.cpu_count()`` torch threads) run in ``--dtype``; llama.cpp (llama-cpp-python,
``pip install -e ".[bench]"``, one sequence, ``os.cpu_count()`` threads; see llamacpp_peer.py)
runs the model's own GGUF file (``--llamacpp-model`` for another), so its weights are the GGUF's
quantized ones (Q4_1 for the default model) whatever the dtype. Without llama-cpp-python or a
GGUF, its figures are null and ``llamacpp_note`` says why. Also reports the memory-bandwidth
floor: jaxllm's weight bytes read per step over a read bandwidth measured here. jaxllm keeps
its weights as ``--quantization`` says (the engine's option; its default "auto" keeps a GGUF's
quantized blocks), so its weight bytes are the quantized ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_peer import LlamaCppRunner, runnable_gguf  # noqa: E402

from jaxllm.cli_options import quantization_method  # noqa: E402

PROMPT = "The history of computing stretches from mechanical calculators to modern processors."


def _best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def bench_jaxllm(model, dtype, num_tokens, repeats, quantization="auto"):
    import jax

    from jaxllm import Engine, SamplingParams

    engine = Engine(model, dtype=dtype, max_num_seqs=1, max_model_len=1024, quantization=quantization)
    resolved = engine.config.quantization
    prompt_ids = engine.tokenizer.encode(PROMPT)
    run = lambda n: engine.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    run(num_tokens)  # compile every bucket the timed runs use
    t_n = _best_of(lambda: run(num_tokens), repeats)
    t_1 = _best_of(lambda: run(1), repeats)
    weight_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(engine.model_runner.params))
    model_dir = engine.model_dir
    engine.shutdown()
    return (num_tokens - 1) / (t_n - t_1), weight_bytes, model_dir, prompt_ids, resolved


def bench_hf(model_dir, dtype, prompt_ids, num_tokens, repeats):
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    ids = torch.tensor([prompt_ids])

    def run(n):
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    run(4)
    t_n = _best_of(lambda: run(num_tokens), repeats)
    t_1 = _best_of(lambda: run(1), repeats)
    return (num_tokens - 1) / (t_n - t_1)


def bench_llamacpp(gguf, prompt_ids, num_tokens, repeats):
    """(decode tokens/s, the model's description) of one llama.cpp sequence."""
    with LlamaCppRunner(gguf, n_parallel=1, n_ctx_seq=len(prompt_ids) + num_tokens) as runner:
        run = lambda n: runner.generate([{"prompt_token_ids": prompt_ids, "max_tokens": n}])
        run(4)
        t_n = _best_of(lambda: run(num_tokens), repeats)
        t_1 = _best_of(lambda: run(1), repeats)
    return (num_tokens - 1) / (t_n - t_1), runner.description


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
    parser.add_argument("--llamacpp-model", help="the GGUF llama.cpp runs (default: --model's)")
    parser.add_argument("--quantization", default="auto", type=quantization_method,
                        help="jaxllm's weights: auto, none, gguf or int8 (Engine's quantization)")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--skip-hf", action="store_true", help="do not measure transformers")
    parser.add_argument("--out", default="benchmarks/results/decode_speed.json")
    args = parser.parse_args()

    jax_tps, weight_bytes, model_dir, prompt_ids, quantization = bench_jaxllm(
        args.model, args.dtype, args.tokens, args.repeats, args.quantization)
    hf_tps = None if args.skip_hf else bench_hf(model_dir, args.dtype, prompt_ids, args.tokens,
                                                args.repeats)
    llamacpp_tps, llamacpp_weights = None, None
    gguf, llamacpp_note = runnable_gguf(args.model, args.llamacpp_model, args.skip_llamacpp)
    if gguf:
        llamacpp_tps, llamacpp_weights = bench_llamacpp(gguf, prompt_ids, args.tokens, args.repeats)
    bandwidth = read_bandwidth_gbs()
    floor_tps = bandwidth * 1e9 / weight_bytes
    result = {
        "model": str(model_dir), "dtype": args.dtype, "quantization": quantization,
        "tokens": args.tokens,
        "jaxllm_decode_tokens_per_s": jax_tps, "hf_decode_tokens_per_s": hf_tps,
        "llamacpp_decode_tokens_per_s": llamacpp_tps, "llamacpp_weights": llamacpp_weights,
        "llamacpp_note": llamacpp_note,
        "ratio_vs_hf": jax_tps / hf_tps if hf_tps else None,
        "ratio_vs_llamacpp": jax_tps / llamacpp_tps if llamacpp_tps else None,
        "weight_bytes": weight_bytes,
        "read_bandwidth_gb_s": bandwidth, "bandwidth_floor_tokens_per_s": floor_tps,
        "fraction_of_floor": jax_tps / floor_tps,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_report(result)


def print_report(result: dict) -> None:
    print(f"{'engine':<14}{'decode tok/s':>14}  weights")
    weights = result["dtype"] + (f", quantization={result['quantization']}"
                                 if result.get("quantization") else "")
    print(f"{'jaxllm':<14}{result['jaxllm_decode_tokens_per_s']:>14.1f}  {weights}")
    if result["hf_decode_tokens_per_s"]:
        print(f"{'transformers':<14}{result['hf_decode_tokens_per_s']:>14.1f}  {result['dtype']}")
    if result["llamacpp_decode_tokens_per_s"]:
        print(f"{'llama.cpp':<14}{result['llamacpp_decode_tokens_per_s']:>14.1f}  "
              f"{result['llamacpp_weights']}")
    if result["llamacpp_note"]:
        print(result["llamacpp_note"])
    ratios = [f"jaxllm/{peer} {result[key]:.2f}x" for peer, key in
              (("transformers", "ratio_vs_hf"), ("llama.cpp", "ratio_vs_llamacpp")) if result[key]]
    print(("ratio " + ", ".join(ratios) + "; " if ratios else "")
          + f"bandwidth floor {result['bandwidth_floor_tokens_per_s']:.1f} tok/s "
          f"({result['read_bandwidth_gb_s']:.1f} GB/s, {result['weight_bytes'] / 1e6:.0f} MB "
          f"weights): {100 * result['fraction_of_floor']:.0f}% of floor")


if __name__ == "__main__":
    main()
