"""Decode step time under tensor parallelism on faked CPU devices, and what multi-host adds.

    python benchmarks/tensor_parallel.py [--model PATH] [--sizes 1 2 4] [--batch 1 8]
        [--tokens 32] [--gspmd] [--multihost] [--out PATH.json]

Each configuration builds an Engine in a fresh process whose CPU is split into devices
(``JAX_NUM_CPU_DEVICES``), generates greedily for ``--batch`` prompts of 16 tokens, and reports
the decode step time (t(N tokens) - t(1 token)) / (N - 1), best of two, after a run that
compiles. The faked devices share the machine's cores: a TP=N step does the same arithmetic
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


def measure(engine, batch: int, num_tokens: int) -> float:
    """Decode ms per step for ``batch`` greedy rows."""
    from jaxllm import SamplingParams

    prompts = [[(7 * r + i) % 1000 + 1 for i in range(16)] for r in range(batch)]

    def run(n: int) -> float:
        start = time.perf_counter()
        engine.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True),
                        use_tqdm=False)
        return time.perf_counter() - start

    run(num_tokens)   # compiles the prefill and decode shapes
    t_n, t_1 = min(run(num_tokens) for _ in range(2)), min(run(1) for _ in range(2))
    return (t_n - t_1) / (num_tokens - 1) * 1e3


def worker(spec: dict) -> dict:
    """One configuration, in this process (its devices already set by the environment)."""
    import jax

    if spec.get("process_id") is not None:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(spec["coordinator"], 2, spec["process_id"])
    from jaxllm import Engine
    from jaxllm.sharding import TensorParallel

    if spec.get("gspmd"):
        TensorParallel.attention = lambda self, attention_fn: attention_fn
    options = dict(max_num_seqs=max(spec["batch"]), max_model_len=256, warmup=False,
                   tensor_parallel_size=spec["tp"])
    if spec.get("attention"):
        options["attention"] = spec["attention"]
    engine = Engine(spec["model"], **options)
    if jax.process_index() > 0:
        engine.multihost.follow()
        engine.shutdown()
        return {}
    result = {f"batch{b}_ms": measure(engine, b, spec["tokens"]) for b in spec["batch"]}
    if engine.multihost is not None:
        mh = engine.multihost
        result.update(publish_ms_per_step=mh.publish_time_s / mh.num_steps * 1e3,
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
        spec = dict(model=model, batch=args.batch, tokens=args.tokens)
        devices = max(args.sizes)
        report: dict = {"devices": devices, "cpu_count": os.cpu_count(), "batch": args.batch,
                        "tokens": args.tokens}
        for tp in args.sizes:
            report[f"tp{tp}"] = run_config({**spec, "tp": tp}, devices)
            print(f"tp{tp}", report[f"tp{tp}"], flush=True)
        if args.gspmd:
            for name, gspmd in (("shard_map", False), ("gspmd", True)):
                report[f"tp2_reference_{name}"] = run_config(
                    {**spec, "tp": 2, "attention": "reference", "gspmd": gspmd}, devices)
                print(f"tp2_reference_{name}", report[f"tp2_reference_{name}"], flush=True)
        if args.multihost:
            report["tp2_1x2_devices"] = run_config({**spec, "tp": 2}, 2)
            report["tp2_2x1_processes"] = run_config({**spec, "tp": 2}, 1, processes=2)
            for name in ("tp2_1x2_devices", "tp2_2x1_processes"):
                print(name, report[name], flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
