"""The C++ CPU attention kernel (XLA FFI) against the reference, and as the engine's CPU default.

Cases come from ``test_paged_attention.build_case``: cached context at slots of shuffled,
non-contiguous blocks, flat ragged tokens, padding tokens (row -1, writing into block 0) and
padding rows. The mixed step holds decodes (one on a context of exactly two blocks), a prefill
chunk on cached context, a fresh prefill and a long chunk; with these head counts it covers both
paths of the kernel (few query rows per tile: keys along the vector lanes; many: query rows
along the lanes), several tiles per row, several context and in-step chunks per tile, and
partial chunks; long decodes with too few work items for the threads have their contexts split
and merged. Each check asserts the output of every real token, zeros for padding tokens and
both updated caches.

Sliding windows: every scenario of ``test_paged_attention`` with its ``WINDOWS`` (static None,
and traced ints, 0 among them, as under a scan over layers of different kinds), against dense
masked attention (float32) or the reference (bfloat16); contexts of hundreds of keys with
windows of 40 and 7 (shorter than a prefill chunk and a tile), where whole context chunks and
in-step keys before the window are skipped (the cached keys hidden from a whole row are NaN, so
that reading them shows), split contexts included; windows traced per layer under a scan; and
the engine on a tiny model with a windowed and a full layer.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import re
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_tiny_llama, random_prompts
from jaxllm.kernels import default_attention, get_attention
from jaxllm.kernels.paged_attention import cpu_ffi, reference
from test_paged_attention import SCENARIOS, WINDOWS, build_case, check_case, padded_sizes

from jaxllm import Engine, SamplingParams

# (context_len, num_new) per row.
MIXED = [(13, 1), (45, 1), (16, 1), (21, 7), (0, 12), (37, 26)]
DECODE_ONLY = [(45, 1), (7, 1), (0, 1), (33, 1)]
# Too few work items for the threads: long contexts are split into pieces and merged.
LONG_DECODES = [(1100, 1), (700, 1), (300, 2)]
NUM_TOKENS, NUM_ROWS, MAX_CONTEXT = 80, 8, 45

# (block_size, num_heads, num_kv_heads, head_dim, q dtype, cache dtype): GQA ratios 1, 2, 3
# (SmolLM2), 4 and 8 (the largest "few rows" decode), block sizes 8 and 16, head dims 64 and
# 128, float32 and bfloat16, and bfloat16 caches under float32 queries.
F32, BF16 = jnp.float32, jnp.bfloat16
GRID = [
    (8, 4, 4, 64, F32, F32), (16, 4, 2, 64, BF16, BF16), (8, 8, 2, 128, F32, F32),
    (16, 9, 3, 64, F32, F32), (8, 9, 3, 64, BF16, BF16), (16, 4, 1, 128, BF16, BF16),
    (16, 16, 2, 64, F32, F32), (16, 9, 3, 64, F32, BF16),
]
TOLERANCE = {F32: 1e-5, BF16: 2e-2}
SCALE = 0.7 * 64 ** -0.5                                              # not 1/sqrt(H): must be used


def make_case(rows, block_size, num_heads, num_kv_heads, head_dim, dtype, cache_dtype,
              max_context=MAX_CONTEXT, sizes=None):
    """A case and the arguments of an attention call on it; ``sizes`` (build_case's
    num_tokens, num_rows, table_width, num_blocks) default to this file's padding."""
    key = repr((rows, block_size, num_heads, num_kv_heads, head_dim, jnp.dtype(dtype).name,
                jnp.dtype(cache_dtype).name)).encode()
    rng = np.random.default_rng(zlib.crc32(key))
    if sizes is None:
        sizes = dict(num_tokens=NUM_TOKENS, num_rows=NUM_ROWS,
                     table_width=-(-max_context // block_size) + 1,
                     num_blocks=1 + sum(-(-(ctx + new) // block_size) for ctx, new in rows) + 3)
    case = build_case(rng, rows, block_size, num_heads, num_kv_heads, head_dim, **sizes)
    q, k, v = (jnp.asarray(case[name], dtype) for name in ("q", "k", "v"))
    k_cache, v_cache = (jnp.asarray(case[name], cache_dtype) for name in ("k_cache", "v_cache"))
    return case, (q, k, v, k_cache, v_cache, case["layer"], case["metadata"])


_kernel = jax.jit(lambda *args: cpu_ffi.paged_attention(*args, scale=SCALE))
_reference = jax.jit(lambda *args: reference.paged_attention(*args, scale=SCALE))
# The window traced, as under a scan over layers of different kinds. Jitted once here (not per
# call, as test_paged_attention.call_windowed does) so that each shape compiles once.
_kernel_windowed = jax.jit(
    lambda *args, window: cpu_ffi.paged_attention(*args, scale=SCALE, sliding_window=window))
_reference_windowed = jax.jit(
    lambda *args, window: reference.paged_attention(*args, scale=SCALE, sliding_window=window))


def call(kernel: bool, args, window):
    """The kernel or the reference on args, with the window static (None) or traced."""
    if window is None:
        return (_kernel if kernel else _reference)(*args)
    return (_kernel_windowed if kernel else _reference_windowed)(*args, window=jnp.int32(window))


def assert_windowed_step(case, rows, args, window, dtype, cache_dtype):
    """The kernel with ``window`` against dense masked attention (float32: output and caches,
    through check_case) or the reference (bfloat16); padding tokens output zeros."""
    got = call(True, args, window)
    if dtype == F32 and cache_dtype == F32:
        check_case(case, rows, SCALE, *got, window=window)
        np.testing.assert_array_equal(np.asarray(got[0])[case["num_real"]:], 0.0)
    else:
        assert_matches_reference(case, args, got, call(False, args, window), dtype)


def assert_matches_reference(case, args, got, want, dtype):
    (out, k_cache, v_cache), (want_out, want_k_cache, want_v_cache) = got, want
    assert out.shape == args[0].shape and out.dtype == dtype
    out = np.asarray(out.astype(F32))
    num_real, tol = case["num_real"], TOLERANCE[dtype]
    np.testing.assert_allclose(out[:num_real], np.asarray(want_out.astype(F32))[:num_real],
                               atol=tol, rtol=tol)
    np.testing.assert_array_equal(out[num_real:], 0.0)                  # padding tokens
    np.testing.assert_array_equal(np.asarray(k_cache), np.asarray(want_k_cache))
    np.testing.assert_array_equal(np.asarray(v_cache), np.asarray(want_v_cache))


@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim, dtype, cache_dtype", GRID)
def test_cpu_attention_matches_reference_on_mixed_step(block_size, num_heads, num_kv_heads,
                                                       head_dim, dtype, cache_dtype):
    case, args = make_case(MIXED, block_size, num_heads, num_kv_heads, head_dim, dtype, cache_dtype)
    # Under jit, as in the step: ``layer`` is traced.
    assert_matches_reference(case, args, _kernel(*args), _reference(*args), dtype)


def test_cpu_attention_matches_reference_on_decode_only_step():
    case, args = make_case(DECODE_ONLY, 16, 9, 3, 64, F32, F32)
    assert_matches_reference(case, args, _kernel(*args), _reference(*args), F32)


@pytest.mark.parametrize("rows", [LONG_DECODES[:1], LONG_DECODES], ids=["one_row", "three_rows"])
def test_cpu_attention_matches_reference_with_split_contexts(rows):
    case, args = make_case(rows, 16, 8, 2, 64, F32, F32, max_context=1100)
    assert_matches_reference(case, args, _kernel(*args), _reference(*args), F32)


# (block_size, num_heads, num_kv_heads, head_dim, q dtype, cache dtype): G = 3 (decode tiles and
# 2-token tiles on the few-rows path, longer chunks on the many-rows one) in float32, and G = 1
# (tiles of up to 8 tokens on the few-rows path) in bfloat16.
WINDOWED_LAYOUTS = [(4, 9, 3, 64, F32, F32), (8, 4, 4, 64, BF16, BF16)]


@pytest.mark.parametrize("window", WINDOWS)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("block_size, num_heads, num_kv_heads, head_dim, dtype, cache_dtype",
                         WINDOWED_LAYOUTS, ids=["f32", "bf16"])
def test_cpu_attention_sliding_window_matches_on_scenarios(block_size, num_heads, num_kv_heads,
                                                           head_dim, dtype, cache_dtype,
                                                           scenario, window):
    """Decode-only, prefill-only, chunk-with-context and mixed steps, padded to one shape per
    layout so that each compiles once per kernel and static / traced window."""
    rows = SCENARIOS[scenario]
    case, args = make_case(rows, block_size, num_heads, num_kv_heads, head_dim, dtype,
                           cache_dtype, sizes=dict(num_tokens=NUM_TOKENS, num_rows=NUM_ROWS,
                                                   **padded_sizes(block_size)))
    assert_windowed_step(case, rows, args, window, dtype, cache_dtype)


# Contexts of many chunks: a decode, a 24-token chunk (two tiles with G = 3, the second one
# entirely past a window of 7), a 2-token tile with windows one key apart, and a 50-token prefill
# on a short context.
LONG_CONTEXTS = [(300, 1), (300, 24), (290, 2), (5, 50)]


@pytest.mark.parametrize("rows, max_context, window, dtype", [
    (LONG_CONTEXTS, 300, 40, F32), (LONG_CONTEXTS, 300, 7, F32), (LONG_CONTEXTS, 300, 40, BF16),
    (LONG_DECODES, 1100, 600, F32),
], ids=["w40_f32", "w7_f32", "w40_bf16", "split_w600_f32"])
def test_cpu_attention_sliding_window_skips_long_contexts(rows, max_context, window, dtype):
    """Windows far shorter than the context: the context chunks before a tile's window are
    skipped, the ones it starts in masked per query row. The last case has too few work items
    for the threads: the windowed context (from key 501 of 1100) is split into pieces.

    Float32: the cached keys and values that the window hides from every token of their row are
    NaN, so that reading them at all, even masked (0 x NaN), shows in the output; checked
    against dense attention on the clean sequences (the reference reads and masks them)."""
    case, args = make_case(rows, 16, 9, 3, 64, dtype, dtype, max_context=max_context)
    if dtype == F32:
        block_size, tables = 16, np.asarray(case["metadata"].block_tables)
        for row, (ctx, _) in enumerate(rows):
            hidden = np.arange(max(ctx - window + 1, 0))          # before the row's first window
            blocks = tables[row, hidden // block_size]
            for name in ("k_cache", "v_cache"):
                case[name][case["layer"], blocks, hidden % block_size] = np.nan
        args = (*args[:3], jnp.asarray(case["k_cache"]), jnp.asarray(case["v_cache"]), *args[5:])
    assert_windowed_step(case, rows, args, window, dtype, dtype)


@pytest.mark.parametrize("windows", [None, (5, 0, 20)], ids=["full", "windowed"])
def test_cpu_attention_under_scan_with_donated_cache(windows):
    """Three layers in a lax.scan (traced layer index; windowed: each layer's window traced from
    the scanned xs, 0 = a full-attention layer), each layer's output its next q/k/v, the caches
    donated: same outputs and caches as the reference, the donated buffers consumed and no copy
    of the cache in the compiled step."""
    case, (q, k, v, k_cache, v_cache, _, inputs) = make_case(MIXED, 16, 9, 3, 64, F32, F32)
    k_cache, v_cache = (jnp.concatenate([c, c[:1]]) for c in (k_cache, v_cache))   # 3 layers

    def layers(attention):
        def step(q, k, v, k_cache, v_cache, inputs):
            def body(carry, xs):
                q, k_cache, v_cache = carry
                layer, window = xs
                out, k_cache, v_cache = attention(q, k, v, k_cache, v_cache, layer, inputs,
                                                  scale=SCALE, sliding_window=window)
                return (out, k_cache, v_cache), out
            xs = (jnp.arange(3, dtype=jnp.int32),
                  None if windows is None else jnp.asarray(windows, jnp.int32))
            (_, k_cache, v_cache), outs = jax.lax.scan(body, (q, k_cache, v_cache), xs)
            return outs, k_cache, v_cache
        return jax.jit(step, donate_argnums=(3, 4))

    kernel_step = layers(cpu_ffi.paged_attention)
    hlo = kernel_step.lower(q, k, v, k_cache, v_cache, inputs).compile().as_text()
    cache_shape = ",".join(map(str, k_cache.shape))
    assert not re.search(rf"\[{cache_shape}\]\S* copy\(", hlo)
    want = layers(reference.paged_attention)(q, k, v, k_cache.copy(), v_cache.copy(), inputs)
    got = kernel_step(q, k, v, k_cache, v_cache, inputs)
    assert k_cache.is_deleted() and v_cache.is_deleted()
    num_real = case["num_real"]
    np.testing.assert_allclose(np.asarray(got[0])[:, :num_real], np.asarray(want[0])[:, :num_real],
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))
    np.testing.assert_array_equal(np.asarray(got[2]), np.asarray(want[2]))


@pytest.mark.parametrize("field, index, value, message", [
    ("context_lens", 0, 10_000, "context length out of range"),
    ("block_tables", (0, 1), 10_000, "block id out of range"),
    ("token_rows", 1, 99, "token row 99 out of range"),
    ("token_rows", 2, 0, "tokens of row 0 are not contiguous"),
    ("slot_mapping", 0, -1, "slot -1 out of range"),
    ("slot_mapping", 1, 10**8, "slot 100000000 out of range"),
])
def test_cpu_attention_rejects_inputs_it_cannot_follow(field, index, value, message):
    _, (q, k, v, k_cache, v_cache, layer, inputs) = make_case(DECODE_ONLY, 8, 4, 2, 64, F32, F32)
    bad = dataclasses.replace(inputs, **{field: getattr(inputs, field).at[index].set(value)})
    with pytest.raises(Exception, match=message):
        _kernel(q, k, v, k_cache, v_cache, layer, bad)[0].block_until_ready()


def test_cpu_attention_falls_back_to_reference_for_other_head_dims(caplog):
    _, args = make_case(DECODE_ONLY, 8, 4, 2, 24, F32, F32)
    with caplog.at_level(logging.WARNING):
        got = _kernel(*args)
    assert "head dim 24" in caplog.text
    for got_part, want_part in zip(got, _reference(*args)):
        np.testing.assert_array_equal(np.asarray(got_part), np.asarray(want_part))


def test_cpu_attention_registry_and_default_with_and_without_a_compiler(monkeypatch, caplog):
    assert get_attention("cpu") is cpu_ffi.paged_attention
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


@pytest.mark.parametrize("scan_layers", [False, True], ids=["unrolled", "scanned"])
@pytest.mark.parametrize("windowed", [False, True], ids=["full", "windowed"])
def test_engine_with_cpu_attention_generates_the_reference_tokens(
        tiny_llama_dir, tiny_windowed_llama_dir, windowed, scan_layers):
    """Greedy tokens of prompts of 5, 19 and 40 tokens (the last one prefilled in chunks of up
    to 32, longer than the window), the same with either attention."""
    path = tiny_windowed_llama_dir if windowed else tiny_llama_dir[0]
    prompts = random_prompts([5, 19, 40], seed=4)
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = {}
    for attention in ("cpu", "reference"):
        with Engine(str(path), attention=attention, scan_layers=scan_layers, max_model_len=96,
                    num_blocks=64, block_size=8, max_num_seqs=4,
                    max_num_batched_tokens=32) as engine:
            outputs = engine.generate(prompts, greedy, use_tqdm=False)
        tokens[attention] = [out.outputs[0].token_ids for out in outputs]
    assert tokens["cpu"] == tokens["reference"]


def test_attention_benchmark_times_both_implementations():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "attention_cpu.py"
    spec = importlib.util.spec_from_file_location("attention_cpu_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.measure(rows=2, context=40, new=1, repeats=1)
    assert result["kv_bytes"] == 2 * 40 * 30 * 3 * 64 * 2 * 4
    for name in ("reference", "cpu"):
        assert result[name]["ms"] > 0 and result[name]["gb_per_s"] > 0
