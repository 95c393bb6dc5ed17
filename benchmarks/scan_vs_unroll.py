"""Engine start-up and batch-1 decode speed with scanned vs unrolled layers.

    python benchmarks/scan_vs_unroll.py [--model PATH | --random-layers 22] [--dtype float32]
        [--tokens 128] [--out PATH.json]

For each layout (``EngineConfig.scan_layers`` True / False), builds an Engine, generates
``--tokens`` tokens greedily for one prompt (compiling what that needs: "first_run_s"), then
again, timed: ms per decode step is that request's time per output token, and the host's share
comes from ``engine.stats()`` (host work per step; with async scheduling it overlaps the device).
This is the measurement behind ``scan_layers=None`` picking per platform. On a GPU a scanned
model runs its layers as an XLA while loop, whose trip condition goes back to the host every
iteration; unrolled, the step is one straight sequence of kernels.

``--random-layers N`` measures a random Llama of N layers (hidden 512, 8 heads of 64, 4 kv heads,
vocabulary 32000; no download, built with transformers) instead of a checkpoint: its weights are
small, so the per-step overheads that depend on the layer count stand out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path


def random_llama(num_layers: int, path: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408,
                         num_hidden_layers=num_layers, num_attention_heads=8, num_key_value_heads=4,
                         max_position_embeddings=1024, bos_token_id=None, eos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(path)
    return str(path)


def measure(model: str | None, dtype: str, scan: bool, num_tokens: int) -> dict:
    from jaxllm import Engine, SamplingParams

    start = time.perf_counter()
    engine = Engine(model, dtype=dtype, scan_layers=scan, max_num_seqs=1, max_model_len=1024)
    init_s = time.perf_counter() - start
    prompt = list(range(3, 35))
    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    try:
        start = time.perf_counter()
        engine.generate(prompt, params, use_tqdm=False)
        first_s = time.perf_counter() - start
        before = engine.stats()
        out = engine.generate(prompt, params, use_tqdm=False)
        after = engine.stats()
    finally:
        engine.shutdown()
    steps = after["num_steps"] - before["num_steps"]
    m = out.metrics
    return {"engine_init_s": init_s, "first_run_s": first_s,
            "ms_per_step": 1000 * (m.last_token_time - m.first_token_time) / (num_tokens - 1),
            "host_ms_per_step": 1000 * (after["host_time_s"] - before["host_time_s"]) / steps,
            "device_wait_ms_per_step": 1000 * (after["device_wait_time_s"] - before["device_wait_time_s"]) / steps}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default SmolLM2-135M)")
    parser.add_argument("--random-layers", type=int, help="measure a random Llama of this many layers")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results/scan_vs_unroll.json")
    args = parser.parse_args(argv)
    import jax

    model = args.model
    if args.random_layers:
        model = random_llama(args.random_layers, Path(tempfile.mkdtemp(prefix="scan_vs_unroll_")))
    results = {"platform": jax.default_backend(), "device": jax.devices()[0].device_kind,
               "model": args.model or (f"random Llama, {args.random_layers} layers" if args.random_layers
                                       else "SmolLM2-135M-Instruct"),
               "dtype": args.dtype, "tokens": args.tokens}
    for layout in ("scanned", "unrolled"):
        results[layout] = measure(model, args.dtype, layout == "scanned", args.tokens)
        print(f"{layout}: " + ", ".join(f"{k} {v:.2f}" for k, v in results[layout].items()), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
