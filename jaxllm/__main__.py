"""Command line: ``python -m jaxllm generate "Hello, my name is"`` completes a prompt;
``python -m jaxllm serve --model M`` serves a model over the OpenAI API (``jaxllm.server``)."""

from __future__ import annotations

import argparse
import sys

from jaxllm.cli_options import (HelpFormatter, Parser, add_debug_option, add_engine_options,
                                engine_options, log_to_stderr, non_negative_int, positive_int,
                                run_command)
from jaxllm.model_source import DEFAULT_GGUF_FILE
from jaxllm.server import cli as serve_cli


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxllm", description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command_name", metavar="{generate,serve}", required=True)
    gen = sub.add_parser("generate", formatter_class=HelpFormatter,
                         help="complete a prompt and print the text",
                         description="Complete one prompt and print the text.")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--model", default=None,
                     help=f"HF directory, .gguf file or hub id; unset: {DEFAULT_GGUF_FILE}")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=positive_int, default=64, help="most tokens to generate")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass; 1 disables")
    gen.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables")
    gen.add_argument("--seed", type=non_negative_int, default=None,
                     help="the request's seed; unset: drawn from the engine's generator, whose "
                          "base seed is fixed (0), so a sampled run repeats its output")
    add_engine_options(gen, warmup=False)
    add_debug_option(gen)
    gen.set_defaults(command=generate)
    serve_cli.add_parser(sub)
    return parser


def generate(args: argparse.Namespace) -> int:
    from jaxllm.engine import Engine
    from jaxllm.sampling_params import SamplingParams

    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                            seed=args.seed, max_tokens=args.max_tokens)
    log_to_stderr("info")
    print(f"jaxllm: loading {args.model or DEFAULT_GGUF_FILE} (a first run converts a GGUF file "
          "and compiles the model's steps; later runs reuse both from the cache)",
          file=sys.stderr, flush=True)
    with Engine(args.model, **engine_options(args)) as engine:
        if args.chat:
            output = engine.chat([{"role": "user", "content": args.prompt}], params)
        else:
            output = engine.generate(args.prompt, params)
    completion = output.outputs[0]
    print(completion.text if args.chat else args.prompt + completion.text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    return run_command(parser, args, args.command)


if __name__ == "__main__":
    sys.exit(main())
