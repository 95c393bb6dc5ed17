"""Decode step time under tensor parallelism on faked CPU devices, and what multi-host adds.

    python benchmarks/tensor_parallel.py [--model PATH] [--sizes 1 2 4] [--batch 1 8]
        [--tokens 32] [--rounds 5] [--gspmd] [--multihost] [--out PATH.json]

One process whose CPU is split into max(sizes) devices (``JAX_NUM_CPU_DEVICES``) builds an
Engine per configuration, generates greedily for ``--batch`` prompts of 16 tokens, and reports
the decode step time (t(N tokens) - t(1 token)) / (N - 1), min and median of ``--rounds``
measured round-robin over the configurations (so a change of machine load hits all alike),
after a run that compiles. The faked devices share the machine's cores: a TP=N step does the same arithmetic
as TP=1 plus its collectives, so TP=N minus TP=1 is what the collectives (and the per-device
dispatch) cost, not a speed-up.

``--gspmd`` adds TP=2 with the reference attention, once inside ``shard_map`` (the engine's
way) and once left to GSPMD to partition (``TensorParallel.attention`` bypassed for the run).
``--multihost`` adds TP=2 over 2 jax.distributed processes of 1 device each (gloo) against one
process of 2 devices, with the leader's cost of publishing each step (``jaxllm.multihost``).

The default model is a random Llama (hidden 512, 8 heads, 4 kv heads, 4 layers, vocabulary
32000) built with transformers: no download.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def random_llama(path: Path) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
        bos_token_id=None, eos_token_id=None)).save_pretrained(path)
    return str(path)


def decode_ms(engine, batch: int, num_tokens: int) -> float:
    """Decode ms per step for ``batch`` greedy rows: (t(N tokens) - t(1 token)) / (N - 1)."""
    from jaxllm import SamplingParams

    prompts = [[(7 * r + i) % 1000 + 1 for i in range(16)] for r in range(batch)]

    def run(n: int) -> float:
        start = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
        return time.perf_counter() - start

    return (run(num_tokens) - run(1)) / (num_tokens - 1) * 1e3


def build(spec: dict, tp: int, attention: str | None = None, gspmd: bool = False):
    """An engine at ``tp``; ``gspmd``: attention left to GSPMD (no ``shard_map``)."""
    from jaxllm import Engine
    from jaxllm.sharding import TensorParallel

    options = dict(max_num_seqs=max(spec["batch"]), max_model_len=256, warmup=False,
                   tensor_parallel_size=tp)
    if attention:
        options["attention"] = attention
    wrap = TensorParallel.attention
    if gspmd:
        TensorParallel.attention = lambda self, attention_fn: attention_fn
    try:
        return Engine(spec["model"], **options)
    finally:
        TensorParallel.attention = wrap


def compare(engines: dict, spec: dict) -> dict:
    """Each engine's decode ms per step for each batch: measured round-robin ``rounds`` times
    (so load changes hit every configuration alike), min and median."""
    for engine in engines.values():   # compile the shapes the rounds use
        for b in spec["batch"]:
            decode_ms(engine, b, spec["tokens"])
    times: dict = {(name, b): [] for name in engines for b in spec["batch"]}
    for _ in range(spec["rounds"]):
        for name, engine in engines.items():
            for b in spec["batch"]:
                times[name, b].append(decode_ms(engine, b, spec["tokens"]))
    return {name: {f"batch{b}_ms": {"min": min(times[name, b]),
                                    "median": statistics.median(times[name, b])}
                   for b in spec["batch"]} for name in engines}


def worker(spec: dict) -> dict:
    """The configurations of ``spec``, in this process (its devices set by the environment)."""
    import jax

    if spec.get("process_id") is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(spec["coordinator"], 2, spec["process_id"])
    engines = {f"tp{tp}": build(spec, tp) for tp in spec["sizes"]}
    if spec.get("gspmd"):
        engines["tp2_reference_shard_map"] = build(spec, 2, "reference")
        engines["tp2_reference_gspmd"] = build(spec, 2, "reference", gspmd=True)
    if jax.process_index() > 0:
        for engine in engines.values():
            engine.multihost.follow()
            engine.shutdown()
        return {}
    result = compare(engines, spec)
    for name, engine in engines.items():
        if engine.multihost is not None:
            mh = engine.multihost
            result[name].update(publish_ms_per_step=mh.publish_time_s / mh.num_steps * 1e3,
                                bytes_per_step=mh.num_bytes / mh.num_steps, steps=mh.num_steps)
        engine.shutdown()
    return result


def run_config(spec: dict, devices: int, processes: int = 1) -> dict:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": str(devices)}
    if processes == 1:
        out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                             capture_output=True, text=True, timeout=1800)
        return _result(out.stdout, out.stderr, out.returncode)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    jobs = [subprocess.Popen([sys.executable, __file__, "--worker",
                              json.dumps({**spec, "process_id": i, "coordinator": coordinator})],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(processes)]
    try:
        outs = [job.communicate(timeout=1800) for job in jobs]
    finally:
        for job in jobs:
            if job.poll() is None:
                job.kill()
    return _result(outs[0][0], outs[0][1], jobs[0].returncode)


def _result(stdout: str, stderr: str, status: int) -> dict:
    if status != 0:
        raise RuntimeError(f"worker failed ({status}): {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="HF directory; unset: a random Llama")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--gspmd", action="store_true")
    parser.add_argument("--multihost", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_llama(Path(tmp) / "llama")
        spec = dict(model=model, batch=args.batch, tokens=args.tokens, rounds=args.rounds)
        report: dict = {"cpu_count": os.cpu_count(), "batch": args.batch, "tokens": args.tokens,
                        "rounds": args.rounds, "load_average": os.getloadavg()}
        report[f"{max(args.sizes)}_devices"] = run_config(
            {**spec, "sizes": args.sizes, "gspmd": args.gspmd}, max(args.sizes))
        print(report[f"{max(args.sizes)}_devices"], flush=True)
        if args.multihost:
            report["1_process_x_2_devices"] = run_config({**spec, "sizes": [2]}, 2)
            report["2_processes_x_1_device"] = run_config({**spec, "sizes": [2]}, 1, processes=2)
            for name in ("1_process_x_2_devices", "2_processes_x_1_device"):
                print(name, report[name], flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
