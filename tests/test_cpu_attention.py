"""What only the C++ CPU attention kernel (XLA FFI) has: split contexts, window skipping on long
contexts, a scan with donated caches, the inputs it refuses, its fallback, its registry entry
and default, and the engine and benchmark on top of it. Every scenario, layout and window runs
in ``test_attention_kernels``; the cases and checks here are ``attention_harness``'s, against
dense attention (every real token's output, zeros for padding tokens, both written caches).

Long decodes with too few work items for the threads have their contexts split and merged.
Windows on contexts of hundreds of keys (40 and 7, shorter than a prefill chunk and a tile) skip
whole context chunks and in-step keys before the window: the cached keys hidden from a whole
row are NaN, so that reading them shows, split contexts included. The engine runs a tiny model
with a windowed and a full layer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import (BF16, F32, IMPLEMENTATIONS, Layout, Padding, build_case,
                               dense_attention, hide_keys_before_windows, missing_compiler,
                               scenario_case, written_cache)
from conftest import make_tiny_llama, random_prompts
from jaxllm.kernels import default_attention
from jaxllm.kernels.paged_attention import cpu_ffi

from jaxllm import Engine, SamplingParams

pytestmark = pytest.mark.skipif(missing_compiler() is not None, reason=missing_compiler() or "")

CPU = IMPLEMENTATIONS["cpu"]
# Too few work items for the threads: long contexts are split into pieces and merged.
LONG_DECODES = [(1100, 1), (700, 1), (300, 2)]
# Contexts of many chunks: a decode, a 24-token chunk (two tiles with G = 3, the second one
# entirely past a window of 7), a 2-token tile with windows one key apart, and a 50-token prefill
# on a short context.
LONG_CONTEXTS = [(300, 1), (300, 24), (290, 2), (5, 50)]


@pytest.mark.parametrize("rows", [LONG_DECODES[:1], LONG_DECODES], ids=["one_row", "three_rows"])
def test_cpu_attention_with_split_contexts(rows):
    CPU.check(build_case(rows, Layout(16, 8, 2, 64)))


@pytest.mark.parametrize("rows, window, dtype", [
    (LONG_CONTEXTS, 40, F32), (LONG_CONTEXTS, 7, F32), (LONG_CONTEXTS, 40, BF16),
    (LONG_DECODES, 600, F32),
], ids=["w40_f32", "w7_f32", "w40_bf16", "split_w600_f32"])
def test_cpu_attention_sliding_window_skips_long_contexts(rows, window, dtype):
    """Windows far shorter than the context: the context chunks before a tile's window are
    skipped, the ones it starts in masked per query row. The last case has too few work items
    for the threads: the windowed context (from key 501 of 1100) is split into pieces. The
    cached keys and values that the window hides from every token of their row are NaN."""
    case = build_case(rows, Layout(16, 9, 3, 64, dtype),
                      Padding.covering([rows], 16, num_tokens=80))
    hide_keys_before_windows(case, window)
    assert np.isnan(case.v_cache.astype(F32)).any()
    CPU.check(case, window)


@pytest.mark.parametrize("windows", [None, (5, 0, 20)], ids=["full", "windowed"])
def test_cpu_attention_under_scan_with_donated_cache(windows):
    """Three layers in a lax.scan (traced layer index; windowed: each layer's window traced from
    the scanned xs, 0 = a full-attention layer), each layer's output its next q, the caches
    donated: every layer's output against dense attention on its queries, both caches written
    at every layer, the donated buffers consumed and no copy of the cache in the compiled step."""
    case = scenario_case("long_mixed", Layout(16, 9, 3, 64))
    q, k, v, k_cache, v_cache, _, metadata = case.args()
    k_cache, v_cache = (jnp.concatenate([c, c[:1]]) for c in (k_cache, v_cache))   # 3 layers
    # Copied from the case, not read from the donated buffers: a numpy view of one would keep
    # it from being donated.
    old_k_cache, old_v_cache = (np.concatenate([c, c[:1]]) for c in (case.k_cache, case.v_cache))
    layer_windows = [None] * 3 if windows is None else list(windows)

    def step(q, k, v, k_cache, v_cache, metadata):
        def body(carry, xs):
            q, k_cache, v_cache = carry
            layer, window = xs
            out, k_cache, v_cache = cpu_ffi.paged_attention(
                q, k, v, k_cache, v_cache, layer, metadata, scale=case.scale, sliding_window=window)
            return (out, k_cache, v_cache), out
        xs = (jnp.arange(3, dtype=jnp.int32),
              None if windows is None else jnp.asarray(windows, jnp.int32))
        (_, k_cache, v_cache), outs = jax.lax.scan(body, (q, k_cache, v_cache), xs)
        return outs, k_cache, v_cache

    donating_step = jax.jit(step, donate_argnums=(3, 4))
    hlo = donating_step.lower(q, k, v, k_cache, v_cache, metadata).compile().as_text()
    cache_shape = ",".join(map(str, k_cache.shape))
    assert not re.search(rf"\[{cache_shape}\]\S* copy\(", hlo)
    outs, got_k_cache, got_v_cache = donating_step(q, k, v, k_cache, v_cache, metadata)
    assert k_cache.is_deleted() and v_cache.is_deleted()
    layer_q = case.q
    for layer, (out, window) in enumerate(zip(np.asarray(outs), layer_windows)):
        want = dense_attention(layer_q, case.k, case.v, old_k_cache, old_v_cache, layer, metadata,
                               scale=case.scale, sliding_window=window)
        np.testing.assert_allclose(out[:case.num_real], want, atol=1e-5, rtol=1e-5)
        layer_q = out
    all_layers = slice(None)
    np.testing.assert_array_equal(np.asarray(got_k_cache), written_cache(
        old_k_cache, case.k, all_layers, metadata.slot_mapping))
    np.testing.assert_array_equal(np.asarray(got_v_cache), written_cache(
        old_v_cache, case.v, all_layers, metadata.slot_mapping))


@pytest.mark.parametrize("field, index, value, message", [
    ("context_lens", 0, 10_000, "context length out of range"),
    ("block_tables", (0, 1), 10_000, "block id out of range"),
    ("token_rows", 1, 99, "token row 99 out of range"),
    ("token_rows", 2, 0, "tokens of row 0 are not contiguous"),
    ("slot_mapping", 0, -1, "slot -1 out of range"),
    ("slot_mapping", 1, 10**8, "slot 100000000 out of range"),
])
def test_cpu_attention_rejects_inputs_it_cannot_follow(field, index, value, message):
    case = scenario_case("long_decode_only", Layout(8, 4, 2, 64))
    metadata = case.metadata
    bad = dataclasses.replace(case, metadata=dataclasses.replace(
        metadata, **{field: getattr(metadata, field).at[index].set(value)}))
    with pytest.raises(Exception, match=message):
        CPU.run(bad)[0].block_until_ready()


def test_cpu_attention_falls_back_to_reference_for_other_head_dims(caplog):
    case = scenario_case("long_decode_only", Layout(8, 4, 2, 24))
    with caplog.at_level(logging.WARNING):
        got = CPU.run(case)
    assert "head dim 24" in caplog.text
    for got_part, want_part in zip(got, IMPLEMENTATIONS["reference"].run(case)):
        np.testing.assert_array_equal(np.asarray(got_part), np.asarray(want_part))


def test_cpu_attention_is_the_cpu_default_with_a_compiler_only(monkeypatch, caplog):
    assert default_attention("cpu") == "cpu"
    # A fresh, unregistered copy of the loader: XLA refuses a second registration of the target
    # from another library, so the registered one must stay cached.
    monkeypatch.setattr(cpu_ffi, "_target", functools.cache(cpu_ffi._target.__wrapped__))
    monkeypatch.setenv("CXX", "no-such-compiler")
    with caplog.at_level(logging.WARNING):
        assert not cpu_ffi.is_available()
        assert default_attention("cpu") == "reference"
    assert caplog.text.count("no-such-compiler") == 1                      # logged once


@pytest.fixture(scope="module")
def tiny_windowed_llama_dir(tmp_path_factory):
    """A tiny Llama whose first layer has a sliding window of 6 and second full attention
    (``layer_types``, as Qwen2 and Gemma 3 configs give them): scanned, the window is traced."""
    path = tmp_path_factory.mktemp("tiny_windowed_llama")
    make_tiny_llama(path, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    return path


@pytest.mark.parametrize("windowed", [False, True], ids=["full", "windowed"])
def test_engine_with_cpu_attention_generates_the_reference_tokens(
        tiny_llama_dir, tiny_windowed_llama_dir, windowed):
    """Greedy tokens of prompts of 5, 19 and 40 tokens (the last one prefilled in chunks of up
    to 32, longer than the window): the CPU kernel's, with unrolled and with scanned layers,
    equal the reference attention's (unrolled)."""
    path = tiny_windowed_llama_dir if windowed else tiny_llama_dir[0]
    prompts = random_prompts([5, 19, 40], seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for attention, scan_layers in (("reference", False), ("cpu", False), ("cpu", True)):
        with Engine(str(path), attention=attention, scan_layers=scan_layers, max_model_len=96,
                    num_blocks=64, block_size=8, max_num_seqs=4,
                    max_num_batched_tokens=32) as engine:
            outputs = engine.generate(prompts, greedy, use_tqdm=False)
        tokens[attention, scan_layers] = [out.outputs[0].token_ids for out in outputs]
    assert tokens["cpu", False] == tokens["reference", False]
    assert tokens["cpu", True] == tokens["reference", False]


def test_attention_benchmark_times_both_implementations():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_cpu.py"
    spec = importlib.util.spec_from_file_location("attention_cpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(rows=2, context=40, new=1, repeats=1)
    assert result["kv_bytes"] == 2 * 40 * 30 * 3 * 64 * 2 * 4
    for name in ("reference", "cpu"):
        assert result[name]["ms"] > 0 and result[name]["gb_per_s"] > 0
