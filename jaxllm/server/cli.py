"""``jaxllm serve``: the command line of the OpenAI-compatible server.

The engine is built (model loaded, steps compiled) before the port opens, so a bad model or
option fails at once with one line, and the first request finds a ready engine.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from typing import Any

from jaxllm.cli_options import (HelpFormatter, add_debug_option, add_engine_options,
                                engine_options, log_to_stderr, non_negative_int, positive_int)
from jaxllm.model_source import DEFAULT_GGUF_FILE
from jaxllm.server import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_WAITING_REQUESTS

API_KEY_ENV = "JAXLLM_API_KEY"

SEED_HELP = (
    "base seed of the generator that draws a seed for each request sent without one. Sampling "
    "without a seed is therefore reproducible: a fresh server given the same requests in the "
    "same order repeats its outputs (vLLM instead draws fresh randomness per run). Start with "
    "another --seed (e.g. --seed $RANDOM) for different draws; a request's own seed is always "
    "honoured, alone or in any batch")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Adds the ``serve`` command to the ``jaxllm`` parser."""
    parser = subparsers.add_parser(
        "serve", formatter_class=HelpFormatter, help="serve a model over the OpenAI API",
        description="An OpenAI-compatible HTTP server (vLLM's endpoints: /v1/completions, "
                    "/v1/chat/completions, /v1/models, /health, /metrics, /version).")
    parser.add_argument("--model", default=None,
                        help=f"HF directory, .gguf file or hub id; unset: {DEFAULT_GGUF_FILE}")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind; 0.0.0.0 exposes the server to the network")
    parser.add_argument("--port", type=non_negative_int, default=8000, help="port to bind")
    parser.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer <key>' on /v1/*; unset: "
                             f"${API_KEY_ENV} if set, else no key")
    parser.add_argument("--served-model-name", default=None,
                        help="the model name clients send and /v1/models lists; unset: --model")
    parser.add_argument("--max-waiting-requests", type=non_negative_int,
                        default=DEFAULT_MAX_WAITING_REQUESTS,
                        help="requests that may wait beyond the engine's --max-num-seqs; more "
                             "are answered 503 with Retry-After")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest request body accepted (413 beyond)")
    parser.add_argument("--seed", type=non_negative_int, default=0, help=SEED_HELP)
    parser.add_argument("--log-level", default="info",
                        choices=["critical", "error", "warning", "info", "debug"],
                        help="uvicorn's and the server's log level")
    parser.add_argument("--lora-modules", nargs="+", default=[], metavar="NAME=PATH",
                        help="LoRA adapters (PEFT directories) to serve, each under its name: a "
                             "request whose model is NAME runs under it (enables LoRA)")
    parser.add_argument("--max-loras", type=positive_int, default=None,
                        help="adapters on the device at once; unset: one per --lora-modules entry")
    parser.add_argument("--max-lora-rank", type=positive_int, default=16,
                        help="the largest adapter rank served")
    add_engine_options(parser, warmup=True)
    add_debug_option(parser)
    parser.set_defaults(command=serve)
    return parser


def serve(args: argparse.Namespace) -> int:
    """Loads the engine, then serves until interrupted."""
    from jaxllm.server import require_serve_extra

    require_serve_extra()
    import uvicorn

    from jaxllm.engine import Engine
    from jaxllm.server.app import build_app

    if args.port > 65535:
        raise ValueError(f"--port must be at most 65535, got {args.port}")
    _check_can_listen(args.host, args.port)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    if api_key is None and not _is_loopback(args.host):
        print(f"jaxllm: warning: serving on {args.host} without an API key: anyone who can reach "
              "it can use it (--api-key)", file=sys.stderr)
    log_to_stderr(args.log_level)
    name = args.served_model_name or args.model or DEFAULT_GGUF_FILE.partition(".")[0]
    print(f"jaxllm: loading {args.model or DEFAULT_GGUF_FILE}", file=sys.stderr, flush=True)
    lora_modules = lora_requests(args.lora_modules)
    lora_options = (dict(enable_lora=True, max_loras=args.max_loras or len(lora_modules),
                         max_lora_rank=args.max_lora_rank) if lora_modules else {})
    with Engine(args.model, seed=args.seed, **engine_options(args), **lora_options) as engine:
        for lora in lora_modules.values():   # a bad adapter fails now, not at its first request
            engine.input_processor.lora.adapter(lora)
        app = build_app(engine, served_model_name=name, api_key=api_key,
                        max_waiting_requests=args.max_waiting_requests,
                        max_body_bytes=args.max_body_bytes, lora_modules=lora_modules)
        print(f"jaxllm: serving {name!r} on http://{args.host}:{args.port}", file=sys.stderr,
              flush=True)
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    return 0


def lora_requests(modules: list[str]) -> dict[str, Any]:
    """``--lora-modules name=path ...`` -> {name: LoRARequest} (ids 1, 2, ... in order)."""
    from jaxllm.lora.request import LoRARequest

    out: dict[str, Any] = {}
    for i, module in enumerate(modules, start=1):
        name, sep, path = module.partition("=")
        if not sep or not name or not path:
            raise ValueError(f"--lora-modules takes NAME=PATH entries, got {module!r}")
        if name in out:
            raise ValueError(f"--lora-modules names {name!r} twice")
        out[name] = LoRARequest(name, i, path)
    return out


def _check_can_listen(host: str, port: int) -> None:
    """Fails before the model loads if the address cannot be bound (in use, not local)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
