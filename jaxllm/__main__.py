"""Command line: ``python -m jaxllm generate "Hello, my name is"``."""

from __future__ import annotations

import argparse
import sys

from jaxllm.engine import Engine
from jaxllm.sampling_params import SamplingParams


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jaxllm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="complete a prompt and print the text")
    gen.add_argument("prompt")
    gen.add_argument("--model", default=None,
                     help="HF directory, .gguf file or hub id (default: SmolLM2-135M-Instruct)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default=None)
    args = parser.parse_args(argv)

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    with Engine(args.model, dtype=args.dtype) as engine:
        if args.chat:
            output = engine.chat([{"role": "user", "content": args.prompt}], params)
        else:
            output = engine.generate(args.prompt, params)
    completion = output.outputs[0]
    print(completion.text if args.chat else args.prompt + completion.text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
