"""The server's overhead: the load test's workload through ``jaxllm serve`` (HTTP, SSE, the
official ``openai`` client) against the same workload through the Engine in-process.

    python benchmarks/server_overhead.py [--model DIR] [--num-requests 200] [--concurrency 32]
        [--prompt-len 8] [--min-output 4] [--max-output 16] [engine options] [--out PATH.json]

Workload: N requests; request i has ``--prompt-len`` random token ids (numpy seed 0, below
min(vocab, 256)) and ``max_tokens = min_output + i % (max_output - min_output + 1)``, greedy with
``ignore_eos``, so every request generates exactly its max_tokens in every mode. Token-id prompts
keep tokenization out of the comparison (and work for a model without a tokenizer).

Modes, run one after the other (never two on the machine at once), each on a fresh engine with
the same options, each measured after an untimed pass of the same workload that compiles its
step shapes:
  server   ``python -m jaxllm serve`` in a subprocess; ``--concurrency`` AsyncOpenAI clients
           each stream requests one after another (``/v1/completions``, ``stream=True``).
  async    the same concurrency in-process: as many coroutines consuming
           ``Engine.generate_async`` (the server's own path, without HTTP).
  generate ``Engine.generate(all prompts)``: every request submitted at once (the ceiling).
Throughput is generated tokens / wall time of the whole run. TTFT for server and async is
measured by the caller: from the call to the first output carrying a token; for generate it
is RequestMetrics.time_to_first_token (submission to first token, queueing included: all N
requests arrive at t=0, so it is not comparable with the others' and is reported for
completeness).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from jaxllm.cli_options import add_engine_options, engine_options  # noqa: E402
from server_harness import running_server  # noqa: E402


def workload(args: argparse.Namespace, vocab: int) -> list[tuple[list[int], int]]:
    rng = np.random.default_rng(0)
    span = args.max_output - args.min_output + 1
    return [(rng.integers(0, min(vocab, 256), args.prompt_len).tolist(), args.min_output + i % span)
            for i in range(args.num_requests)]


def summary(wall: float, tokens: int, ttfts: list[float]) -> dict:
    ttfts = sorted(ttfts)
    return {"wall_s": round(wall, 3), "generated_tokens": tokens,
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_mean_ms": round(1000 * statistics.fmean(ttfts), 1),
            "ttft_p50_ms": round(1000 * ttfts[len(ttfts) // 2], 1),
            "ttft_p99_ms": round(1000 * ttfts[min(len(ttfts) - 1, int(len(ttfts) * 0.99))], 1)}


async def concurrent(requests: list, concurrency: int, one) -> tuple[float, int, list[float]]:
    """Runs ``one(prompt, max_tokens) -> (ttft, tokens)`` from ``concurrency`` workers."""
    queue = list(reversed(requests))
    ttfts: list[float] = []
    tokens = 0

    async def worker() -> None:
        nonlocal tokens
        while queue:
            ttft, count = await one(*queue.pop())
            ttfts.append(ttft)
            tokens += count

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - start, tokens, ttfts


def in_process(args: argparse.Namespace) -> tuple[dict, dict]:
    from jaxllm import Engine, RequestOutputKind, SamplingParams

    def params(max_tokens: int, kind=RequestOutputKind.CUMULATIVE) -> SamplingParams:
        return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, output_kind=kind)

    with Engine(args.model, **engine_options(args)) as engine:
        requests = workload(args, engine.model_config.vocab_size)

        async def one(prompt: list[int], max_tokens: int) -> tuple[float, int]:
            start, ttft, count = time.perf_counter(), None, 0
            async for out in engine.generate_async(prompt, params(max_tokens, RequestOutputKind.DELTA)):
                count += len(out.outputs[0].token_ids) if out.outputs else 0
                if ttft is None and count:
                    ttft = time.perf_counter() - start
            return ttft, count

        asyncio.run(concurrent(requests, args.concurrency, one))  # compiles the shapes
        async_result = summary(*asyncio.run(concurrent(requests, args.concurrency, one)))
        prompts, all_params = [p for p, _ in requests], [params(m) for _, m in requests]
        engine.generate(prompts, all_params, use_tqdm=False)
        start = time.perf_counter()
        outputs = engine.generate(prompts, all_params, use_tqdm=False)
        wall = time.perf_counter() - start
        generate_result = summary(wall, sum(len(o.outputs[0].token_ids) for o in outputs),
                                  [o.metrics.time_to_first_token for o in outputs])
        vocab = engine.model_config.vocab_size
    return {"async": async_result, "generate": generate_result}, {"vocab": vocab}


def through_server(args: argparse.Namespace, vocab: int, log: Path) -> dict:
    import openai

    requests = workload(args, vocab)
    with running_server(Path(args.model), log, "--served-model-name", "bench",
                        *_engine_flags(args)) as url:
        async def run() -> tuple[float, int, list[float]]:
            async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0,
                                          timeout=600) as client:
                async def one(prompt: list[int], max_tokens: int) -> tuple[float, int]:
                    start, ttft = time.perf_counter(), None
                    stream = await client.completions.create(
                        model="bench", prompt=prompt, max_tokens=max_tokens, temperature=0,
                        stream=True, stream_options={"include_usage": True},
                        extra_body={"ignore_eos": True})
                    count = 0
                    async for chunk in stream:
                        if ttft is None and chunk.choices:
                            ttft = time.perf_counter() - start
                        if chunk.usage:
                            count = chunk.usage.completion_tokens
                    return ttft, count
                return await concurrent(requests, args.concurrency, one)

        asyncio.run(run())  # compiles the shapes
        return summary(*asyncio.run(run()))


def _engine_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for field, value in engine_options(args).items():
        flag = "--" + field.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else flag.replace("--", "--no-", 1))
        elif value is not None:
            flags += [flag, str(value)]
    return flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=None,
                        help="HF directory or .gguf file; unset: the default SmolLM2-135M GGUF")
    parser.add_argument("--num-requests", type=int, default=200, help="requests in the workload")
    parser.add_argument("--concurrency", type=int, default=32, help="concurrent clients")
    parser.add_argument("--prompt-len", type=int, default=8, help="prompt tokens per request")
    parser.add_argument("--min-output", type=int, default=4, help="shortest max_tokens")
    parser.add_argument("--max-output", type=int, default=16, help="longest max_tokens")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_engine_options(parser, warmup=False)
    args = parser.parse_args()
    if args.model is None:
        from jaxllm.model_source import default_gguf_path

        args.model = str(default_gguf_path())

    results, info = in_process(args)
    with tempfile.TemporaryDirectory() as tmp:
        results["server"] = through_server(args, info["vocab"], Path(tmp) / "server.log")
    results["server_vs_async"] = {
        "throughput_ratio": round(results["server"]["tokens_per_s"] / results["async"]["tokens_per_s"], 3),
        "ttft_mean_extra_ms": round(results["server"]["ttft_mean_ms"] - results["async"]["ttft_mean_ms"], 1)}
    results["command"] = " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv])
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
