#!/usr/bin/env bash
# jaxllm GPU benchmark on one H100/H200 in under 8 minutes, with only what the machine has
# (jax with CUDA, torch, transformers): no downloads, no installs from an index.
#
#   bash benchmarks/gpu.sh [gpu_benchmark.py options, e.g. --attention reference]
#
# Environment: PYTHON (default python3), OUT (results go to $OUT/gpu_bench.json),
# GPU_BENCH_WORKDIR (model and caches; default /tmp/jaxllm_gpu_bench), GPU_BENCH_TIMEOUT
# (seconds for the benchmark itself, default 480), GPU_ENGINE_CHECK=1 (then also run
# gpu_engine_check.py: Pallas vs reference greedy tokens in the engine, on the benchmark's model,
# and print the table again; GPU_ENGINE_CHECK_TIMEOUT, default 150 s), JAXLLM_GPU_INSTALL=auto|none (auto: make
# this checkout importable with `pip install -e . --no-deps --no-build-isolation --no-index`
# unless it already is; none, or a failed install: gpu_benchmark.py imports the checkout with
# pyproject's package-dir mapping itself).
# The benchmark saves its JSON after every section; if it fails or runs out of time, the table
# of what it finished is printed from that JSON.
set -euo pipefail

GPU_SH_START=$(date +%s)
export GPU_SH_START
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=${GPU_BENCH_WORKDIR:-/tmp/jaxllm_gpu_bench}
JSON=${OUT:+$OUT/gpu_bench.json}
JSON=${JSON:-$WORK/gpu_bench.json}
mkdir -p "$WORK" "$(dirname "$JSON")"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export JAXLLM_CACHE=${JAXLLM_CACHE:-$WORK/cache} PIP_DISABLE_PIP_VERSION_CHECK=1

elapsed() { echo "$(( $(date +%s) - GPU_SH_START )) s"; }

echo "== gpu.sh $(date -u +%FT%TZ) on $(hostname), repo $(pwd)"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null \
  || echo "(no nvidia-smi)"

REPO=$(pwd)
checkout_importable() {
  # Run outside the repo so that the current directory does not shadow the installed package.
  (cd / && "$PY" - "$REPO/jaxllm" <<'EOF'
import os, sys
import jaxllm.checkpoints_convert, jaxllm.kernels
sys.exit(os.path.realpath(os.path.dirname(jaxllm.__file__)) != os.path.realpath(sys.argv[1]))
EOF
  ) >/dev/null 2>&1
}

case "${JAXLLM_GPU_INSTALL:-auto}" in
  none)
    echo "== install: skipped (JAXLLM_GPU_INSTALL=none)" ;;
  *)
    if checkout_importable; then
      echo "== install: this checkout is already importable"
    elif timeout 180 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
         && checkout_importable; then
      echo "== install: pip install -e . (no deps, no index) done at $(elapsed)"
    else
      echo "== install: pip install -e . did not make this checkout importable;" \
           "gpu_benchmark.py maps it itself"
    fi ;;
esac

rc=0
timeout --kill-after=15 "${GPU_BENCH_TIMEOUT:-480}" \
  "$PY" benchmarks/gpu_benchmark.py --workdir "$WORK" --json "$JSON" "$@" || rc=$?
if [ -n "${GPU_ENGINE_CHECK:-}" ] && [ -d "$WORK/model" ]; then
  echo "== engine check at $(elapsed): pallas_gpu vs reference greedy tokens (float32)"
  timeout --kill-after=15 "${GPU_ENGINE_CHECK_TIMEOUT:-150}" \
    "$PY" benchmarks/gpu_engine_check.py "$WORK/model" || echo "== engine check failed ($?)"
  [ "$rc" -ne 0 ] || "$PY" benchmarks/gpu_benchmark.py --report "$JSON"
fi
# On success gpu_benchmark.py has printed the time so far and its table, last.
if [ "$rc" -ne 0 ]; then
  echo "== gpu_benchmark.py exited with $rc at $(elapsed) (124: over GPU_BENCH_TIMEOUT);" \
       "results: $JSON; the table of what it saved:"
  "$PY" benchmarks/gpu_benchmark.py --report "$JSON" || echo "(no results saved)"
fi
exit "$rc"
