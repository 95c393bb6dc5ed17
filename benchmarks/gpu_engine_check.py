"""On a GPU: does the engine give the same greedy tokens with the Pallas kernel as with the
reference attention? (The kernel's own tests run in Pallas interpret mode on CPU; this runs the
compiled Triton kernel inside the engine.)

    python benchmarks/gpu_engine_check.py MODEL_DIR [--prompts 16] [--tokens 32]
        [--attention pallas_gpu --against reference]

MODEL_DIR is any Llama checkpoint; ``benchmarks/gpu.sh`` passes the random TinyLlama-shaped model
it built. Both engines run in float32 with async scheduling, on the same random-id prompts of
mixed lengths (so steps mix prefill chunks and decodes), in one batch. Prints one JSON line:
sequences whose tokens are identical, the earliest divergence, and the largest difference of the
sampled tokens' logprobs up to it; exits 1 when fewer than all but one sequence match (a near-tie
in float32 may flip one argmax).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def run(model_dir: str, attention: str, prompts: list[list[int]], tokens: int) -> list:
    from jaxllm import Engine, SamplingParams

    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, logprobs=0)
    with Engine(model_dir, dtype="float32", attention=attention, max_num_seqs=len(prompts),
                max_model_len=512, max_num_batched_tokens=256) as engine:
        outputs = engine.generate(prompts, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, [o.outputs[0].logprobs[i][t].logprob
                                      for i, t in enumerate(o.outputs[0].token_ids)])
            for o in outputs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--attention", default="pallas_gpu", help="the implementation to check")
    parser.add_argument("--against", default="reference", help="the implementation to trust")
    args = parser.parse_args(argv)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(args.model_dir).vocab_size
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, min(1000, vocab), int(n)).tolist() for n in rng.integers(1, 300, args.prompts)]
    kernel = run(args.model_dir, args.attention, prompts, args.tokens)
    reference = run(args.model_dir, args.against, prompts, args.tokens)
    matches, first_divergence, max_logprob_diff = 0, None, 0.0
    for (k_ids, k_lps), (r_ids, r_lps) in zip(kernel, reference):
        same = next((i for i, (a, b) in enumerate(zip(k_ids, r_ids)) if a != b), len(r_ids))
        matches += same == len(r_ids)
        if same < len(r_ids):
            first_divergence = same if first_divergence is None else min(first_divergence, same)
        if same:
            max_logprob_diff = max(max_logprob_diff, float(np.max(np.abs(
                np.subtract(k_lps[:same], r_lps[:same])))))
    result = {"attention": args.attention, "against": args.against, "sequences": len(prompts), "identical": matches, "first_divergence": first_divergence,
              "max_logprob_diff": max_logprob_diff, "tokens": args.tokens}
    print("gpu_engine_check:", json.dumps(result), flush=True)
    return 0 if matches >= len(prompts) - 1 else 1


if __name__ == "__main__":
    sys.exit(main())
