"""Smoke test of benchmarks/startup.py on a tiny random Llama: one cold start-up with one
warmed key (a full warm-up is covered by tests/test_buckets.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "startup.py"
OPTIONS = dict(max_model_len=96, num_blocks=64, block_size=8, max_num_seqs=8, max_num_batched_tokens=64)


def test_startup_cold_writes_json(tiny_llama_dir, tmp_path):
    model_dir, _ = tiny_llama_dir
    out = tmp_path / "startup.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--model", str(model_dir), "--modes", "warmup", "--max-keys", "1",
         "--phases", "cold",
         "--engine-options", json.dumps(OPTIONS), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"warmup/cold"}
    for run in runs.values():
        assert run["startup_s"] >= run["engine_s"] > 0 and run["first_token_s"] > 0
        assert run["num_compilations"] >= 1 and run["policy_keys"] >= 1
        assert run["builtin_warmup"] or run["num_warmed"] == 1
    assert len(runs["warmup/cold"]["first_token"]) == 1
    assert "warmup/cold" in result.stdout and "1st token s" in result.stdout
