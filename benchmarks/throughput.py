"""Offline throughput of jaxllm vs HF transformers (static batches) and llama.cpp on one workload.

    python benchmarks/throughput.py [--model PATH] [--dtype float32] [--num-requests 64]
        [--min-prompt 16 --max-prompt 512 --min-output 16 --max-output 256 --seed 0]
        [--workload FILE.json] [--max-num-seqs 64] [--max-num-batched-tokens 512]
        [--quantization auto|none|gguf|int8] [--hf-batch-size 16] [--skip-hf] [--llamacpp-parallel 16] [--llamacpp-model FILE.gguf]
        [--skip-llamacpp] [--skip-jaxllm] [--concurrency 1 4 16 64] [--plot PATH.png]
        [--warmup replay|short] [--quick] [--out PATH.json]

Workload. N requests with prompt and output lengths drawn uniformly (inclusive) from the ranges
with numpy's ``default_rng(seed)``, or read from ``--workload FILE``: a JSON list of
``{"prompt_token_ids": [...], "max_tokens": N}``. Prompt token ids are real English: a built-in
text (PASSAGE below) tokenized once with the model's tokenizer and read cyclically from a
different start offset per request (offsets are distinct modulo the text's length, so no two
prompts share a first KV block and the prefix cache cannot help; the JSON reports the prefix-
cached token count, which should be 0). A model without a tokenizer (tests' tiny random Llama)
gets uniform random ids from the vocabulary, excluding its bos/eos/pad ids. Every request
generates exactly its ``max_tokens``: greedy, ``ignore_eos=True`` in jaxllm; in transformers
``min_new_tokens = max_new_tokens`` (this masks the EOS logits; harmless for throughput).

jaxllm. ``Engine(model, dtype, max_num_seqs, max_num_batched_tokens)``; then a warm-up pass
that compiles every shape bucket the measured run uses: by default (``--warmup replay``) the
same workload (same lengths, same order, so the same schedule and buckets) with *different*
prompt text, so that the measured run gets no prefix-cache hits from it (the sweep's engines
reuse this warm-up workload); ``--warmup short`` caps its outputs at 8 tokens (faster, may miss
decode buckets: check the compile counter).
Its time (compilation, or loading from JAX's persistent cache, plus one pass) is reported
separately, and ``stats()["num_compilations"]`` before and after the measured run (equal when
the warm-up covered everything). The measured run submits all requests at once with
``engine.generate(prompts, params)``; wall time from the call to its return. TTFT, TPOT, queue
time and end-to-end latency per request come from ``RequestOutput.metrics`` (TTFT is measured
from submission, so it includes queueing).

HF transformers, as a typical user runs it: ``AutoModelForCausalLM.from_pretrained(
engine.model_dir)`` in the same dtype, ``torch.set_num_threads(os.cpu_count())``, static
batches of ``--hf-batch-size`` requests in arrival order, left padding with an attention mask
(``tokenizer.pad`` with padding_side="left", pad token = EOS if the tokenizer has none; without a
tokenizer, pad id 0 by hand), ``generate(max_new_tokens=
max(batch's max_tokens), min_new_tokens=same, do_sample=False)``, after one small untimed
warm-up call. Useful output tokens are each request's own max_tokens: the tokens a shorter
request generates beyond its own length in a padded batch are wasted work and not counted
(the JSON also reports the tokens computed). HF latencies come from a streamer whose put() is
called by ``generate`` once with the prompt and then once per decoding step of the batch, so
each step is timestamped in the measured run itself, all requests arriving at t=0 as in jaxllm:
    TTFT      = time of batch b's first token since the start of the run (queueing included);
    TPOT      = (time of a request's own last token - its first token) / (its max_tokens - 1);
    latency   = end of batch b (static batching returns every request when its batch ends).

llama.cpp (``pip install -e ".[bench]"``), as llama-server serves it: llama-cpp-python's low-level
batch API with ``--llamacpp-parallel`` sequences at once (continuous batching, chunked prompts,
``n_batch`` = ``--max-num-batched-tokens``, ``os.cpu_count()`` threads; see llamacpp_peer.py),
on the model's own GGUF file (``--llamacpp-model`` for another, e.g. when ``--model`` is an HF
directory); so it computes with the GGUF's quantized weights (Q4_1 for the default model),
whatever ``--dtype`` says. Greedy, going on past EOS: exactly each request's max_tokens. Its
warm-up (page the weights in; nothing to compile) is the first ``--llamacpp-parallel`` warm-up
requests capped at 8 output tokens. Each token is timestamped as it is sampled, all requests
arriving at t=0: TTFT = a request's first token, TPOT = (last - first) / (max_tokens - 1),
latency = its last token. Without llama-cpp-python or a GGUF the JSON has ``"llamacpp": null``
and ``llamacpp_note`` says why (also printed). ``--skip-jaxllm`` runs only the peers (e.g. to
rerun llama.cpp alone); ratios jaxllm/peer need both.

``--concurrency`` reruns jaxllm (a new Engine and warm-up each) at several max_num_seqs values;
``--plot`` draws output tokens/s against concurrency: jaxllm's sweep, llama.cpp at its
``--llamacpp-parallel`` and HF's static-batch figure as a horizontal line. Results go to
``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_peer import LlamaCppRunner, runnable_gguf  # noqa: E402

from jaxllm.cli_options import quantization_method  # noqa: E402

PASSAGE = """\
The history of computing is often told as a story of machines, but it is just as much a story \
of people learning how to describe work precisely enough that a machine could do it. Long before \
electronic circuits, clerks in insurance offices and observatories divided large calculations \
into small steps, wrote the intermediate results on printed forms, and passed the sheets from one \
desk to the next. The word computer first meant one of those clerks. When engineers later built \
relays, vacuum tubes and finally transistors into calculating machines, they borrowed the same \
habits: break the problem apart, keep the partial results somewhere safe, and decide in advance \
what happens at every step.
Early programmers worked close to the hardware. A program for one of the first stored-program \
machines was a list of numbers that the operator punched into paper tape, and a single wrong hole \
could send the machine into an endless loop that nobody noticed until the morning. Memory was so \
small and so expensive that people counted every word, and a clever trick that saved a few \
instructions was admired for years. Assemblers, and then compilers, let programmers write in \
terms closer to the problem, and they were met with suspicion at first: surely a program written \
by a program would be slower than one written by hand. The compilers improved, the machines grew \
faster, and the argument slowly moved on to other questions.
Time sharing changed the rhythm of the work. Instead of handing a deck of cards to an operator \
and waiting until the next day, a programmer could sit at a terminal, type a command, and see the \
answer in seconds. The small delay between a question and its answer turned out to matter a great \
deal; people explored ideas they would never have tried when each attempt cost a day. Networks \
then connected those terminals to each other, and mail, shared files and discussion boards grew \
out of what had been built only to share expensive processors.
The personal computer put a whole machine on a desk, and the spreadsheet gave many people their \
first reason to want one. A grid of cells that recalculated itself whenever a number changed was \
a simple idea, yet it let a shopkeeper, a student or an accountant build a model of a budget and \
ask what would happen if prices rose by a tenth. Later the web turned documents into places one \
could visit, and search engines made the growing mass of pages useful by ranking them.
Today a single chip holds billions of transistors arranged into many cores, wide vector units and \
caches several levels deep. Making a program fast is less about counting instructions and more \
about moving data: a value read from main memory costs far more than an arithmetic operation on \
it, so the best programs arrange their work to reuse whatever is already close to the processor. \
Language models make the point sharply. Generating one word means reading every weight of the \
model from memory, so serving many requests together, and sharing each read among them, is what \
separates a slow system from a fast one. The clerks passing their forms from desk to desk would \
have recognized the problem at once: the work is easy, and the hard part is keeping everyone busy.
"""

DEFAULTS = dict(num_requests=64, min_prompt=16, max_prompt=512, min_output=16, max_output=256,
                hf_batch_size=16)
QUICK = dict(num_requests=4, min_prompt=8, max_prompt=32, min_output=4, max_output=8,
             hf_batch_size=2)
SHORT_WARMUP_TOKENS = 8


# ---------------------------------------------------------------- workload
class PromptSource:
    """Makes prompts of a given length: slices of PASSAGE's tokens, or random vocabulary ids."""

    def __init__(self, model_dir: Path, tokenizer: Any, seed: int) -> None:
        self.rng = np.random.default_rng(seed + 1)
        if tokenizer is not None:
            self.kind = "text"
            self.description = ("slices of a built-in English passage tokenized with the model's "
                                "tokenizer, read cyclically from distinct start offsets")
            self.corpus = np.asarray(tokenizer.encode(PASSAGE, add_special_tokens=False), np.int64)
            self._offsets = list(self.rng.permutation(len(self.corpus)))
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(model_dir)
            special = {getattr(config, name, None) for name in
                       ("bos_token_id", "eos_token_id", "pad_token_id")}
            special = {t for s in special for t in (s if isinstance(s, list) else [s]) if t is not None}
            self.kind = "random"
            self.description = (f"uniform random ids from the vocabulary ({config.vocab_size}) "
                                f"excluding special ids {sorted(special)} (model has no tokenizer)")
            self.allowed = np.setdiff1d(np.arange(config.vocab_size), sorted(special))

    def make(self, length: int) -> list[int]:
        if self.kind == "random":
            return self.rng.choice(self.allowed, size=length).tolist()
        # Distinct offsets modulo the passage length give distinct first KV blocks (no prefix
        # sharing) until they run out; beyond that, prefix hits are possible and reported.
        offset = self._offsets.pop() if self._offsets else int(self.rng.integers(len(self.corpus)))
        return np.take(self.corpus, np.arange(offset, offset + length), mode="wrap").tolist()


def make_workload(args, source: PromptSource) -> list[dict[str, Any]]:
    if args.workload:
        items = json.loads(Path(args.workload).read_text())
        return [{"prompt_token_ids": [int(t) for t in it["prompt_token_ids"]],
                 "max_tokens": int(it["max_tokens"])} for it in items]
    rng = np.random.default_rng(args.seed)
    prompt_lens = rng.integers(args.min_prompt, args.max_prompt + 1, args.num_requests)
    output_lens = rng.integers(args.min_output, args.max_output + 1, args.num_requests)
    return [{"prompt_token_ids": source.make(int(p)), "max_tokens": int(o)}
            for p, o in zip(prompt_lens, output_lens)]


def warmup_workload(workload, source: PromptSource, mode: str) -> list[dict[str, Any]]:
    """Same lengths and order as the workload, different prompt tokens (no prefix-cache hits)."""
    cap = SHORT_WARMUP_TOKENS if mode == "short" else None
    return [{"prompt_token_ids": source.make(len(r["prompt_token_ids"])),
             "max_tokens": min(r["max_tokens"], cap) if cap else r["max_tokens"]}
            for r in workload]


def percentiles(values) -> dict[str, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return {"p50": None, "p90": None, "p99": None}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"p50": float(p50), "p90": float(p90), "p99": float(p99)}


def _token_counts(workload) -> tuple[int, int]:
    return (sum(len(r["prompt_token_ids"]) for r in workload),
            sum(r["max_tokens"] for r in workload))


def load_tokenizer(model_dir: Path) -> Any:
    """The model's HF tokenizer, or None for a directory without one (the tests' tiny Llama)."""
    if not any((model_dir / n).exists() for n in ("tokenizer.json", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# ---------------------------------------------------------------- jaxllm
def make_engine(args, model_dir: Path, max_num_seqs: int):
    """(engine, seconds to create it)."""
    from jaxllm import Engine

    options = {"max_model_len": args.max_model_len} if args.max_model_len else {}
    if args.prefill_first is not None:
        options["prefill_first"] = args.prefill_first == "on"
    if args.quantization is not None:   # the model as given (default: the GGUF), its weights so
        model_dir, options["quantization"] = args.model, args.quantization
    start = time.perf_counter()
    engine = Engine(model_dir, dtype=args.dtype, max_num_seqs=max_num_seqs,
                    max_num_batched_tokens=max(args.max_num_batched_tokens, max_num_seqs), **options)
    return engine, time.perf_counter() - start


def run_jaxllm_fresh(args, model_dir: Path, max_num_seqs: int, workload, warm) -> dict:
    """``run_jaxllm`` on a new Engine, shut down afterwards: one engine in memory at a time."""
    engine, init_s = make_engine(args, model_dir, max_num_seqs)
    try:
        return run_jaxllm(args, engine, init_s, workload, warm)
    finally:
        engine.shutdown()
        del engine
        gc.collect()


def run_jaxllm(args, engine, init_s: float, workload, warm) -> dict:
    """Warm-up pass, then the measured run of ``workload`` on ``engine``."""
    from jaxllm import SamplingParams

    def params(items):
        return [SamplingParams(temperature=0, max_tokens=r["max_tokens"], ignore_eos=True)
                for r in items]

    def prompts(items):
        return [{"prompt_token_ids": r["prompt_token_ids"]} for r in items]

    start = time.perf_counter()
    engine.generate(prompts(warm), params(warm), use_tqdm=False)
    warmup_s = time.perf_counter() - start
    before = engine.stats()

    start = time.perf_counter()
    outputs = engine.generate(prompts(workload), params(workload), use_tqdm=False)
    wall = time.perf_counter() - start
    after = engine.stats()

    generated = [len(o.outputs[0].token_ids) for o in outputs]
    expected = [r["max_tokens"] for r in workload]
    if generated != expected:
        raise RuntimeError(f"jaxllm generated {generated}, expected {expected} tokens")
    prompt_tokens, output_tokens = _token_counts(workload)
    m = [o.metrics for o in outputs]
    result = {
        "quantization": engine.config.quantization,
        "max_num_seqs": engine.config.max_num_seqs,
        "max_num_batched_tokens": engine.config.max_num_batched_tokens,
        "engine_init_s": init_s,
        "warmup_mode": args.warmup,
        "warmup_s": warmup_s,
        "wall_s": wall,
        "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
        "ttft_s": percentiles([x.time_to_first_token for x in m]),
        "tpot_s": percentiles([x.time_per_output_token for x in m]),
        "queue_s": percentiles([x.time_in_queue for x in m]),
        "latency_s": percentiles([x.finished_time - x.arrival_time for x in m
                                  if x.finished_time is not None]),
        "prefix_cached_tokens": sum(x.num_cached_tokens for x in m),
        "num_compilations_before": before["num_compilations"],
        "num_compilations_after": after["num_compilations"],
        "num_steps": after["num_steps"] - before["num_steps"],
        "num_preemptions": after["num_preemptions"] - before["num_preemptions"],
        "host_time_s": after["host_time_s"] - before["host_time_s"],
        "device_time_s": after["device_time_s"] - before["device_time_s"],
    }
    return result


# ---------------------------------------------------------------- HF transformers
def run_hf(args, workload, model_dir: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype or "float32"]
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch_dtype).eval()
    load_s = time.perf_counter() - start
    tokenizer, pad_id = load_tokenizer(model_dir), 0  # no tokenizer: pad id 0, padded by hand
    if tokenizer is not None:
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        pad_id = tokenizer.pad_token_id

    def left_pad(items):
        lists = [r["prompt_token_ids"] for r in items]
        if tokenizer is not None:
            enc = tokenizer.pad({"input_ids": lists}, padding=True, return_tensors="pt")
            return enc["input_ids"], enc["attention_mask"]
        width = max(map(len, lists))
        ids = torch.full((len(lists), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(lists), width), dtype=torch.long)
        for i, tokens in enumerate(lists):
            ids[i, width - len(tokens):] = torch.tensor(tokens)
            mask[i, width - len(tokens):] = 1
        return ids, mask

    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        """Timestamps generate's streamer calls: the prompt, then every decoding step."""

        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(items, new_tokens, clock=None):
        ids, mask = left_pad(items)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                                 min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id,
                                 streamer=clock)
        if out.shape[1] - ids.shape[1] != new_tokens:
            raise RuntimeError(f"HF generated {out.shape[1] - ids.shape[1]} tokens, expected {new_tokens}")

    bs = args.hf_batch_size
    batches = [workload[i:i + bs] for i in range(0, len(workload), bs)]
    start = time.perf_counter()
    generate([dict(r, prompt_token_ids=r["prompt_token_ids"][:16]) for r in batches[0]], 2)
    warmup_s = time.perf_counter() - start

    ttft, tpot, latency = [], [], []
    run_start = time.perf_counter()
    for batch in batches:
        clock = StepClock()
        generate(batch, max(r["max_tokens"] for r in batch), clock)
        token_times = [t - run_start for t in clock.times[1:]]  # [i] = when token i+1 appeared
        for r in batch:
            n = r["max_tokens"]
            ttft.append(token_times[0])
            tpot.append((token_times[n - 1] - token_times[0]) / (n - 1) if n > 1 else None)
            latency.append(token_times[-1])
    wall = time.perf_counter() - run_start
    prompt_tokens, output_tokens = _token_counts(workload)
    computed = sum(len(b) * max(r["max_tokens"] for r in b) for b in batches)
    return {
        "batch_size": bs, "pad_token_id": pad_id, "load_s": load_s, "warmup_s": warmup_s,
        "wall_s": wall, "output_tokens": output_tokens,
        "output_tokens_computed": computed,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
        "ttft_s": percentiles(ttft), "tpot_s": percentiles(tpot),
        "latency_s": percentiles(latency),
        "latency_method": "streamer timestamps of each decoding step of the batch",
    }


# ---------------------------------------------------------------- llama.cpp
def run_llamacpp(args, workload, warm, gguf: Path) -> dict:
    """A short warm-up, then the measured run of ``workload`` through llama.cpp."""
    import llama_cpp

    n_ctx_seq = max(len(r["prompt_token_ids"]) + r["max_tokens"] for r in workload + warm)
    short_warm = [dict(r, max_tokens=min(r["max_tokens"], SHORT_WARMUP_TOKENS))
                  for r in warm[:args.llamacpp_parallel]]
    start = time.perf_counter()
    with LlamaCppRunner(gguf, args.llamacpp_parallel, n_ctx_seq,
                        n_batch=args.max_num_batched_tokens) as runner:
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        runner.generate(short_warm)
        warmup_s = time.perf_counter() - start
        start = time.perf_counter()
        outputs = runner.generate(workload)
        wall = time.perf_counter() - start

    generated = [len(token_ids) for token_ids, _ in outputs]
    expected = [r["max_tokens"] for r in workload]
    if generated != expected:
        raise RuntimeError(f"llama.cpp generated {generated}, expected {expected} tokens")
    times = [token_times for _, token_times in outputs]
    prompt_tokens, output_tokens = _token_counts(workload)
    return {
        "n_parallel": runner.n_parallel, "n_batch": runner.n_batch, "n_threads": runner.n_threads,
        "gguf": str(gguf), "weights": runner.description, "llama_cpp_python": llama_cpp.__version__,
        "batching": "continuous, n_parallel sequences through llama_decode (llamacpp_peer.py)",
        "load_s": load_s, "warmup_s": warmup_s, "wall_s": wall, "output_tokens": output_tokens,
        "output_tokens_per_s": output_tokens / wall,
        "total_tokens_per_s": (prompt_tokens + output_tokens) / wall,
        "ttft_s": percentiles([t[0] for t in times]),
        "tpot_s": percentiles([(t[-1] - t[0]) / (len(t) - 1) if len(t) > 1 else None for t in times]),
        "latency_s": percentiles([t[-1] for t in times]),
    }


def ratios(jax_result: dict | None, peers: dict[str, dict | None]) -> dict[str, float]:
    """``ratio_{output,total}_tps_vs_{peer}``: jaxllm's tokens/s over each peer that ran."""
    if jax_result is None:
        return {}
    return {f"ratio_{key}_tps_vs_{name}": jax_result[f"{key}_tokens_per_s"] / peer[f"{key}_tokens_per_s"]
            for name, peer in peers.items() if peer for key in ("output", "total")}


# ---------------------------------------------------------------- report
def _fmt_ms(p: dict) -> str:
    return "/".join("-" if p[k] is None else f"{1000 * p[k]:.0f}" for k in ("p50", "p90", "p99"))


def print_table(result: dict) -> None:
    rows = [(name, result[key]) for name, key in
            (("jaxllm", "jaxllm"), ("transformers", "hf"), ("llama.cpp", "llamacpp")) if result[key]]
    n = result["workload"]["num_requests"]
    print(f"\n{'engine':<13}{'requests':>9}{'wall s':>9}{'out tok/s':>11}{'total tok/s':>13}"
          f"{'TTFT ms p50/90/99':>22}{'TPOT ms p50/90/99':>20}")
    for name, r in rows:
        print(f"{name:<13}{n:>9}{r['wall_s']:>9.1f}{r['output_tokens_per_s']:>11.1f}"
              f"{r['total_tokens_per_s']:>13.1f}{_fmt_ms(r['ttft_s']):>22}{_fmt_ms(r['tpot_s']):>20}")
    if j := result["jaxllm"]:
        print(f"jaxllm: engine init {j['engine_init_s']:.1f} s, warm-up ({j['warmup_mode']}) "
              f"{j['warmup_s']:.1f} s, compilations {j['num_compilations_before']} -> "
              f"{j['num_compilations_after']} during the measured run, "
              f"{j['prefix_cached_tokens']} prefix-cached prompt tokens")
    if lc := result["llamacpp"]:
        print(f"llama.cpp: {lc['weights']}, {lc['n_parallel']} parallel sequences, "
              f"{lc['n_threads']} threads, load {lc['load_s']:.1f} s, warm-up {lc['warmup_s']:.1f} s")
    if result["llamacpp_note"]:
        print(result["llamacpp_note"])
    if result.get("ratio_output_tps_vs_hf"):
        print(f"ratio jaxllm/transformers: output tok/s {result['ratio_output_tps_vs_hf']:.2f}x, "
              f"total tok/s {result['ratio_total_tps_vs_hf']:.2f}x "
              f"(HF computed {result['hf']['output_tokens_computed']} output tokens for "
              f"{result['hf']['output_tokens']} useful)")
    if result.get("ratio_output_tps_vs_llamacpp"):
        print(f"ratio jaxllm/llama.cpp: output tok/s {result['ratio_output_tps_vs_llamacpp']:.2f}x, "
              f"total tok/s {result['ratio_total_tps_vs_llamacpp']:.2f}x")
    for point in result.get("concurrency", []):
        print(f"  max_num_seqs={point['max_num_seqs']:<4} output tok/s "
              f"{point['output_tokens_per_s']:8.1f}  TTFT p50 {1000 * point['ttft_s']['p50']:.0f} ms"
              f"  compilations {point['num_compilations_before']}->{point['num_compilations_after']}")


def write_plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    jax_runs = [r for r in [result["jaxllm"], *result["concurrency"]] if r]
    by_seqs = {r["max_num_seqs"]: r for r in jax_runs}
    xs = sorted(by_seqs)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if xs:
        ax.plot(xs, [by_seqs[x]["output_tokens_per_s"] for x in xs], "o-",
                label="jaxllm (max_num_seqs)")
    if lc := result["llamacpp"]:
        xs = sorted({*xs, lc["n_parallel"]})
        ax.plot([lc["n_parallel"]], [lc["output_tokens_per_s"]], "s", color="tab:green",
                markersize=8, label=f"llama.cpp ({lc['n_parallel']} parallel sequences, "
                                    f"{lc['weights']})")
    if result["hf"]:
        ax.axhline(result["hf"]["output_tokens_per_s"], color="tab:red", linestyle="--",
                   label=f"HF transformers, static batches of {result['hf']['batch_size']}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent sequences (jaxllm max_num_seqs, llama.cpp n_parallel)")
    ax.set_ylabel("useful output tokens/s")
    c, w = result["config"], result["workload"]
    ax.set_title(f"{Path(c['model_dir']).name}, {c['dtype']}\n{w['num_requests']} requests, "
                 f"prompts {w['prompt_len_range']} tokens, outputs {w['output_len_range']}\n"
                 f"{c['machine']}", fontsize=8)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine_description() -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs, jax {jax.__version__} on {jax.default_backend()}"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model dir / .gguf / hub id (default SmolLM2-135M)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-requests", type=int)
    parser.add_argument("--min-prompt", type=int)
    parser.add_argument("--max-prompt", type=int)
    parser.add_argument("--min-output", type=int)
    parser.add_argument("--max-output", type=int)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workload", help="JSON list of {prompt_token_ids, max_tokens}")
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--quantization", type=quantization_method, default=None,
                        help="jaxllm's weights (Engine's quantization: auto, none, gguf, int8); "
                             "default: the float conversion of --model")
    parser.add_argument("--prefill-first", choices=("on", "off"), default=None,
                        help="EngineConfig.prefill_first (default: the platform's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--warmup", choices=["replay", "short"], default="replay")
    parser.add_argument("--hf-batch-size", type=int)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-jaxllm", action="store_true", help="run only the peers")
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--llamacpp-parallel", type=int, default=16,
                        help="sequences llama.cpp decodes at once")
    parser.add_argument("--llamacpp-model", help="the GGUF llama.cpp runs (default: --model's)")
    parser.add_argument("--concurrency", type=int, nargs="+", help="max_num_seqs values to sweep")
    parser.add_argument("--plot", help="write a PNG of output tokens/s vs concurrency")
    parser.add_argument("--quick", action="store_true", help="tiny smoke configuration")
    parser.add_argument("--out", default="benchmarks/results/throughput.json")
    args = parser.parse_args(argv)
    base = QUICK if args.quick else DEFAULTS
    for name, value in base.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if not (1 <= args.min_prompt <= args.max_prompt and 1 <= args.min_output <= args.max_output):
        parser.error("length ranges must satisfy 1 <= min <= max")
    if args.skip_jaxllm and args.concurrency:
        parser.error("--concurrency sweeps jaxllm: drop --skip-jaxllm")
    return args


def main(argv=None) -> dict:
    from jaxllm.model_source import resolve_model

    args = parse_args(argv)
    model_dir = resolve_model(args.model)
    source = PromptSource(model_dir, load_tokenizer(model_dir), args.seed)
    workload = make_workload(args, source)
    # One warm-up workload for every engine: each engine has its own (empty) prefix cache, and
    # these prompts share no first block with the measured ones.
    warm = warmup_workload(workload, source, args.warmup)
    prompt_tokens, output_tokens = _token_counts(workload)
    print(f"workload: {len(workload)} requests, {prompt_tokens} prompt + {output_tokens} output "
          f"tokens; prompts: {args.workload or source.description}", flush=True)

    jax_result, sweep = None, []
    if not args.skip_jaxllm:
        jax_result = run_jaxllm_fresh(args, model_dir, args.max_num_seqs, workload, warm)
        for c in args.concurrency or []:
            if c == args.max_num_seqs:
                sweep.append(jax_result)
                continue
            print(f"jaxllm at max_num_seqs={c} ...", flush=True)
            sweep.append(run_jaxllm_fresh(args, model_dir, c, workload, warm))

    hf_result = None
    if not args.skip_hf:
        print("transformers ...", flush=True)
        hf_result = run_hf(args, workload, model_dir)
        gc.collect()  # the torch model, before llama.cpp loads

    llamacpp_result = None
    gguf, llamacpp_note = runnable_gguf(args.model, args.llamacpp_model, args.skip_llamacpp)
    if gguf:
        print("llama.cpp ...", flush=True)
        llamacpp_result = run_llamacpp(args, workload, warm, gguf)

    import jax
    import torch
    import transformers

    result: dict[str, Any] = {
        "config": {
            "model": args.model, "model_dir": str(model_dir), "dtype": args.dtype,
            "seed": args.seed, "quick": args.quick, "machine": machine_description(),
            "cpu_count": os.cpu_count(), "python": sys.version.split()[0],
            "jax": jax.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "workload": {
            "num_requests": len(workload), "source": args.workload or source.description,
            "prompt_len_range": [min(len(r["prompt_token_ids"]) for r in workload),
                                 max(len(r["prompt_token_ids"]) for r in workload)]
            if args.workload else [args.min_prompt, args.max_prompt],
            "output_len_range": [min(r["max_tokens"] for r in workload),
                                 max(r["max_tokens"] for r in workload)]
            if args.workload else [args.min_output, args.max_output],
            "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        },
        "jaxllm": jax_result,
        "hf": hf_result,
        "llamacpp": llamacpp_result,
        "llamacpp_note": llamacpp_note,
        "concurrency": sweep,
        **ratios(jax_result, {"hf": hf_result, "llamacpp": llamacpp_result}),
    }

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print_table(result)
    if args.plot:
        write_plot(result, args.plot)
        print(f"plot: {args.plot}")
    print(f"results: {args.out}")
    return result


if __name__ == "__main__":
    main()
