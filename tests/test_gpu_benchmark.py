"""benchmarks/gpu.sh and gpu_benchmark.py --smoke: the whole GPU benchmark on CPU, tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_benchmark.py"


def _table(stdout: str) -> list[list[str]]:
    """The rows of the markdown table, which must end the output."""
    lines = stdout.strip().splitlines()
    header = max(i for i, line in enumerate(lines) if line.startswith("| metric |"))
    rows = lines[header + 2:]
    assert rows and all(line.startswith("| ") and line.endswith(" |") for line in rows), lines[header:]
    return [[cell.strip() for cell in line[2:-2].split(" | ")] for line in rows]


@pytest.mark.slow  # ~60-80 s on 2 CPU cores: a dozen step compilations
def test_gpu_sh_smoke_prints_table_last_and_writes_json(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), GPU_BENCH_WORKDIR=str(tmp_path / "work"),
               JAXLLM_GPU_INSTALL="none", PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke"], check=False,
                            cwd=tmp_path,
                            env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert result.stdout.index("device: cpu") < result.stdout.index("jax 0.")
    data = json.loads((out / "gpu_bench.json").read_text())
    assert data["smoke"] and data["platform"] == "cpu" and data["jax"]
    sections = data["sections"]
    assert {k: s["status"] for k, s in sections.items()} == {
        "hf": "ok", "hbm": "ok", "attention": "ok", "jaxllm[reference]": "ok",
        "attention_sweep": "ok"}, sections

    concurrency = data["plan"]["concurrency"]
    hf, engine, hbm = sections["hf"], sections["jaxllm[reference]"], sections["hbm"]
    for c in map(str, concurrency):
        assert hf[c]["output_tokens_per_s"] > 0 and engine[c]["output_tokens_per_s"] > 0
        assert hf[c]["output_tokens"] == engine[c]["output_tokens"] == int(c) * data["plan"]["output_len"]
        # The replayed warm-up compiled every bucket; its prompts shared no block with these.
        assert engine[c]["num_compilations_after"] == engine[c]["num_compilations_before"]
        assert engine[c]["prefix_cached_tokens"] == 0
    assert engine["batch1"]["ms_per_step"] > 0 and hf["batch1"]["ms_per_step"] > 0
    assert hbm["copy_bandwidth_gb_s"] > 0 and hbm["floor_ms_per_step"] > 0
    # 2 layers x (4 attention + 3 MLP matrices + 2 norms) + embedding, head, final norm; bf16.
    m = data["plan"]["model"]
    h, i, v, kv = m["hidden_size"], m["intermediate_size"], m["vocab_size"], m["num_key_value_heads"]
    kv_dim = kv * h // m["num_attention_heads"]
    per_layer = 2 * h * h + 2 * h * kv_dim + 3 * h * i + 2 * h
    assert hbm["weight_bytes"] == 2 * (m["num_hidden_layers"] * per_layer + 2 * v * h + h)
    for shape in ("decode", "prefill"):
        assert sections["attention"][shape]["reference"]["ms"] > 0
        assert "skipped" in sections["attention"][shape]["pallas_gpu"]

    sweep = sections["attention_sweep"]["4x48"]
    assert sweep["reference"] > 0 and sweep["pallas_gpu"].startswith("skipped: needs a GPU")
    assert "| 4x48 | reference |" in result.stdout
    window = sections["attention_sweep"]["4x48 window 16"]
    assert window["reference"] > 0 and window["reference, window=16"] > 0
    assert window["pallas_gpu"].startswith("skipped: needs a GPU")

    rows = _table(result.stdout)
    assert rows == [list(r) for r in data["table"]]
    by_metric = {r[0]: r[1:] for r in rows}
    assert float(by_metric["batch-1 decode ms/step (reference)"][0]) > 0
    assert by_metric["batch-1 decode ms/step (reference)"][2].endswith("x floor")
    for c in concurrency:
        jax_tps, hf_tps, ratio = by_metric[f"output tok/s, {c} concurrent (reference)"]
        assert float(jax_tps) > 0 and hf_tps.endswith("(HF)") and ratio.endswith("x HF")
    attention_rows = [r for r in rows if r[0].startswith("attention ")]
    assert len(attention_rows) == 2
    assert all(r[1].startswith("skipped: pallas_gpu needs a GPU") for r in attention_rows)
    assert not any("FAILED" in cell for row in rows for cell in row)


def _load():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def test_table_reports_failures_and_missing_sections_per_cell(capsys):
    """A failed or unfinished part is a FAILED/not-run cell; every other cell keeps its number."""
    bench = _load()
    results = {
        "device": "NVIDIA H100", "jax": "0.11.2", "smoke": False,
        "plan": {"attention": ["pallas_gpu", "reference"], "concurrency": [64, 256]},
        "sections": {
            "hf": {"status": "failed", "error": "RuntimeError: the hf worker exited with 1",
                   "batch1": {"ms_per_step": 20.0}, "64": {"output_tokens_per_s": 1000.0},
                   "256": {"error": "OutOfMemoryError: CUDA out of memory"}},
            "hbm": {"status": "ok", "copy_bandwidth_gb_s": 3000.0, "weight_bytes": 2_200_000_000,
                    "floor_ms_per_step": 0.7333},
            "attention": {"status": "ok",
                          "decode": {"reference": {"ms": 2.0}, "pallas_gpu": {"ms": 0.5},
                                     "speedup": 4.0, "max_abs_diff": 0.01},
                          "prefill": {"reference": {"ms": 3.0},
                                      "pallas_gpu": {"error": "ValueError: unknown | bad\nname"}}},
            "jaxllm[pallas_gpu]": {"status": "failed",
                                   "error": "ValueError: unknown attention implementation"},
            "jaxllm[reference]": {"status": "running", "batch1": {"ms_per_step": 2.2},
                                  "64": {"output_tokens_per_s": 5000.0}},
        },
    }
    rows = {r[0]: r[1:] for r in bench.table_rows(results)}
    assert rows["HBM copy bandwidth GB/s"] == ("3000", "2.20 GB of weights", "floor 0.733 ms/step")
    assert rows["batch-1 decode ms/step (reference)"] == ("2.20", "0.733 (HBM floor)", "3.0x floor")
    assert rows["batch-1 decode ms/step (reference) vs HF"] == ("2.20", "20.00 (HF)", "9.09x faster")
    assert rows["output tok/s, 64 concurrent (reference)"] == ("5000", "1000 (HF)", "5.00x HF")
    assert rows["output tok/s, 256 concurrent (reference)"] == (
        "killed while running", "HF: FAILED: OutOfMemoryError: CUDA out of memory", "")
    for metric, cells in rows.items():
        if "(pallas_gpu)" in metric:
            assert cells[0] == "FAILED: ValueError: unknown attention implementation", metric
    decode = next(v for k, v in rows.items() if k.startswith("attention decode"))
    prefill = next(v for k, v in rows.items() if k.startswith("attention prefill"))
    assert decode == ("0.500", "2.000 (reference)", "speedup 4.00x (max diff 0.01)")
    assert prefill[0] == "FAILED: ValueError: unknown / bad name" and prefill[2] == ""
    bench.print_table(results)
    assert capsys.readouterr().out.rstrip().splitlines()[-1].startswith("| attention prefill")


def test_sweep_table_prints_window_timings_and_their_difference(capsys):
    """A windowed sweep part: its timings against the full reference, its output difference as
    a number (not a time), a failed variant as its error."""
    bench = _load()
    results = {"sections": {"attention_sweep": {"status": "ok", "64x4096 window 512": {
        "reference": 2.0, "reference, window=512": 2.1, "full attention": 0.5,
        "window=512": 0.1, "window=512 as an operand": "FAILED: ValueError: x",
        "max_abs_diff": 0.0039}}}}
    bench.print_sweep(results)
    lines = capsys.readouterr().out.splitlines()
    assert "| 64x4096 window 512 | window=512 | 0.100 | 20.00x |" in lines
    assert "| 64x4096 window 512 | window=512 as an operand | FAILED: ValueError: x |  |" in lines
    assert "| 64x4096 window 512 | max abs diff, windowed pallas_gpu vs reference | 0.0039 | |" in lines


def test_import_jaxllm_maps_kernels_without_an_install(tmp_path):
    """Without an install, the checkout imports with kernels/ as jaxllm.kernels (package-dir)."""
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('gb', {str(SCRIPT)!r})\n"
            "gb = sys.modules['gb'] = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(gb)\n"
            "sys.modules.pop('jaxllm', None)\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
            "module, how = gb.import_jaxllm()\n"
            "import jaxllm.kernels, jaxllm.checkpoints_convert\n"
            "print(how, jaxllm.kernels.__file__, jaxllm.kernels.get_attention('reference').__name__)\n")
    result = subprocess.run([sys.executable, "-c", code], check=False, cwd=tmp_path,
                            capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "not installed" in result.stdout
    assert str(ROOT / "kernels" / "__init__.py") in result.stdout and "paged_attention" in result.stdout


def test_gpu_engine_check_compares_two_attention_implementations(tiny_llama_dir, capsys):
    """The GPU engine check, run on CPU: the reference against itself agrees everywhere."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu_engine_check
    finally:
        sys.path.pop(0)
    path, _ = tiny_llama_dir
    assert gpu_engine_check.main([str(path), "--prompts", "3", "--tokens", "4",
                                  "--attention", "reference", "--against", "reference"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("gpu_engine_check:"))
    result = json.loads(line.split(":", 1)[1])
    assert result["identical"] == 3 and result["first_divergence"] is None
    assert result["max_logprob_diff"] == 0.0


@pytest.mark.slow  # ~60 s on 2 CPU cores: the attention steps and the sweep compile
def test_sections_runs_only_the_named_ones(tmp_path):
    """--sections attention sweep: the kernel timings alone (no model, no engine), on CPU."""
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--sections", "attention", "sweep",
         "--workdir", str(tmp_path / "work"), "--json", str(out)],
        check=False, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, JAXLLM_CACHE=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sections = json.loads(out.read_text())["sections"]
    assert sorted(sections) == ["attention", "attention_sweep"]
    assert sections["attention"]["decode"]["reference"]["ms"] > 0
    assert sections["attention_sweep"]["4x48"]["reference"] > 0
    assert sections["attention_sweep"]["4x48 window 16"]["reference, window=16"] > 0
    rows = {r[0]: r[1] for r in _table(result.stdout)}
    assert rows["HBM copy bandwidth GB/s"] == "not run"
