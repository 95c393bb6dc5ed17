"""What the ``jaxllm`` commands share: the engine's options as flags (defaults read from
EngineConfig, shown in ``--help``), argument types, and how a user's mistake is reported: one
line, ``jaxllm: error: ...``, exit status 2, a traceback only with ``--debug``."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Callable
from typing import Any

from jaxllm.config import EngineConfig

HelpFormatter = argparse.ArgumentDefaultsHelpFormatter


class Parser(argparse.ArgumentParser):
    """argparse, whose usage errors are one line too (the usage block is in ``--help``)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

# Exceptions that mean the user asked for something that cannot be (a missing model, an
# option out of range, a port in use, a missing extra), not a bug in jaxllm.
USER_ERRORS = (OSError, ValueError, ImportError)

_DEFAULTS = {f.name: f.default for f in dataclasses.fields(EngineConfig)}


def positive_int(text: str) -> int:
    return _int_at_least(text, 1, "a positive integer")


def non_negative_int(text: str) -> int:
    return _int_at_least(text, 0, "an integer >= 0")


def _int_at_least(text: str, lowest: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if value < lowest:
        raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
    return value


def quantization_method(text: str) -> str | None:
    """--quantization's value: "none" is None (float weights)."""
    if text.lower() == "none":
        return None
    if text not in ("auto", "gguf", "int8"):
        raise argparse.ArgumentTypeError(f"must be auto, none, gguf or int8, got {text!r}")
    return text


# EngineConfig field -> (argparse keyword arguments but the default, help)
_ENGINE_FLAGS: dict[str, tuple[dict[str, Any], str]] = {
    "dtype": ({"choices": ["float32", "bfloat16"]},
              "weights, activations and KV cache dtype; unset: float32 on CPU, bfloat16 on GPU/TPU"),
    "kv_cache_dtype": ({"choices": ["auto", "int8", "fp8", "fp8_e4m3"]},
                       "what the KV cache stores: 'auto' = --dtype; int8 or fp8 (e4m3) with a "
                       "float32 scale per token and kv head: ~2-4x the tokens per budget"),
    "max_model_len": ({"type": positive_int},
                      "longest prompt + output in tokens; unset: the model's max_position_embeddings"),
    "block_size": ({"type": positive_int}, "tokens per KV block (a power of two)"),
    "num_blocks": ({"type": positive_int},
                   "KV blocks in the pool; unset: as many as --kv-cache-memory-bytes holds"),
    "kv_cache_memory_bytes": ({"type": positive_int},
                              "KV cache budget when --num-blocks is unset; unset: 25%% of the "
                              "accelerator's memory, 2 GiB on CPU"),
    "max_num_seqs": ({"type": positive_int}, "most sequences in one step"),
    "max_num_batched_tokens": ({"type": positive_int}, "token budget of one step"),
    "max_logprobs": ({"type": positive_int}, "most logprobs / prompt_logprobs a request may ask for"),
    "attention": ({}, "attention implementation ('reference' or a registered kernel); "
                      "unset: the platform's best"),
    "enable_prefix_caching": ({"action": argparse.BooleanOptionalAction},
                              "reuse the KV blocks of identical prompt prefixes across requests"),
    "tensor_parallel_size": ({"type": positive_int},
                             "devices the model is split over (attention heads, MLP, vocabulary)"),
    "quantization": ({"type": quantization_method, "metavar": "{auto,none,gguf,int8}"},
                     "weights in memory: gguf keeps a .gguf file's quantized blocks, int8 "
                     "quantizes at load (weight-only, per output channel), none dequantizes to "
                     "--dtype; auto: gguf for a .gguf model where a kernel runs it, else none"),
}


def add_engine_options(parser: argparse.ArgumentParser, *, warmup: bool) -> None:
    """The engine's flags (``--max-model-len`` for ``max_model_len``...), and ``--warmup``
    with this command's default."""
    group = parser.add_argument_group("engine options")
    for field, (kwargs, help_text) in _ENGINE_FLAGS.items():
        group.add_argument(_flag(field), dest=field, default=_DEFAULTS[field], help=help_text, **kwargs)
    group.add_argument("--data-parallel-size", type=positive_int, default=1,
                       help="engine replicas, each on its own tensor-parallel group of devices, "
                            "requests routed to the one with the most free KV blocks")
    group.add_argument("--warmup", action=argparse.BooleanOptionalAction, default=warmup,
                       help="compile every step shape at start-up (with a progress bar), so "
                            "requests never wait for a compilation")


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Engine options set by ``add_engine_options``' flags."""
    return {field: getattr(args, field) for field in (*_ENGINE_FLAGS, "warmup", "data_parallel_size")}


def log_to_stderr(level: str) -> None:
    """jaxllm's own log lines (compiling a step, ...) on stderr, at ``level``; the root logger
    and jax's are left alone."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    logger = logging.getLogger("jaxllm")
    logger.addHandler(handler)
    logger.setLevel(level.upper())


def add_debug_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error instead of one line")


def run_command(parser: argparse.ArgumentParser, args: argparse.Namespace,
                command: Callable[[argparse.Namespace], int]) -> int:
    """``command(args)``, a user error reported as ``jaxllm: error: <one line>`` (exit 2)."""
    try:
        return command(args)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as exc:
        if getattr(args, "debug", False):
            raise
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        message = " ".join(lines) or type(exc).__name__
        print(f"{parser.prog}: error: {message} (--debug shows the traceback)", file=sys.stderr)
        return 2


def _flag(field: str) -> str:
    return "--" + field.replace("_", "-")
