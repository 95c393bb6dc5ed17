"""jaxllm on one GPU: a TinyLlama-1.1B-shaped model with random bfloat16 weights, in one run.

    bash benchmarks/gpu.sh                      # on an H100/H200: the whole thing (H200: 3 min)
    python benchmarks/gpu_benchmark.py [--attention pallas_gpu reference] [--json PATH]
        [--workdir DIR] [--seed 0] [--smoke] [--report PATH.json]
        [--sections hf hbm attention jaxllm sweep]

Needs only what a CUDA machine with jax, torch and transformers has: no downloads, no installs.

Model. transformers' ``LlamaConfig`` shaped like TinyLlama-1.1B (hidden 2048, intermediate 5632,
22 layers, 32 heads, 4 kv heads, vocab 32000, rope_theta 10000, 2048 positions), random init
with a fixed seed, saved as bfloat16 safetensors with a word-level tokenizer built locally
(``tokenizers``), so ``jaxllm.Engine(model_dir)`` and ``AutoModelForCausalLM`` load it as they
would any HF directory. Prompts are random vocabulary ids (``throughput.PromptSource`` without a
tokenizer); every request generates exactly its ``max_tokens`` (greedy, ``ignore_eos`` in jaxllm,
``min_new_tokens = max_new_tokens`` in transformers).

Sections, each in its own try/except (a failure is a "FAILED: <error>" cell, never a lost table)
and under a time budget (SIGALRM):
  hf          a subprocess (torch never shares the process with JAX): builds and saves the
              model on the GPU, then HF transformers ``generate`` (bfloat16, SDPA, one static
              batch of all requests, equal-length prompts so no padding): output tokens/s at each
              concurrency, and batch-1 ms/step (streamer timestamps of every decoding step).
  hbm         HBM copy bandwidth: a jitted ``x + 1`` over a 2 GiB uint32 array (read + write
              bytes / time, best of 10 after warm-up), and the weight bytes of the checkpoint:
              floor ms/step = weight bytes / bandwidth (every weight is read once per step).
  attention   one layer of ``get_attention("reference")`` vs ``get_attention("pallas_gpu")``,
              jitted with the KV cache donated: a decode step (64 rows, 1024 context each) and a
              512-token prefill chunk after 512 cached tokens, TinyLlama heads (32 q / 4 kv, dim
              64, block 16); ms per call (8 dependent calls in one jit, so that the device time
              is measured, not the host's dispatch), speedup, max |difference| of the outputs.
  jaxllm[A]   per ``--attention`` name A: one Engine (max_num_seqs = largest concurrency), then
              ``throughput.run_jaxllm`` (a replayed warm-up with other prompts compiles every
              bucket, then the measured run) for one request (batch-1 decode ms/step = its time
              per output token) and for 64 and 256 requests submitted at once (output tokens/s).
  attention_sweep  pallas_gpu decode with each of SWEEP_VARIANTS (context splits, warps, key
              chunk, pipeline stages) against the reference at four decode shapes, timed as in
              ``attention``: the data behind the kernel's defaults, printed as its own table.
              Then sliding-window decodes (64 rows x 4096 context, window 512, as in Gemma 3's
              local layers): the reference and pallas_gpu with and without the window, the
              window static and as a run-time operand (a scanned model's traced window), and
              the max |difference| of the windowed outputs.

``--sections`` runs a subset (``jaxllm`` needs the model that ``hf`` saves). The JSON
(``--json``, default ``$OUT/gpu_bench.json`` when ``$OUT`` is set) is rewritten after every
section; ``--report PATH`` prints the table of a saved (maybe partial) run. The markdown table
(metric, jaxllm, peer, ratio/floor) is printed last. ``--smoke`` runs it all on CPU with a
2-layer, hidden-64 model and a few requests (pallas_gpu skipped): a test of the script itself.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import PromptSource, make_workload, run_jaxllm

TINYLLAMA = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 5632,
             "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
             "max_position_embeddings": 2048, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
             "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
TINY = {**TINYLLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256}


@dataclasses.dataclass(frozen=True)
class Plan:
    """Sizes of one run: the GPU benchmark, or the CPU smoke test of this script."""

    model: dict
    concurrency: tuple[int, ...]      # requests submitted at once (one static batch in HF)
    prompt_len: int
    output_len: int
    batch1_output_len: int
    max_num_batched_tokens: int
    max_model_len: int
    block_size: int
    attn_decode: tuple[int, int]      # (rows, context per row)
    attn_prefill: tuple[int, int]     # (chunk tokens, tokens cached before the chunk)
    hbm_bytes: int
    timing_iters: int
    attention: tuple[str, ...]
    budgets: dict                     # seconds per section
    sweep_decode: tuple[tuple[int, int], ...] = ()   # (rows, context) of the decode sweep
    sweep_window: tuple[tuple[int, int, int], ...] = ()   # (rows, context, window) decodes
    scan_layers: bool | None = None   # None: the platform default (scanned on GPU)


GPU_PLAN = Plan(model=TINYLLAMA, concurrency=(64, 256), prompt_len=128, output_len=128,
                batch1_output_len=256, max_num_batched_tokens=2048, max_model_len=512,
                block_size=16, attn_decode=(64, 1024), attn_prefill=(512, 512), hbm_bytes=2 << 30,
                timing_iters=20, attention=("pallas_gpu", "reference"),
                sweep_decode=((64, 256), (256, 256), (64, 1024), (1, 2048)),
                sweep_window=((64, 4096, 512),),
                budgets={"hf": 150, "hbm": 30, "attention": 60, "jaxllm": 150, "sweep": 180})
# Few shape buckets (each costs a compilation), and scanned layers as on a GPU (faster to compile).
SMOKE_PLAN = Plan(model=TINY, concurrency=(2, 4), prompt_len=8, output_len=8, batch1_output_len=8,
                  max_num_batched_tokens=32, max_model_len=32, block_size=16, attn_decode=(4, 48),
                  attn_prefill=(16, 16), hbm_bytes=16 << 20, timing_iters=2,
                  attention=("reference",), sweep_decode=((4, 48),), sweep_window=((4, 48, 16),),
                  scan_layers=True,
                  budgets={"hf": 120, "hbm": 30, "attention": 60, "jaxllm": 120, "sweep": 60})


# ---------------------------------------------------------------- plumbing
class SectionTimeout(BaseException):
    """Raised by SIGALRM; a BaseException so the parts of a section do not swallow it."""


@contextlib.contextmanager
def time_limit(seconds: int):
    def expire(signum, frame):
        raise SectionTimeout(f"over its {seconds} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}".strip()


def save(results: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2, default=str))
        tmp.replace(path)


def run_section(results: dict, key: str, budget: int, body: Callable[[dict, Callable], None],
                json_path: Path | None) -> dict:
    """Runs ``body(entry, part)``, which fills ``entry`` (``part(key, fn)``: one part, saved as
    soon as it is done); an exception or the budget ends the section as failed."""
    entry: dict[str, Any] = {"status": "running"}
    results["sections"][key] = entry
    save(results, json_path)
    print(f"\n== {key} (budget {budget} s)", flush=True)
    start = time.perf_counter()
    try:
        with time_limit(budget):
            body(entry, lambda name, fn: run_part(entry, name, fn, lambda: save(results, json_path)))
        entry["status"] = "ok"
    except (Exception, SectionTimeout) as exc:  # noqa: BLE001 - reported, the next section runs
        traceback.print_exc()
        entry.update(status="failed", error=_error(exc))
    entry["seconds"] = time.perf_counter() - start
    save(results, json_path)
    print(f"== {key}: {entry['status']} in {entry['seconds']:.1f} s", flush=True)
    return entry


def run_part(entry: dict, key: str, body: Callable[[], dict], then: Callable[[], None]) -> None:
    """One part of a section: its result, or its error, under ``entry[key]``; then ``then()``."""
    try:
        entry[key] = body()
    except Exception as exc:  # noqa: BLE001 - reported in the table, the next part still runs
        traceback.print_exc()
        entry[key] = {"error": _error(exc)}
    then()


def import_jaxllm():
    """This checkout's jaxllm, installed or not.

    pyproject maps ``kernels/`` and ``checkpoints_convert/`` into the package (package-dir);
    without an install (or with one pointing at another checkout) the package is loaded from
    ROOT/jaxllm with ROOT on its ``__path__``, which gives the same mapping.
    """
    try:
        import jaxllm.checkpoints_convert
        import jaxllm.kernels

        if Path(jaxllm.__file__).resolve().parent == ROOT / "jaxllm":
            return jaxllm, "installed"
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "jaxllm" or m.startswith("jaxllm.")]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(
        "jaxllm", ROOT / "jaxllm" / "__init__.py",
        submodule_search_locations=[str(ROOT / "jaxllm"), str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["jaxllm"] = module
    spec.loader.exec_module(module)
    return module, f"loaded from {ROOT} (package-dir mapping, not installed)"


def make_workloads(model_dir: Path, plan: Plan, seed: int) -> dict[str, list[dict]]:
    """Equal-length random-id prompts: 'batch1' and one workload per concurrency, all distinct."""
    source = PromptSource(model_dir, None, seed)

    def workload(n: int, output_len: int) -> list[dict]:
        shape = SimpleNamespace(workload=None, seed=seed, num_requests=n, min_prompt=plan.prompt_len,
                                max_prompt=plan.prompt_len, min_output=output_len,
                                max_output=output_len)
        return make_workload(shape, source)

    loads = {"batch1": workload(1, plan.batch1_output_len)}
    for c in plan.concurrency:
        loads[str(c)] = workload(c, plan.output_len)
    return loads


# ---------------------------------------------------------------- model (torch, in the hf worker)
def build_model(plan: Plan, model_dir: Path, seed: int, device: str):
    """A random bfloat16 Llama of ``plan.model``'s shape with a local word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**plan.model)
    torch.manual_seed(seed)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(model_dir)

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"w{i}": i for i in range(3, config.vocab_size)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(model_dir)
    return model


def checkpoint_bytes(model_dir: Path) -> dict[str, int]:
    """Tensor bytes of the safetensors files, from their headers; and the embedding's share."""
    total = embedding = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                total += end - start
                embedding += (end - start) if name.endswith("embed_tokens.weight") else 0
    return {"weight_bytes": total, "embedding_bytes": embedding}


# ---------------------------------------------------------------- HF transformers (worker)
def hf_worker(plan: Plan, workdir: Path, seed: int) -> None:
    """Builds the model, then times HF generate; writes workdir/hf.json after every part."""
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count() or 1)
    out_path = workdir / "hf.json"
    entry: dict[str, Any] = {"torch": torch.__version__, "transformers": transformers.__version__,
                             "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                             "method": "one static batch per workload, generate(do_sample=False, "
                                       "min_new_tokens=max_new_tokens), SDPA attention"}
    start = time.perf_counter()
    model = build_model(plan, workdir / "model", seed, device)
    entry["build_s"] = time.perf_counter() - start
    entry["attn_implementation"] = getattr(model.config, "_attn_implementation", None)
    save(entry, out_path)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def generate(items: list[dict]) -> dict:
        ids = torch.tensor([r["prompt_token_ids"] for r in items], device=device)
        n = items[0]["max_tokens"]
        # A streamer: generate calls put() with the prompt, then once per decoding step.
        times: list[float] = []
        clock = SimpleNamespace(put=lambda _: times.append(time.perf_counter()), end=lambda: None)
        sync()
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                 pad_token_id=0, streamer=clock)
        sync()
        wall = time.perf_counter() - t0
        if out.shape[1] - ids.shape[1] != n:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {n}")
        steps = [t - t0 for t in times[1:]]   # [i] = when token i+1 of the batch appeared
        return {"requests": len(items), "wall_s": wall, "output_tokens": n * len(items),
                "output_tokens_per_s": n * len(items) / wall, "ttft_s": steps[0],
                "ms_per_step": 1000 * (steps[-1] - steps[0]) / (n - 1)}

    workloads = make_workloads(workdir / "model", plan, seed)
    start = time.perf_counter()
    generate([dict(r, max_tokens=4) for r in workloads["batch1"] * 2])
    entry["warmup_s"] = time.perf_counter() - start
    for key, items in workloads.items():
        print(f"HF transformers: {key} ...", flush=True)
        run_part(entry, key, lambda items=items: generate(items), lambda: save(entry, out_path))
    if device == "cuda":
        entry["max_memory_allocated_gb"] = torch.cuda.max_memory_allocated() / 1e9
        save(entry, out_path)


def hf_section(plan: Plan, workdir: Path, seed: int, smoke: bool, budget: int) -> Callable:
    def body(entry: dict, _part: Callable) -> None:
        out_path = workdir / "hf.json"
        out_path.unlink(missing_ok=True)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "hf",
               "--workdir", str(workdir), "--seed", str(seed)] + (["--smoke"] if smoke else [])
        try:
            proc = subprocess.run(cmd, check=False, timeout=budget - 5)
            failure = f"the hf worker exited with {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            failure = f"the hf worker ran over {budget - 5} s and was killed"
        if out_path.exists():
            entry.update(json.loads(out_path.read_text()))
        if failure:
            # Parts it finished stay in the entry; the section reports the worker's failure.
            raise RuntimeError(failure)
    return body


# ---------------------------------------------------------------- HBM floor
def hbm_section(plan: Plan, model_dir: Path) -> Callable:
    def body(entry: dict, _part: Callable) -> None:
        import jax
        import jax.numpy as jnp

        x = jnp.zeros((plan.hbm_bytes // 4,), jnp.uint32)
        bump = jax.jit(lambda a: a + jnp.uint32(1))
        bump(x).block_until_ready()
        best = float("inf")
        for _ in range(10):
            start = time.perf_counter()
            bump(x).block_until_ready()
            best = min(best, time.perf_counter() - start)
        bandwidth = 2 * x.nbytes / best                 # read + write
        entry.update(array_bytes=x.nbytes, copy_seconds=best, copy_bandwidth_gb_s=bandwidth / 1e9)
        del x
        entry.update(checkpoint_bytes(model_dir))
        entry["floor_ms_per_step"] = 1000 * entry["weight_bytes"] / bandwidth
        entry["method"] = ("jit(x + 1) over a uint32 array, (read + write bytes) / best of 10; "
                           "floor = all checkpoint weight bytes / that bandwidth")
    return body


# ---------------------------------------------------------------- attention kernels
def attention_case(rows: int, context: int, new: int, model: dict, block_size: int, seed: int):
    """q, k, v, k_cache, v_cache and AttentionMetadata of ``rows`` rows, each with ``context``
    cached tokens and ``new`` tokens in this step, laid out as ModelRunner does (block tables
    hold the cached context's blocks; blocks scattered over the pool; block 0 never used)."""
    import jax.numpy as jnp

    from jaxllm.kernels.paged_attention.metadata import AttentionMetadata

    heads, kv_heads = model["num_attention_heads"], model["num_key_value_heads"]
    head_dim = model["hidden_size"] // heads
    rng = np.random.default_rng(seed)
    per_row = -(-(context + new) // block_size)
    num_blocks = 1 + rows * per_row
    block_ids = (1 + rng.permutation(num_blocks - 1)).reshape(rows, per_row).astype(np.int32)
    num_tokens = rows * new
    positions = np.tile(np.arange(context, context + new, dtype=np.int32), rows)
    token_rows = np.repeat(np.arange(rows, dtype=np.int32), new)
    slots = block_ids[token_rows, positions // block_size] * block_size + positions % block_size
    width = max(1, -(-context // block_size))
    tables = np.zeros((rows, width), np.int32)
    tables[:, :-(-context // block_size)] = block_ids[:, :-(-context // block_size)]
    metadata = AttentionMetadata(
        positions=jnp.asarray(positions), slot_mapping=jnp.asarray(slots, jnp.int32),
        token_rows=jnp.asarray(token_rows), block_tables=jnp.asarray(tables),
        context_lens=jnp.full(rows, context, jnp.int32))

    def normal(*shape):
        return jnp.asarray(rng.standard_normal(shape, np.float32), jnp.bfloat16)

    cache_shape = (1, num_blocks, block_size, kv_heads, head_dim)
    return {"q": normal(num_tokens, heads, head_dim), "k": normal(num_tokens, kv_heads, head_dim),
            "v": normal(num_tokens, kv_heads, head_dim), "k_cache": normal(*cache_shape),
            "v_cache": normal(*cache_shape), "metadata": metadata, "scale": head_dim ** -0.5}


CALLS_PER_JIT = 8  # dependent attention calls per timed jit call


def _one_call(fn: Callable, case: dict) -> Callable:
    return lambda q, k, v, kc, vc, layer, metadata: fn(q, k, v, kc, vc, layer, metadata,
                                                       scale=case["scale"])


def _case_args(case: dict) -> tuple:
    """(q, k, v, k_cache, v_cache, layer, metadata), the caches fresh copies to donate."""
    import jax.numpy as jnp

    return (case["q"], case["k"], case["v"], jnp.copy(case["k_cache"]), jnp.copy(case["v_cache"]),
            jnp.int32(0), case["metadata"])


def attention_output(fn: Callable, case: dict) -> np.ndarray:
    """The output of one call, in float32."""
    import jax
    import jax.numpy as jnp

    out, _, _ = jax.jit(_one_call(fn, case), donate_argnums=(3, 4))(*_case_args(case))
    return np.asarray(out.astype(jnp.float32))


def time_attention(fn: Callable, case: dict, iters: int) -> float:
    """Best ms per attention call.

    The timed function makes CALLS_PER_JIT dependent calls (each output is the next query) in
    one jit with the cache donated, so a call of ~0.1 ms is timed on the device rather than as
    the host's dispatch of it; best of 3 repeats of ``iters`` such functions.
    """
    import jax

    one = _one_call(fn, case)

    def chained(q, k, v, kc, vc, layer, metadata):
        def body(_, carry):
            q, kc, vc = carry
            return one(q, k, v, kc, vc, layer, metadata)
        return jax.lax.fori_loop(0, CALLS_PER_JIT, body, (q, kc, vc))

    q, k, v, kc, vc, layer, metadata = _case_args(case)
    step = jax.jit(chained, donate_argnums=(3, 4))
    out, kc, vc = step(q, k, v, kc, vc, layer, metadata)        # compile
    best = float("inf")
    for _ in range(3):
        jax.block_until_ready((out, kc, vc))
        start = time.perf_counter()
        for _ in range(iters):
            out, kc, vc = step(q, k, v, kc, vc, layer, metadata)
        jax.block_until_ready((out, kc, vc))
        best = min(best, (time.perf_counter() - start) / (iters * CALLS_PER_JIT))
    return 1000 * best


def attention_section(plan: Plan, platform: str, seed: int) -> Callable:
    def body(entry: dict, _part: Callable) -> None:
        from jaxllm.kernels import get_attention

        rows, context = plan.attn_decode
        chunk, cached = plan.attn_prefill
        shapes = {"decode": {"rows": rows, "context": context - 1, "new": 1},
                  "prefill": {"rows": 1, "context": cached, "new": chunk}}
        entry["shapes"] = {
            "decode": f"{rows} rows x {context} context (1 new token each)",
            "prefill": f"{chunk}-token chunk after {cached} cached tokens",
            "heads": f"{plan.model['num_attention_heads']} q / {plan.model['num_key_value_heads']} kv,"
                     f" head dim {plan.model['hidden_size'] // plan.model['num_attention_heads']},"
                     f" block {plan.block_size}, bfloat16, one layer per call"}
        for name, shape in shapes.items():
            case = attention_case(**shape, model=plan.model, block_size=plan.block_size, seed=seed)
            timings: dict[str, Any] = {}
            entry[name] = timings
            outputs = {}
            for impl in ("reference", "pallas_gpu"):
                if impl == "pallas_gpu" and platform != "gpu":
                    timings[impl] = {"skipped": f"pallas_gpu needs a GPU; platform is {platform}"}
                    continue

                def measure(impl=impl, case=case, outputs=outputs):
                    outputs[impl] = attention_output(get_attention(impl), case)
                    return {"ms": time_attention(get_attention(impl), case, plan.timing_iters)}
                run_part(timings, impl, measure, then=lambda: None)
            if "ms" in timings["reference"] and "ms" in timings.get("pallas_gpu", {}):
                timings["speedup"] = timings["reference"]["ms"] / timings["pallas_gpu"]["ms"]
                timings["max_abs_diff"] = float(np.abs(outputs["reference"] - outputs["pallas_gpu"]).max())
    return body


# Launch parameters of the Pallas decode path tried against its defaults (the data behind them).
SWEEP_VARIANTS = ({}, {"num_splits": 1}, {"num_splits": 2}, {"num_splits": 4}, {"num_splits": 8},
                  {"num_splits": 16}, {"num_warps": 2}, {"num_warps": 8}, {"block_kv": 32},
                  {"block_kv": 128}, {"num_stages": 1}, {"num_stages": 3})


def _variant_name(options: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in options.items()) or "defaults"


def _time_variants(kernel: Callable, variants: dict[str, dict], case: dict, iters: int) -> dict:
    """Best ms per call of ``kernel`` with each variant's options, or why that variant failed."""
    timings: dict[str, Any] = {}
    for name, options in variants.items():
        try:
            timings[name] = time_attention(functools.partial(kernel, **options), case, iters)
        except Exception as exc:  # noqa: BLE001 - one variant failing is a result
            timings[name] = f"FAILED: {_error(exc)}"
    return timings


def attention_sweep_section(plan: Plan, platform: str, seed: int) -> Callable:
    """pallas_gpu decode at ``plan.sweep_decode`` shapes with each of SWEEP_VARIANTS, vs the
    reference, then the ``plan.sweep_window`` decodes with and without their window; one part
    per shape, saved as soon as it is measured."""
    def body(entry: dict, part: Callable) -> None:
        import jax.numpy as jnp

        from jaxllm.kernels import get_attention

        for rows, context in plan.sweep_decode:
            case = attention_case(rows=rows, context=context - 1, new=1, model=plan.model,
                                  block_size=plan.block_size, seed=seed)

            def measure(case=case) -> dict:
                timings = {"reference": time_attention(get_attention("reference"), case,
                                                       plan.timing_iters)}
                if platform != "gpu":
                    return {**timings, "pallas_gpu": f"skipped: needs a GPU; platform is {platform}"}
                variants = {_variant_name(options): options for options in SWEEP_VARIANTS}
                return {**timings, **_time_variants(get_attention("pallas_gpu"), variants, case,
                                                    plan.timing_iters)}
            part(f"{rows}x{context}", measure)

        for rows, context, window in plan.sweep_window:
            case = attention_case(rows=rows, context=context - 1, new=1, model=plan.model,
                                  block_size=plan.block_size, seed=seed)

            def measure_window(case=case, window=window) -> dict:
                reference = get_attention("reference")
                windowed_reference = functools.partial(reference, sliding_window=window)
                timings = {
                    "reference": time_attention(reference, case, plan.timing_iters),
                    f"reference, window={window}": time_attention(windowed_reference, case,
                                                                  plan.timing_iters)}
                if platform != "gpu":
                    return {**timings, "pallas_gpu": f"skipped: needs a GPU; platform is {platform}"}
                kernel = get_attention("pallas_gpu")
                # An array window is what a scanned model passes: read by the kernel at run
                # time, and the context splits sized for the whole context, not the window.
                variants = {"full attention": {},
                            f"window={window}": {"sliding_window": window},
                            f"window={window} as an operand": {"sliding_window": jnp.int32(window)}}
                timings.update(_time_variants(kernel, variants, case, plan.timing_iters))
                windowed_kernel = functools.partial(kernel, sliding_window=window)
                try:
                    timings["max_abs_diff"] = float(np.abs(
                        attention_output(windowed_kernel, case)
                        - attention_output(windowed_reference, case)).max())
                except Exception as exc:  # noqa: BLE001 - the timings above still stand
                    timings["max_abs_diff"] = f"FAILED: {_error(exc)}"
                return timings
            part(f"{rows}x{context} window {window}", measure_window)
    return body


# ---------------------------------------------------------------- jaxllm engine
def jaxllm_section(plan: Plan, model_dir: Path, attention: str, seed: int) -> Callable:
    def body(entry: dict, part: Callable) -> None:
        import jax

        from jaxllm import Engine

        max_seqs = max(plan.concurrency)
        blocks_per_seq = -(-plan.max_model_len // plan.block_size)
        options = {"dtype": "bfloat16", "attention": attention, "max_num_seqs": max_seqs,
                   "max_num_batched_tokens": max(plan.max_num_batched_tokens, max_seqs),
                   "max_model_len": plan.max_model_len, "block_size": plan.block_size,
                   "num_blocks": max_seqs * blocks_per_seq + 1}
        if plan.scan_layers is not None:
            options["scan_layers"] = plan.scan_layers
        entry["engine_options"] = options
        start = time.perf_counter()
        engine = Engine(str(model_dir), **options)
        init_s = entry["engine_init_s"] = time.perf_counter() - start
        try:
            entry["scan_layers"] = engine.config.scan_layers
            entry["weight_bytes_on_device"] = sum(
                x.nbytes for x in jax.tree_util.tree_leaves(engine.model_runner.params))
            workloads = make_workloads(model_dir, plan, seed)
            # Other prompts of the same lengths: the warm-up compiles every bucket of the
            # measured run without giving it prefix-cache hits.
            warm = make_workloads(model_dir, plan, seed + 1000)

            def measure(key: str) -> dict:
                result = run_jaxllm(SimpleNamespace(warmup="replay"), engine, init_s,
                                    workloads[key], warm[key])
                tpot = result["tpot_s"]["p50"]      # batch-1: that request's decode ms/step
                result["ms_per_step"] = None if tpot is None else 1000 * tpot
                return result

            for key in workloads:
                print(f"jaxllm[{attention}]: {key} ...", flush=True)
                part(key, lambda key=key: measure(key))
            print(f"jaxllm[{attention}]: batch1 with async_scheduling off ...", flush=True)
            engine._executor.async_scheduling = False   # the same engine, one step at a time
            part("batch1_sync", lambda: measure("batch1"))
            if all("error" in entry[key] for key in workloads):
                raise RuntimeError(f"every run failed; first: {entry['batch1']['error']}")
        finally:
            engine.shutdown()
    return body


# ---------------------------------------------------------------- table
def _bytes(n: int) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n / 1e3:.0f} kB"


def _cell(value: Any, width: int = 90) -> str:
    return str(value).replace("|", "/").replace("\n", " ")[:width]


def _part(results: dict, section: str, key: str | None = None) -> tuple[dict | None, str | None]:
    """(data, None) when present, else (None, why it is missing)."""
    entry = results.get("sections", {}).get(section)
    if entry is None:
        return None, "not run"
    if key is None:
        if entry.get("status") == "running":
            return None, "killed while running"
        return (entry, None) if "error" not in entry else (None, f"FAILED: {entry['error']}")
    part = entry.get(key)
    if isinstance(part, dict) and "error" not in part and "skipped" not in part:
        return part, None
    if isinstance(part, dict):
        return None, (f"FAILED: {part['error']}" if "error" in part else f"skipped: {part['skipped']}")
    if "error" in entry:
        return None, f"FAILED: {entry['error']}"
    return None, "killed while running" if entry.get("status") == "running" else "not run"


def table_rows(results: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    plan = results.get("plan", {})
    hbm, hbm_why = _part(results, "hbm")
    floor = hbm and hbm.get("floor_ms_per_step")
    if hbm:
        rows.append(("HBM copy bandwidth GB/s", f"{hbm['copy_bandwidth_gb_s']:.0f}",
                     f"{_bytes(hbm['weight_bytes'])} of weights", f"floor {floor:.3f} ms/step"))
    else:
        rows.append(("HBM copy bandwidth GB/s", hbm_why, "", ""))
    hf_b1, hf_b1_why = _part(results, "hf", "batch1")
    for attention in plan.get("attention", []):
        section = f"jaxllm[{attention}]"
        b1, why = _part(results, section, "batch1")
        ms = b1 and b1.get("ms_per_step")
        rows.append((f"batch-1 decode ms/step ({attention})", f"{ms:.2f}" if ms else why or "?",
                     f"{floor:.3f} (HBM floor)" if floor else f"HBM floor: {hbm_why}",
                     f"{ms / floor:.1f}x floor" if ms and floor else ""))
        sync, sync_why = _part(results, section, "batch1_sync")
        sync_ms = sync and sync.get("ms_per_step")
        rows.append((f"batch-1 decode ms/step ({attention}), async scheduling vs one step at a time",
                     f"{ms:.2f}" if ms else why or "?",
                     f"{sync_ms:.2f} (sync)" if sync_ms else sync_why or "?",
                     f"{sync_ms / ms:.2f}x faster" if ms and sync_ms else ""))
        rows.append((f"batch-1 decode ms/step ({attention}) vs HF", f"{ms:.2f}" if ms else why or "?",
                     f"{hf_b1['ms_per_step']:.2f} (HF)" if hf_b1 else f"HF: {hf_b1_why}",
                     f"{hf_b1['ms_per_step'] / ms:.2f}x faster" if ms and hf_b1 else ""))
        for c in plan.get("concurrency", []):
            run, why = _part(results, section, str(c))
            hf, hf_why = _part(results, "hf", str(c))
            tps = run and run["output_tokens_per_s"]
            rows.append((f"output tok/s, {c} concurrent ({attention})", f"{tps:.0f}" if tps else why,
                         f"{hf['output_tokens_per_s']:.0f} (HF)" if hf else f"HF: {hf_why}",
                         f"{tps / hf['output_tokens_per_s']:.2f}x HF" if tps and hf else ""))
    attention, attn_why = _part(results, "attention")
    for name in ("decode", "prefill"):
        label = (attention or {}).get("shapes", {}).get(name, name)
        part = (attention or {}).get(name) or {}
        ref = part.get("reference", {})
        kernel = part.get("pallas_gpu", {})

        def show(p):
            if "ms" in p:
                return f"{p['ms']:.3f}"
            return f"FAILED: {p['error']}" if "error" in p else (
                f"skipped: {p['skipped']}" if "skipped" in p else attn_why or "not run")
        speedup = (f"speedup {part['speedup']:.2f}x (max diff {part['max_abs_diff']:.2g})"
                   if "speedup" in part else "")
        rows.append((f"attention {name} ms/call, pallas_gpu vs reference: {label}", show(kernel),
                     f"{show(ref)} (reference)", speedup))
    return [(_cell(metric, 200), *(_cell(x) for x in cells)) for metric, *cells in rows]


def print_sweep(results: dict) -> None:
    """The decode sweep: ms per call of each pallas_gpu variant and of the reference."""
    sweep, why = _part(results, "attention_sweep")
    if sweep is None:
        print(f"\n(decode sweep: {why})")
        return
    print("\n| decode rows x context | variant | ms/call | reference (full) / variant |")
    print("| --- | --- | --- | --- |")
    for shape, timings in sweep.items():
        if not isinstance(timings, dict):
            continue
        if "error" in timings:
            print(f"| {shape} | | {_cell(timings['error'])} | |")
            continue
        ref = timings.get("reference")
        for name, ms in timings.items():
            if name == "max_abs_diff":
                diff = f"{ms:.2g}" if isinstance(ms, float) else _cell(ms)
                print(f"| {shape} | max abs diff, windowed pallas_gpu vs reference | {diff} | |")
                continue
            ratio = f"{ref / ms:.2f}x" if isinstance(ms, float) and isinstance(ref, float) else ""
            print(f"| {shape} | {name} | {f'{ms:.3f}' if isinstance(ms, float) else _cell(ms)} "
                  f"| {ratio} |")


def print_table(results: dict) -> None:
    print_sweep(results)
    print(f"\n### jaxllm GPU benchmark: {results.get('device', '?')}, jax {results.get('jax', '?')}"
          f"{' (SMOKE: tiny model on CPU)' if results.get('smoke') else ''}\n")
    print("| metric | jaxllm | peer | ratio/floor |")
    print("| --- | --- | --- | --- |")
    for row in table_rows(results):
        print("| " + " | ".join(row) + " |")


# ---------------------------------------------------------------- main
SECTIONS = ("hf", "hbm", "attention", "jaxllm", "sweep")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="tiny model on CPU: tests this script")
    parser.add_argument("--attention", nargs="+",
                        help="attention implementations for the engine runs (default: pallas_gpu "
                             "reference; --smoke: reference)")
    parser.add_argument("--workdir", help="where the model and caches go (default: a temp dir)")
    parser.add_argument("--json", help="results JSON (default $OUT/gpu_bench.json, else in workdir)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", metavar="JSON", help="print the table of a saved run and exit")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
                        help="run only these sections (default: all; jaxllm needs the model "
                             "that hf builds)")
    parser.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.report:
        results = json.loads(Path(args.report).read_text())
        print_table(results)
        return results
    plan = SMOKE_PLAN if args.smoke else GPU_PLAN
    if args.attention:
        plan = dataclasses.replace(plan, attention=tuple(args.attention))
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="jaxllm_gpu_bench_"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("JAXLLM_CACHE", str(workdir / "cache"))
    if args.worker == "hf":
        hf_worker(plan, workdir, args.seed)
        return None
    if args.smoke:
        os.environ["JAX_PLATFORMS"] = "cpu"
    else:
        # The HF worker's torch needs GPU memory while this process holds JAX's pool.
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.55")
    json_path = Path(args.json) if args.json else (
        Path(os.environ["OUT"]) / "gpu_bench.json" if os.environ.get("OUT") else workdir / "gpu_bench.json")

    import jax

    device = jax.devices()[0]
    platform = jax.default_backend()
    print(f"device: {device.device_kind} ({platform}, {jax.device_count()} device(s)); "
          f"jax {jax.__version__}; python {sys.version.split()[0]}", flush=True)
    _, how = import_jaxllm()
    print(f"jaxllm: {how}", flush=True)
    from jaxllm import kernels

    try:
        default = kernels.default_attention(platform)
    except Exception as exc:  # noqa: BLE001 - not there yet, or it refuses this platform
        default = f"unavailable ({_error(exc)})"
    results: dict[str, Any] = {
        "device": device.device_kind, "platform": platform, "jax": jax.__version__,
        "python": sys.version.split()[0], "smoke": args.smoke, "jaxllm_import": how,
        "default_attention": str(default),
        "registered_attention": sorted(getattr(kernels, "ATTENTION_IMPLEMENTATIONS", {})),
        "plan": {**dataclasses.asdict(plan), "attention": list(plan.attention),
                 "concurrency": list(plan.concurrency)},
        "workdir": str(workdir), "sections": {},
    }
    started = time.perf_counter()
    model_dir = workdir / "model"
    b = plan.budgets
    wanted = set(args.sections)
    if "hf" in wanted:
        run_section(results, "hf", b["hf"], hf_section(plan, workdir, args.seed, args.smoke,
                                                       b["hf"]), json_path)
    if "hbm" in wanted:
        run_section(results, "hbm", b["hbm"], hbm_section(plan, model_dir), json_path)
    if "attention" in wanted:
        run_section(results, "attention", b["attention"],
                    attention_section(plan, platform, args.seed), json_path)
    if "jaxllm" in wanted:
        for attention in plan.attention:
            run_section(results, f"jaxllm[{attention}]", b["jaxllm"],
                        jaxllm_section(plan, model_dir, attention, args.seed), json_path)
    if "sweep" in wanted:
        run_section(results, "attention_sweep", b["sweep"],
                    attention_sweep_section(plan, platform, args.seed), json_path)
    results["seconds"] = time.perf_counter() - started
    results["table"] = table_rows(results)
    save(results, json_path)
    print(f"\nsections took {results['seconds']:.0f} s", end="")
    if os.environ.get("GPU_SH_START"):
        print(f"; gpu.sh so far {time.time() - float(os.environ['GPU_SH_START']):.0f} s", end="")
    print(f"; results: {json_path}")
    print_table(results)
    return results


if __name__ == "__main__":
    main()
