"""Runs a jaxllm command over the devices of several processes (``jax.distributed``).

    # one command per host; process 0's host:port is the coordinator (it serves the requests):
    python -m jaxllm.launch --num-processes 2 --coordinator 10.0.0.1:8476 --process-id 0 -- \\
        serve --model M --tensor-parallel-size 16
    python -m jaxllm.launch --num-processes 2 --coordinator 10.0.0.1:8476 --process-id 1 -- \\
        serve --model M --tensor-parallel-size 16
    # or every process on this machine (without --process-id), e.g. on faked CPU devices:
    JAX_NUM_CPU_DEVICES=2 python -m jaxllm.launch --num-processes 2 \\
        --coordinator 127.0.0.1:8476 -- generate "Hello" --model M --tensor-parallel-size 4

Each process initialises jax.distributed (CPU collectives over gloo) and builds the same
engine from the same command; process 0 runs the command, the others replay its steps
(``jaxllm.multihost``) and exit when it is done. Without ``--process-id`` this module starts
the P processes itself, forwards SIGINT/SIGTERM to process 0 (the others stop with it), and
terminates them all as soon as one fails.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
import traceback
from typing import Any

from jaxllm.cli_options import (HelpFormatter, Parser, engine_options, non_negative_int,
                                positive_int, run_command)

COMMANDS = ("generate", "serve")
_POLL_S = 0.1
_GRACE_S = 10.0      # after SIGTERM, before SIGKILL


def coordinator_address(text: str) -> str:
    """``host:port`` with a port in 1..65535 (an IPv6 host in brackets: ``[::1]:8476``)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"must be host:port with a port in 1..65535, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="jaxllm.launch", formatter_class=HelpFormatter,
                    description=__doc__.split("\n\n")[-1])
    parser.add_argument("--num-processes", type=positive_int, required=True,
                        help="processes in the job (one per host, or all on this machine)")
    parser.add_argument("--coordinator", type=coordinator_address, required=True,
                        help="host:port of process 0's jax.distributed coordination service")
    parser.add_argument("--process-id", type=non_negative_int, default=None,
                        help="run this one process; unset: start all of them here")
    parser.add_argument("--heartbeat-timeout", type=positive_int, default=30,
                        help="seconds after which an unresponsive process ends the job")
    parser.add_argument("--init-timeout", type=positive_int, default=300,
                        help="seconds to wait for every process to join")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help=f"-- then a jaxllm command ({', '.join(COMMANDS)}) and its arguments")
    return parser


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, argparse.Namespace]:
    """(launcher options, the jaxllm command's arguments); a mistake in either exits with
    status 2 and one line, before any process starts."""
    from jaxllm.__main__ import build_parser as jaxllm_parser

    parser = build_parser()
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or command[0] not in COMMANDS:
        parser.error(f"expected -- then a jaxllm command ({', '.join(COMMANDS)}), got "
                     f"{' '.join(command) or 'nothing'}")
    if args.process_id is not None and args.process_id >= args.num_processes:
        parser.error(f"--process-id must be below --num-processes ({args.num_processes}), "
                     f"got {args.process_id}")
    args.command = command
    return args, jaxllm_parser().parse_args(command)


def main(argv: list[str] | None = None) -> int:
    args, command = parse_args(argv)
    if args.process_id is None:
        return spawn(args)
    return run_process(args, command)


def run_process(args: argparse.Namespace, command: argparse.Namespace) -> int:
    """This process's part: process 0 runs the command, the others follow its steps."""
    import jax

    from jaxllm.__main__ import build_parser as jaxllm_parser

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               initialization_timeout=args.init_timeout,
                               heartbeat_timeout_seconds=args.heartbeat_timeout)
    client = jax._src.distributed.global_state.client
    if args.process_id == 0:
        try:
            status = run_command(jaxllm_parser(), command, command.command)
        finally:   # followers still waiting (the command failed before its engine) stop too
            from jaxllm.multihost import LEADER_DONE_KEY

            client.key_value_set(LEADER_DONE_KEY, "1", allow_overwrite=True)
    else:
        status = run_command(jaxllm_parser(), command, follow)
    jax.distributed.shutdown()
    return status


def follow(command: argparse.Namespace) -> int:
    """A follower: builds the engine the command would, then replays process 0's steps until
    it stops. A failure ends this process at once (no shutdown barrier: the leader would wait
    on it), which ends the job (``jaxllm.multihost``)."""
    from jaxllm.engine import Engine

    options: dict[str, Any] = engine_options(command)
    if command.command_name == "serve":   # the only command that sets the engine's seed
        options["seed"] = command.seed
    engine = Engine(command.model, **options)
    try:
        engine.multihost.follow()
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    engine.shutdown()
    return 0


def spawn(args: argparse.Namespace) -> int:
    """Starts the P processes here; returns the first failing one's status (terminating the
    rest), or 0 once all have finished."""
    base = [sys.executable, "-m", "jaxllm.launch", "--num-processes", str(args.num_processes),
            "--coordinator", args.coordinator, "--heartbeat-timeout", str(args.heartbeat_timeout),
            "--init-timeout", str(args.init_timeout)]
    children: list[subprocess.Popen] = []
    signalled: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        signalled.append(time.monotonic())
        if children:
            children[0].send_signal(signum)   # process 0 shuts down; it stops the others

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(args.num_processes):
            children.append(subprocess.Popen([*base, "--process-id", str(i), "--", *args.command]))
        return _wait(children, signalled, linger_s=args.heartbeat_timeout + _GRACE_S)
    finally:
        _terminate(children)
        for s, handler in previous.items():
            signal.signal(s, handler)


def _wait(children: list[subprocess.Popen], signalled: list[float], linger_s: float) -> int:
    """The job's status: 0 when every child exits 0; the first failure's; 1 when children
    still run ``linger_s`` after process 0 ended or after a signal."""
    ended = None
    while True:
        statuses = [child.poll() for child in children]
        failed = [(i, s) for i, s in enumerate(statuses) if s not in (None, 0)]
        if failed:
            i, status = failed[0]
            print(f"jaxllm.launch: process {i} exited with status {status}; stopping the others",
                  file=sys.stderr, flush=True)
            return status if status > 0 else 128 - status
        if all(s == 0 for s in statuses):
            return 0
        now = time.monotonic()
        if ended is None and statuses[0] == 0:
            ended = now
        since = min([t for t in (ended, *signalled[:1]) if t is not None], default=now)
        if now - since > linger_s:
            running = [i for i, s in enumerate(statuses) if s is None]
            print(f"jaxllm.launch: processes {running} still running {linger_s:.0f} s after "
                  f"{'a signal' if signalled else 'process 0 finished'}; terminating them",
                  file=sys.stderr, flush=True)
            return 1
        time.sleep(_POLL_S)


def _terminate(children: list[subprocess.Popen]) -> None:
    """SIGTERM to the children still running, SIGKILL to those alive ``_GRACE_S`` later."""
    running = [c for c in children if c.poll() is None]
    for child in running:
        child.terminate()
    deadline = time.monotonic() + _GRACE_S
    for child in running:
        try:
            child.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


if __name__ == "__main__":
    sys.exit(main())
