"""What a quantized KV cache (``kv_cache_dtype`` int8 / fp8) buys and costs on SmolLM2-135M.

    python benchmarks/kv_cache_dtype.py [--model PATH] [--dtypes auto,int8,fp8]
        [--kv-cache-memory-bytes 1073741824] [--tokens 256] [--rows 64] [--prompt 256]
        [--outputs 64] [--repeats 20] [--attention-only] [--out PATH.json]

For each cache dtype, one engine with the same KV budget (``--kv-cache-memory-bytes``), and:

* ``max_num_cached_tokens``: the tokens its cache holds at once (``stats()["kv_cache_max_tokens"]``)
  and its KV bytes per token;
* accuracy against "auto": "auto" generates ``--tokens`` greedy tokens after a chat prompt; each
  engine then scores that same sequence as a prompt (``prompt_logprobs``, teacher forcing: every
  position sees the same context) -> mean and max |logprob difference| of the actual tokens and
  the fraction of positions whose top-1 token equals auto's; and each generates ``--tokens``
  greedy tokens itself -> how many equal auto's before the first difference, and auto's top-two
  logprob gap there (a near-tie or not);
* decode step time: one step of ``--rows`` sequences of ``--prompt`` + ``--outputs`` tokens,
  through the ModelRunner as ``sampling_features.py`` drives it: best and median of
  ``--repeats``, timed in rounds of one step per dtype (the engines are all kept open).

``--attention-only`` times instead the attention of one step alone, SmolLM2's 30 layers through
the CPU kernel as ``attention_cpu.py`` builds it (decode 64 x 512, decode 1 x 512, a 512-token
prefill), on a float32 cache and each quantized one, alternating call by call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time

import numpy as np
from sampling_features import _batch

ATTENTION_CASES = {"decode_64x512": (64, 512, 1), "decode_1x512": (1, 512, 1),
                   "prefill_512": (1, 0, 512)}

PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper who "
                                      "finds a message in a bottle. Describe every day of it."}]


def _top1(position) -> int:
    return next(t for t, lp in position.items() if lp.rank == 1)


def _score(engine, sequence: list[int], num_prompt: int, top: int):
    """prompt_logprobs of ``sequence`` from position ``num_prompt`` on: (actual tokens'
    logprobs, top-1 ids, top-two gaps)."""
    from jaxllm import SamplingParams

    out = engine.generate({"prompt_token_ids": sequence},
                          SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=top),
                          use_tqdm=False)
    positions = out.prompt_logprobs[num_prompt:]
    chosen = np.array([p[t].logprob for p, t in zip(positions, sequence[num_prompt:])])
    gaps = [np.subtract(*sorted((lp.logprob for lp in p.values()), reverse=True)[:2])
            for p in positions]
    return chosen, [_top1(p) for p in positions], gaps


def _decode_step(engine, batch):
    """One whole step (prepare, dispatch, fetch) of ``batch`` as a function, run twice untimed
    (the first compiles, or loads from JAX's cache)."""
    runner = engine.model_runner

    def step():
        runner.fetch(batch, runner.dispatch(batch, runner.prepare_inputs(batch)))

    step()
    step()
    return step


def attention_times(dtypes: list[str], repeats: int) -> dict[str, dict[str, float]]:
    """ms per step (best of ``repeats``) of the CPU kernel's attention over 30 layers, per case
    and cache dtype ("auto" = float32)."""
    from attention_cpu import (BLOCK_SIZE, HEAD_DIM, NUM_KV_HEADS, NUM_LAYERS, compile_step,
                               make_step)
    from jaxllm.kernels.paged_attention import cpu_ffi, quantized_kv

    step = compile_step(cpu_ffi.paged_attention, 0)
    result = {}
    for case, (rows, context, new) in ATTENTION_CASES.items():
        x, num_blocks, metadata = make_step(rows, context, new)
        shape = (NUM_LAYERS, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
        caches = {d: tuple(quantized_kv.allocate(shape, "float32" if d == "auto" else d)
                           for _ in "kv") for d in dtypes}
        times: dict[str, list[float]] = {d: [] for d in dtypes}
        for repeat in range(repeats + 1):                            # the first compiles
            for dtype in dtypes:
                start = time.perf_counter()
                out, *cache = step(x, *caches[dtype], metadata)
                out.block_until_ready()
                caches[dtype] = tuple(cache)
                if repeat:
                    times[dtype].append(time.perf_counter() - start)
        result[case] = {d: 1e3 * min(t) for d, t in times.items()}
        print(case, json.dumps(result[case]), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtypes", default="auto,int8,fp8")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1024**3)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--outputs", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.attention_only:
        result = {"attention_ms": attention_times(args.dtypes.split(","), args.repeats)}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return

    from jaxllm import Engine, SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    result: dict = {"kv_cache_memory_bytes": args.kv_cache_memory_bytes, "dtypes": {}}
    reference, steps = None, {}
    with contextlib.ExitStack() as stack:
        for dtype in args.dtypes.split(","):
            engine = stack.enter_context(Engine(args.model, kv_cache_dtype=dtype,
                                                max_num_seqs=args.rows,
                                                kv_cache_memory_bytes=args.kv_cache_memory_bytes))
            prompt = engine.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
            prompt = list(getattr(prompt, "input_ids", prompt))
            generated = list(engine.generate({"prompt_token_ids": prompt}, greedy,
                                             use_tqdm=False).outputs[0].token_ids)
            if reference is None:
                reference = {"dtype": dtype, "generated": generated}
            chosen, top1, gaps = _score(engine, prompt + reference["generated"], len(prompt), top=2)
            if dtype == reference["dtype"]:
                reference.update(chosen=chosen, top1=top1, gaps=gaps)
            same = next((i for i, (a, b) in enumerate(zip(generated, reference["generated"]))
                         if a != b), len(generated))
            stats = engine.stats()
            result["dtypes"][dtype] = entry = {
                "cache_dtype": stats["kv_cache_dtype"],
                "kv_bytes_per_token": engine.model_config.kv_cache_bytes_per_token(
                    engine.config.cache_dtype),
                "max_num_cached_tokens": stats["kv_cache_max_tokens"],
                "mean_abs_logprob_diff": float(np.abs(chosen - reference["chosen"]).mean()),
                "max_abs_logprob_diff": float(np.abs(chosen - reference["chosen"]).max()),
                "teacher_forced_top1_agreement": float(np.mean(
                    np.equal(top1, reference["top1"]))),
                "greedy_tokens_equal_before_first_difference": same,
                "reference_top2_gap_at_first_difference": (
                    float(reference["gaps"][same]) if same < len(generated) else None),
            }
            print(dtype, json.dumps(entry), flush=True)
            needed = 1 + args.rows * -(-(args.prompt + args.outputs) // engine.config.block_size)
            if engine.config.num_blocks < needed:
                raise SystemExit(f"{dtype}: the decode step needs {needed} KV blocks, the budget "
                                 f"holds {engine.config.num_blocks}: raise --kv-cache-memory-bytes")
            steps[dtype] = _decode_step(engine, _batch(
                engine, args.rows, args.prompt, args.outputs,
                SamplingParams(temperature=0.8, max_tokens=512), seed=1))
        # Timed in rounds, one step of each dtype per round, so that load from other processes
        # falls on all of them alike.
        times: dict[str, list[float]] = {dtype: [] for dtype in steps}
        for _ in range(args.repeats):
            for dtype, step in steps.items():
                start = time.perf_counter()
                step()
                times[dtype].append(time.perf_counter() - start)
        for dtype, seconds in times.items():
            result["dtypes"][dtype]["decode_step"] = {
                "best_ms": 1e3 * min(seconds), "median_ms": 1e3 * statistics.median(seconds)}
    result.update(prompt_tokens=len(prompt), scored_tokens=len(reference["generated"]),
                  rows=args.rows, context=args.prompt + args.outputs)
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
