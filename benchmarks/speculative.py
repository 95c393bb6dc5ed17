"""Speculative decoding: tokens/s with and without it, in one run.

    python benchmarks/speculative.py [--model PATH] [--quantization none|gguf|int8] [--k 4]
        [--single-tokens 200] [--repeats 3] [--method ngram|layer_skip|draft_model]
        [--num-layers N] [--draft PATH] [--num-requests 64] [--skip-batch] [--quick] [--out PATH.json]

Two engines on the same model, alive together: ``Engine(model)`` and ``Engine(model,
speculative_config=...)``: by default n-gram prompt lookup (``{"method": "ngram",
"num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}``); with
``--method layer_skip`` the target's first ``--num-layers`` layers as the draft; with
``--draft PATH`` (method draft_model) a draft model of the same tokenizer. Each measures,
after untimed warm-ups of the same shapes (``new_compilations`` in the JSON says none happened
while timed):

- single stream, greedy, ``--single-tokens`` output tokens (ignore_eos), per prompt type:
  ``copy`` asks for a ~200-token Python function back with one rename (completion style: the
  135M default model copies there, and barely in chat form); ``chat`` is a plain chat question
  (little to copy). tokens/s = output tokens / wall time of ``generate``, the best of
  ``--repeats`` runs that alternate between the engines (its prefill included, prefix-cached
  after the warm-up in both engines alike); plus the acceptance.
- the 64-request workload of ``benchmarks/throughput.py`` (same generator, same seed: prompts
  of 16..512 tokens of English text, 16..256 output tokens), all submitted at once; useful
  output tokens/s. Speculation only runs while at most ``disable_by_batch_size`` (4) sequences
  run, i.e. in the workload's tail.

Timings on a shared, noisy machine vary by 2x between runs (see DESIGN.md): compare the
ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from jaxllm.cli_options import quantization_method  # noqa: E402
from throughput import DEFAULTS, PromptSource, load_tokenizer, machine_description, make_workload  # noqa: E402

COPY_SOURCE = '''def moving_average(values, window):
    """Return the moving averages of values over a sliding window."""
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages


def normalise(values):
    """Scale values so that they sum to one."""
    total = sum(values)
    if total == 0:
        raise ValueError("cannot normalise values that sum to zero")
    return [value / total for value in values]
'''
COPY_PROMPT = ("Original file:\n```python\n" + COPY_SOURCE + "```\n\nThe same file with "
               "moving_average renamed to rolling_mean:\n```python\n")
CHAT_MESSAGE = "Tell me about the history of the city of Paris and what visitors can see there."


def spec_config(args: argparse.Namespace) -> dict[str, Any]:
    k = args.k
    if args.draft is not None:
        return {"model": args.draft, "num_speculative_tokens": k}
    if args.method == "layer_skip":
        return {"method": "layer_skip", "num_layers": args.num_layers, "num_speculative_tokens": k}
    return {"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4,
            "prompt_lookup_min": 2}


def single_stream(engines: dict, prompts: dict[str, str], num_tokens: int,
                  repeats: int) -> dict[str, dict[str, dict]]:
    """{engine name: {prompt name: result}}: the engines' timed runs alternate (plain,
    speculative, plain, ...), so that the machine's load drifts over both alike."""
    from jaxllm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=num_tokens, ignore_eos=True)
    results: dict[str, dict[str, dict]] = {name: {} for name in engines}
    for prompt_name, prompt in prompts.items():
        # Warm-up, twice: the first run compiles the uncached prefill, the second the prefill
        # of the prompt's uncached tail after its prefix-cache hit (what the timed runs do).
        for engine in engines.values():
            for _ in range(2):
                engine.generate(prompt, params)
        before = {name: engine.stats() for name, engine in engines.items()}
        walls: dict[str, list[float]] = {name: [] for name in engines}
        outs = {}
        for _ in range(repeats):
            for name, engine in engines.items():
                start = time.perf_counter()
                outs[name] = engine.generate(prompt, params)
                walls[name].append(time.perf_counter() - start)
        for name, engine in engines.items():
            after, wall, out = engine.stats(), min(walls[name]), outs[name]
            results[name][prompt_name] = {
                "tokens_per_s": len(out.outputs[0].token_ids) / wall, "wall_s": wall,
                "walls_s": walls[name],
                "num_steps": (after["num_steps"] - before[name]["num_steps"]) // repeats,
                "new_compilations": after["num_compilations"] - before[name]["num_compilations"],
                "num_draft_tokens": out.metrics.num_draft_tokens,
                "num_accepted_tokens": out.metrics.num_accepted_tokens,
                "acceptance_rate": (out.metrics.num_accepted_tokens / out.metrics.num_draft_tokens
                                    if out.metrics.num_draft_tokens else None),
                "token_ids": out.outputs[0].token_ids}
    return results


def batch(engine, workload: list[dict], warm: list[dict]) -> dict:
    from jaxllm import SamplingParams

    def run(items):
        params = [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True) for r in items]
        return engine.generate([{"prompt_token_ids": r["prompt_token_ids"]} for r in items], params,
                               use_tqdm=False)

    run(warm)
    before = engine.stats()
    start = time.perf_counter()
    outputs = run(workload)
    wall = time.perf_counter() - start
    after = engine.stats()
    tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
    return {"output_tokens_per_s": tokens / wall, "wall_s": wall, "output_tokens": tokens,
            "num_draft_tokens": after["spec_decode_num_draft_tokens"] - before["spec_decode_num_draft_tokens"],
            "num_accepted_tokens": (after["spec_decode_num_accepted_tokens"]
                                    - before["spec_decode_num_accepted_tokens"]),
            "new_compilations": after["num_compilations"] - before["num_compilations"],
            "token_ids": [o.outputs[0].token_ids for o in outputs]}


def measure(args, workloads) -> dict[str, dict]:
    """Both engines ("plain", "speculative") on the same model, alive together: single streams
    alternate between them; the batch workload runs on one, then the other."""
    from jaxllm import Engine

    engines = {}
    try:
        for name, speculative in (("plain", None), ("speculative", spec_config(args))):
            engines[name] = Engine(args.model, speculative_config=speculative,
                                   quantization=args.quantization)
        tokenizer = engines["plain"].tokenizer
        prompts = {"copy": COPY_PROMPT, "chat": tokenizer.apply_chat_template(
            [{"role": "user", "content": CHAT_MESSAGE}], tokenize=False, add_generation_prompt=True)}
        single = single_stream(engines, prompts, args.single_tokens, args.repeats)
        result = {name: {"single": single[name]} for name in engines}
        if workloads is not None:
            for name, engine in engines.items():
                result[name]["batch"] = batch(engine, *workloads)
        return result
    finally:
        for engine in engines.values():
            engine.shutdown()
        engines.clear()
        gc.collect()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir / .gguf (default SmolLM2-135M)")
    parser.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    parser.add_argument("--quantization", type=quantization_method, default="auto",
                        help="Engine's quantization: auto (its default), none, gguf, int8")
    parser.add_argument("--method", choices=("ngram", "layer_skip", "draft_model"), default="ngram")
    parser.add_argument("--num-layers", type=int, default=8, help="layer_skip: the layers kept")
    parser.add_argument("--draft", default=None, help="draft model dir / .gguf (method draft_model)")
    parser.add_argument("--single-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="timed single-stream runs (best kept)")
    parser.add_argument("--num-requests", type=int, default=DEFAULTS["num_requests"])
    parser.add_argument("--skip-batch", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for a smoke test")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if (args.method == "draft_model") != (args.draft is not None):
        parser.error("--draft goes with (and only with) --method draft_model")
    workloads = None
    if not args.skip_batch:
        sizes = dict(DEFAULTS, num_requests=args.num_requests, seed=0, workload=None)
        if args.quick:
            sizes.update(num_requests=4, min_prompt=8, max_prompt=32, min_output=4, max_output=8)
        from jaxllm.model_source import resolve_model

        model_dir = Path(resolve_model(args.model))
        source = PromptSource(model_dir, load_tokenizer(model_dir), 0)
        spec = argparse.Namespace(**sizes)
        workload = make_workload(spec, source)
        warm = [{"prompt_token_ids": source.make(len(r["prompt_token_ids"])), "max_tokens": r["max_tokens"]}
                for r in workload]
        workloads = (workload, warm)
    measured = measure(args, workloads)
    plain, spec = measured["plain"], measured["speculative"]
    result = {"machine": machine_description(), "speculative_config": spec_config(args),
              "quantization": args.quantization, "plain": plain, "speculative": spec,
              "note": "noisy shared machine: compare ratios within one run"}
    print(f"{'':<8}{'plain tok/s':>12}{'spec tok/s':>12}{'ratio':>8}{'accepted':>10}{'same':>6}{'compiled':>10}")
    for name in plain["single"]:
        p, s = plain["single"][name], spec["single"][name]
        rate = s["acceptance_rate"]
        print(f"{name:<8}{p['tokens_per_s']:>12.1f}{s['tokens_per_s']:>12.1f}"
              f"{s['tokens_per_s'] / p['tokens_per_s']:>8.2f}"
              f"{'-' if rate is None else f'{rate:.0%}':>10}{str(p['token_ids'] == s['token_ids']):>6}"
              f"{p['new_compilations'] + s['new_compilations']:>10}")
        result.setdefault("ratios", {})[name] = s["tokens_per_s"] / p["tokens_per_s"]
    if workloads is not None:
        p, s = plain["batch"], spec["batch"]
        print(f"{'batch':<8}{p['output_tokens_per_s']:>12.1f}{s['output_tokens_per_s']:>12.1f}"
              f"{s['output_tokens_per_s'] / p['output_tokens_per_s']:>8.2f}"
              f"{s['num_accepted_tokens']:>10}{str(p['token_ids'] == s['token_ids']):>6}"
              f"{p['new_compilations'] + s['new_compilations']:>10}")
        result.setdefault("ratios", {})["batch"] = s["output_tokens_per_s"] / p["output_tokens_per_s"]
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
