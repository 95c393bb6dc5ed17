"""Cost of penalties, logit_bias and structured outputs in a 64-row decode step of SmolLM2-135M
(49,152 tokens).

    python benchmarks/sampling_features.py [--model PATH] [--rows 64] [--prompt 256]
        [--outputs 64] [--bias 32] [--repeats 30] [--out PATH.json]

The engine's ModelRunner is driven directly (the executor stays idle) on one decode step of
``--rows`` sequences, each with a ``--prompt``-token prompt and ``--outputs`` tokens generated
so far, in two settings:

* ``plain``: temperature 0.8, seeded;
* ``features``: the same plus repetition 1.1, frequency 0.5 and presence 0.3 penalties and a
  ``--bias``-entry ``logit_bias`` on every row;
* ``structured``: ``plain`` with a JSON-schema constraint on every row, each row's matcher
  inside a string value (``{"name": "Ad``), where most of the vocabulary is allowed: the host
  fills 64 bitmask rows and the step applies them (its own compiled variant).

For each it reports the host time of ``prepare_inputs`` and the wall time of one whole step
(prepare, dispatch, fetch), best and median of ``--repeats`` after two untimed steps, and the
time of the first of those (``first_step_s``: it compiles the step's executable, or loads it
from JAX's persistent cache; ``JAX_COMPILATION_CACHE_DIR=$(mktemp -d)`` makes it a cold
compile). The sequences do not advance between steps: every step is the same one.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"]}
JSON_PREFIX = '{"name": "Ad'


def _batch(engine, rows: int, prompt_len: int, num_outputs: int, params, seed: int):
    from jaxllm.scheduler import ScheduledBatch, ScheduledSequence
    from jaxllm.sequence import Request, Sequence

    rng = np.random.default_rng(seed)
    vocab, block_size = engine.model_config.vocab_size, engine.config.block_size
    total = prompt_len + num_outputs
    blocks_per_seq = -(-total // block_size)
    constraint = params.structured_outputs
    grammar = None if constraint is None else engine.input_processor.grammar(constraint)
    scheduled = []
    for r in range(rows):
        request = Request(request_id=f"bench-{r}", prompt=None,
                          prompt_token_ids=tuple(rng.integers(0, vocab, prompt_len).tolist()),
                          sampling_params=params, seed=seed + r, eos_token_ids=engine.eos_token_ids,
                          arrival_time=0.0, grammar=grammar)
        seq = Sequence.from_request(request)
        if grammar is not None:   # mid-string: the output so far is not what the matcher saw
            seq.matcher = grammar.deep_copy()
            assert seq.matcher.consume_tokens(engine.tokenizer.encode(JSON_PREFIX))
        seq.token_ids += rng.integers(0, vocab, num_outputs).tolist()
        seq.num_computed_tokens = total - 1        # a decode step: the last token is new
        seq.block_ids = list(range(1 + r * blocks_per_seq, 1 + (r + 1) * blocks_per_seq))
        scheduled.append(ScheduledSequence(seq, 1))
    return ScheduledBatch(scheduled, preempted=[])


def _times(fn, repeats: int) -> dict[str, float]:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"best_ms": 1e3 * min(times), "median_ms": 1e3 * statistics.median(times), "first_step_s": first}


def measure(engine, batch, repeats: int) -> dict[str, dict[str, float]]:
    runner = engine.model_runner

    def step():
        prepared = runner.prepare_inputs(batch)
        runner.fetch(batch, runner.dispatch(batch, prepared))

    return {"prepare_inputs": _times(lambda: runner.prepare_inputs(batch), repeats),
            "step": _times(step, repeats)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--outputs", type=int, default=64)
    parser.add_argument("--bias", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    from jaxllm import Engine, SamplingParams, StructuredOutputsParams

    engine = Engine(args.model, max_num_seqs=args.rows)
    vocab = engine.model_config.vocab_size
    rng = np.random.default_rng(0)
    bias = {int(t): float(b) for t, b in zip(rng.choice(vocab, args.bias, replace=False),
                                             rng.uniform(-5, 5, args.bias))}
    settings = {
        "plain": SamplingParams(temperature=0.8, max_tokens=512),
        "features": SamplingParams(temperature=0.8, max_tokens=512, repetition_penalty=1.1,
                                   frequency_penalty=0.5, presence_penalty=0.3, logit_bias=bias),
        "structured": SamplingParams(temperature=0.8, max_tokens=512,
                                     structured_outputs=StructuredOutputsParams(json=SCHEMA)),
    }
    result = {"rows": args.rows, "vocab": vocab, "prompt": args.prompt, "outputs": args.outputs,
              "bias_entries": args.bias, "max_model_len": engine.config.max_model_len}
    try:
        for name, params in settings.items():
            batch = _batch(engine, args.rows, args.prompt, args.outputs, params, seed=1)
            result[name] = measure(engine, batch, args.repeats)
    finally:
        engine.shutdown()
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
