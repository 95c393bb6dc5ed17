"""One harness for every paged attention implementation: the cases, the ground truth, the check.

A case is one step of the model runner's layout: rows given as (context_len, new_tokens) pairs,
their cached context written at slots of shuffled, non-contiguous blocks (never block 0) of one
random layer of a garbage-filled cache, the step's tokens flat and ragged, padding tokens (row
-1, writing into block 0) and padding rows (all-zero block tables). Cases are padded to a
``Padding`` so that every scenario of one layout shares one compilation.

The ground truth, ``dense_attention``, is causal attention in float64 numpy written the plain
way: per token, the keys its window lets it see (its row's cached context gathered through the
block table, then the row's in-step tokens up to itself), GQA by repeating kv heads. It reads
the inputs as the implementations get them (bfloat16 included), and only the visible keys, so a
cache poisoned with NaN where no token may look (``hide_keys_before_windows``) leaves it clean
while any implementation that reads those keys at all (even masked, as 0 x NaN) fails.

Quantized caches (a layout whose cache dtype is int8 or float8_e4m3fn): the context is written
into the garbage cache quantized, as the step writes it (``quantized_kv.quantize``), and the
ground truth reads every key and value as the cache holds it (dequantized, this step's too), so
the float tolerances still apply; ``check_quantization_error`` bounds the distance to attention
over the unquantized keys and values separately.

``IMPLEMENTATIONS`` names the implementations under test, each with the options it runs with
here (Pallas in interpret mode) and what it writes for padding tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxllm.kernels import cpu_build
from jaxllm.kernels.paged_attention import cpu_ffi, pallas_gpu, reference
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kernels.paged_attention.quantized_kv import QuantizedKV, dequantize, quantize

F32, BF16 = jnp.float32, jnp.bfloat16
INT8, FP8 = jnp.int8, jnp.float8_e4m3fn
QUANTIZED = (jnp.dtype(INT8), jnp.dtype(FP8))
NUM_LAYERS = 2
# Output tolerance (atol and rtol) against the float64 ground truth, by the narrowest dtype read.
TOLERANCE = {"float32": 1e-5, "bfloat16": 2e-2}

# (context_len, new_tokens) per row: the scenarios every implementation runs.
SCENARIOS = {
    "decode_only": [(5, 1), (12, 1), (1, 1), (16, 1)],
    "prefill_only": [(0, 7), (0, 3), (0, 1), (0, 9)],
    "chunk_with_context": [(8, 5), (3, 6), (4, 4)],
    "mixed": [(9, 1), (0, 6), (4, 3), (17, 1), (0, 1)],
    # Decodes (one on a context of exactly two blocks of 8), a prefill chunk on cached context,
    # a fresh prefill and a long chunk: several tiles per row and several context and in-step
    # chunks per tile in the kernels, partial chunks included.
    "long_mixed": [(13, 1), (45, 1), (16, 1), (21, 7), (0, 12), (37, 26)],
    "long_decode_only": [(45, 1), (7, 1), (0, 1), (33, 1)],
}
# Sliding windows: None (full attention, static), then traced, as under a scan over layers of
# different kinds: 1 (only itself), 4 (shorter than most contexts and prefills) and 0 (a
# full-attention layer under the same scan).
WINDOWS = [None, 1, 4, 0]


@dataclasses.dataclass(frozen=True)
class Layout:
    """Shapes and dtypes of a case: q/k/v in ``dtype``, the caches in ``cache_dtype``."""

    block_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    dtype: type = F32
    cache_dtype: type | None = None          # None: the same as dtype

    @property
    def cache(self) -> type:
        return self.dtype if self.cache_dtype is None else self.cache_dtype

    @property
    def quantized(self) -> bool:
        """Whether the cache is a ``QuantizedKV`` (int8 or fp8 values with scales)."""
        return jnp.dtype(self.cache) in QUANTIZED

    def __str__(self) -> str:
        name = f"z{self.block_size}-n{self.num_heads}k{self.num_kv_heads}-h{self.head_dim}"
        name += f"-{jnp.dtype(self.dtype).name}"
        return name if self.cache is self.dtype else f"{name}-cache_{jnp.dtype(self.cache).name}"


@dataclasses.dataclass(frozen=True)
class Padding:
    """The padded shapes of a step: tokens, rows, block-table width and blocks in the pool."""

    num_tokens: int
    num_rows: int
    table_width: int
    num_blocks: int

    @classmethod
    def covering(cls, row_sets, block_size: int, num_tokens: int, num_rows: int = 8) -> Padding:
        """Room for each of ``row_sets`` (lists of (context_len, new_tokens) rows), so that
        they all compile to one shape."""
        max_context = max(ctx for rows in row_sets for ctx, _ in rows)
        num_blocks = max(sum(-(-(ctx + new) // block_size) for ctx, new in rows)
                         for rows in row_sets)
        return cls(num_tokens=num_tokens, num_rows=num_rows,
                   table_width=-(-max_context // block_size) + 1, num_blocks=1 + num_blocks + 3)


@dataclasses.dataclass
class Case:
    """One step's inputs; the caches are numpy arrays in the cache dtype, so that a test can
    poison them before ``args``. A quantized case also has the caches' scales [L, B, Z, K]
    and, in ``exact_caches``, the float32 caches it was quantized from."""

    rows: list[tuple[int, int]]
    layout: Layout
    scale: float
    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    k_cache: np.ndarray
    v_cache: np.ndarray
    layer: int
    metadata: AttentionMetadata
    num_real: int
    k_scales: np.ndarray | None = None
    v_scales: np.ndarray | None = None
    exact_caches: tuple[np.ndarray, np.ndarray] | None = None

    def caches(self) -> tuple:
        """(k_cache, v_cache) as attention takes them: arrays, or QuantizedKV."""
        if self.k_scales is None:
            return jnp.asarray(self.k_cache), jnp.asarray(self.v_cache)
        return (QuantizedKV(jnp.asarray(self.k_cache), jnp.asarray(self.k_scales)),
                QuantizedKV(jnp.asarray(self.v_cache), jnp.asarray(self.v_scales)))

    def args(self) -> tuple:
        """The positional arguments of an attention call on this case."""
        return (*(jnp.asarray(a) for a in (self.q, self.k, self.v)), *self.caches(),
                self.layer, self.metadata)

    def block_table(self, row: int) -> np.ndarray:
        return np.asarray(self.metadata.block_tables)[row]


def build_case(rows, layout: Layout, padding: Padding | None = None) -> Case:
    """A case of ``rows`` (context_len, new_tokens) in ``layout``, padded to ``padding``
    (default: 64 tokens, room for ``rows`` alone); its random draws are fixed by its arguments.
    The softmax scale is 0.7 / sqrt(head_dim), not the default: it must be used."""
    padding = padding or Padding.covering([rows], layout.block_size, num_tokens=64)
    rng = np.random.default_rng(zlib.crc32(repr((rows, str(layout), padding)).encode()))
    block_size, num_kv_heads, head_dim = layout.block_size, layout.num_kv_heads, layout.head_dim
    blocks_per_row = [-(-(ctx + new) // block_size) for ctx, new in rows]
    assert 1 + sum(blocks_per_row) <= padding.num_blocks and len(rows) <= padding.num_rows
    free = rng.permutation(np.arange(1, padding.num_blocks))        # shuffled, never block 0
    row_blocks = np.split(free[:sum(blocks_per_row)], np.cumsum(blocks_per_row)[:-1])

    def normal(*shape, scale=1.0):
        return (rng.normal(size=shape) * scale).astype(np.float32)

    cache_shape = (NUM_LAYERS, padding.num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = normal(*cache_shape), normal(*cache_shape)   # garbage everywhere
    layer = int(rng.integers(NUM_LAYERS))                           # the other layer must stay put
    positions, slots, token_rows, new_k, new_v = [], [], [], [], []
    block_tables = np.zeros((padding.num_rows, padding.table_width), np.int32)
    for row, (ctx, new) in enumerate(rows):
        seq_k = normal(ctx + new, num_kv_heads, head_dim)
        seq_v = normal(ctx + new, num_kv_heads, head_dim)
        seq_slots = row_blocks[row][np.arange(ctx + new) // block_size] * block_size \
            + np.arange(ctx + new) % block_size
        blocks, offsets = np.divmod(seq_slots[:ctx], block_size)
        k_cache[layer, blocks, offsets], v_cache[layer, blocks, offsets] = seq_k[:ctx], seq_v[:ctx]
        block_tables[row, :-(-ctx // block_size)] = row_blocks[row][:-(-ctx // block_size)]
        positions += range(ctx, ctx + new)
        slots += list(seq_slots[ctx:])
        token_rows += [row] * new
        new_k.append(seq_k[ctx:])
        new_v.append(seq_v[ctx:])
    num_real = len(positions)
    num_pad = padding.num_tokens - num_real
    positions += [0] * num_pad
    slots += [i % block_size for i in range(num_pad)]               # padding writes to block 0
    token_rows += [-1] * num_pad
    context_lens = np.zeros(padding.num_rows, np.int32)
    context_lens[:len(rows)] = [ctx for ctx, _ in rows]
    metadata = AttentionMetadata(
        positions=jnp.asarray(positions, jnp.int32), slot_mapping=jnp.asarray(slots, jnp.int32),
        token_rows=jnp.asarray(token_rows, jnp.int32), block_tables=jnp.asarray(block_tables),
        context_lens=jnp.asarray(context_lens))
    q = normal(padding.num_tokens, layout.num_heads, head_dim)
    k = np.concatenate([*new_k, normal(num_pad, num_kv_heads, head_dim, scale=10)])
    v = np.concatenate([*new_v, normal(num_pad, num_kv_heads, head_dim, scale=10)])
    dtype, cache_dtype = np.dtype(layout.dtype), np.dtype(layout.cache)
    case = Case(rows=rows, layout=layout, scale=0.7 * head_dim ** -0.5, q=q.astype(dtype),
                k=k.astype(dtype), v=v.astype(dtype), k_cache=k_cache.astype(cache_dtype),
                v_cache=v_cache.astype(cache_dtype), layer=layer, metadata=metadata,
                num_real=num_real)
    if layout.quantized:
        # The whole garbage-and-context cache quantized, as the steps that wrote it would have.
        k_quant, v_quant = (quantize(jnp.asarray(c), cache_dtype) for c in (k_cache, v_cache))
        case.k_cache, case.v_cache = np.asarray(k_quant.values), np.asarray(v_quant.values)
        case.k_scales, case.v_scales = np.asarray(k_quant.scales), np.asarray(v_quant.scales)
        case.exact_caches = (k_cache, v_cache)
    return case


def scenario_case(scenario: str, layout: Layout) -> Case:
    """The case of ``SCENARIOS[scenario]``, padded like every scenario of its block size."""
    padding = Padding.covering(SCENARIOS.values(), layout.block_size, num_tokens=64)
    return build_case(SCENARIOS[scenario], layout, padding)


def hide_keys_before_windows(case: Case, window: int, chunk: int = 1) -> None:
    """Sets to NaN, in both caches, every cached key that ``window`` hides from all of its row's
    tokens (those before its first token's window start), rounded down to whole chunks of
    ``chunk`` keys (an implementation may read the chunk a window starts in)."""
    for row, (ctx, _) in enumerate(case.rows):
        hidden = np.arange(max(ctx - window + 1, 0) // chunk * chunk)
        blocks = case.block_table(row)[hidden // case.layout.block_size]
        # An int8 value cannot be NaN: poison a quantized cache's scales.
        poisoned = ((case.k_scales, case.v_scales) if case.k_scales is not None
                    else (case.k_cache, case.v_cache))
        for cache in poisoned:
            cache[case.layer, blocks, hidden % case.layout.block_size] = np.nan


def dense_attention(q, k, v, k_cache, v_cache, layer: int, metadata: AttentionMetadata, *,
                    scale: float, sliding_window: int | None = None) -> np.ndarray:
    """Ground truth: the output [real tokens, N, H] in float64 of attention with the
    implementations' signature (without the cache write), row by row over its cached context
    (gathered through the block table) and its tokens of this step: the token at position p
    sees positions p - W < key <= p with a window W > 0 (transformers' mask), else key <= p.
    Keys that no token of the row sees are never read. From a quantized cache, every key and
    value (this step's too) is read as the cache holds it."""
    if isinstance(k_cache, QuantizedKV):
        k, v = (_as_stored(new, cache) for new, cache in ((k, k_cache), (v, v_cache)))
        k_cache, v_cache = (np.asarray(cache.values)[layer].astype(np.float64)
                            * np.asarray(cache.scales)[layer][..., None]
                            for cache in (k_cache, v_cache))
    else:
        k_cache, v_cache = (np.asarray(cache)[layer].astype(np.float64)
                            for cache in (k_cache, v_cache))
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    token_rows, positions, context_lens, block_tables = (
        np.asarray(a) for a in (metadata.token_rows, metadata.positions, metadata.context_lens,
                                metadata.block_tables))
    block_size, group = k_cache.shape[1], q.shape[1] // k.shape[1]
    window = sliding_window if sliding_window and sliding_window > 0 else None
    out = []
    for row in dict.fromkeys(token_rows[token_rows >= 0]):          # in token order
        tokens = np.flatnonzero(token_rows == row)
        query_pos = positions[tokens]
        context = np.arange(context_lens[row])
        if window:
            context = context[context > query_pos.min() - window]
        slots = (block_tables[row, context // block_size], context % block_size)
        key_pos = np.concatenate([context, query_pos])
        keys = np.repeat(np.concatenate([k_cache[slots], k[tokens]]), group, axis=1)
        values = np.repeat(np.concatenate([v_cache[slots], v[tokens]]), group, axis=1)
        seen = key_pos[None, :] <= query_pos[:, None]                 # [Q, C]
        if window:
            seen &= key_pos[None, :] > query_pos[:, None] - window
        scores = np.where(seen[:, None], np.einsum("qnh,cnh->qnc", q[tokens], keys) * scale,
                          -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        out.append(np.einsum("qnc,cnh->qnh", probs / probs.sum(-1, keepdims=True), values))
    return np.concatenate(out)


def _as_stored(new, cache: QuantizedKV) -> np.ndarray:
    """``new`` [T, K, H] quantized to the cache's dtype and back, in new's dtype (what the
    implementations read for this step's tokens)."""
    new = jnp.asarray(new)
    return np.asarray(dequantize(quantize(new, cache.dtype), new.dtype))


def written_cache(cache: np.ndarray, new: np.ndarray, layer: int | slice,
                  slot_mapping) -> np.ndarray:
    """A copy of ``cache`` after the step: ``new`` [T, K, H] of every token (padding ones
    included, a later token winning a shared slot) at its slot of ``layer`` (an index: one layer
    or a slice of them), in the cache dtype; nothing else changed."""
    blocks, offsets = np.divmod(np.asarray(slot_mapping), cache.shape[2])
    cache = cache.copy()
    cache[layer, blocks, offsets] = new.astype(cache.dtype)
    return cache


def check_step(case: Case, got, window: int | None, *, zero_padding: bool) -> None:
    """An implementation's (out, k_cache, v_cache) on ``case`` against the ground truth: every
    real token's output within the dtypes' tolerance, padding tokens' output zero
    (``zero_padding``) or at least finite, and both caches exactly as ``written_cache`` (a
    quantized cache's values and scales as ``quantize`` makes them)."""
    out, k_cache, v_cache = got
    layout = case.layout
    assert out.shape == case.q.shape and out.dtype == layout.dtype
    out = np.asarray(out.astype(F32))
    read_dtypes = (layout.dtype,) if layout.quantized else (layout.dtype, layout.cache)
    tolerance = max(TOLERANCE[jnp.dtype(dtype).name] for dtype in read_dtypes)
    want = dense_attention(*case.args(), scale=case.scale, sliding_window=window)
    np.testing.assert_allclose(out[:case.num_real], want, atol=tolerance, rtol=tolerance)
    if zero_padding:
        np.testing.assert_array_equal(out[case.num_real:], 0.0)
    else:
        assert np.isfinite(out[case.num_real:]).all()
    slots = case.metadata.slot_mapping
    if layout.quantized:
        for name, got_cache, cache, scales, new in (
                ("k_cache", k_cache, case.k_cache, case.k_scales, case.k),
                ("v_cache", v_cache, case.v_cache, case.v_scales, case.v)):
            assert isinstance(got_cache, QuantizedKV), name
            want = quantize(jnp.asarray(new), cache.dtype)
            np.testing.assert_array_equal(
                np.asarray(got_cache.values).view(np.uint8),
                written_cache(cache, np.asarray(want.values), case.layer, slots).view(np.uint8),
                err_msg=name)
            np.testing.assert_array_equal(
                np.asarray(got_cache.scales),
                written_cache(scales[..., None], np.asarray(want.scales)[..., None], case.layer,
                              slots)[..., 0], err_msg=f"{name} scales")
        return
    for name, got_cache, cache, new in (("k_cache", k_cache, case.k_cache, case.k),
                                        ("v_cache", v_cache, case.v_cache, case.v)):
        np.testing.assert_array_equal(np.asarray(got_cache),
                                      written_cache(cache, new, case.layer, slots), err_msg=name)


def missing_compiler() -> str | None:
    """Why the C++ kernel cannot be built here (no compiler on PATH), or None."""
    try:
        cpu_build.compiler()
    except RuntimeError as error:
        return str(error)
    return None


@dataclasses.dataclass(frozen=True)
class Implementation:
    """An attention implementation under test: its registry name in ``jaxllm.kernels``, its
    function, the keyword options it always runs with here, and whether it writes zeros for
    padding tokens (the reference attends them to each other, finite but not zero)."""

    name: str
    registered_as: str
    function: Callable
    options: dict
    zero_padding: bool
    skip_reason: str | None = None

    def run(self, case: Case, window: int | None = None, *, static_window: bool = False,
            **options):
        """(out, k_cache, v_cache) on ``case`` under jit, ``layer`` traced as in the step, with
        ``window`` None (static), traced as an int32 scalar, or static (``static_window``);
        ``options`` add to the implementation's own (Pallas tiling)."""
        traced = window is not None and not static_window
        step = _jitted(self.name, case.scale, traced, None if traced else window,
                       tuple(sorted({**self.options, **options}.items())))
        return step(*case.args(), jnp.int32(window)) if traced else step(*case.args())

    def check(self, case: Case, window: int | None = None, *, static_window: bool = False,
              **options) -> None:
        """``run``, then ``check_step`` against the ground truth."""
        got = self.run(case, window, static_window=static_window, **options)
        check_step(case, got, window, zero_padding=self.zero_padding)


@functools.cache
def _jitted(name: str, scale: float, traced: bool, static_window: int | None, options: tuple):
    """One jitted step per implementation, scale, window kind and options, so that tests of
    the same shapes share its compilations."""
    function, options = IMPLEMENTATIONS[name].function, dict(options)
    if traced:
        return jax.jit(lambda *args: function(*args[:-1], scale=scale, sliding_window=args[-1],
                                              **options))
    return jax.jit(lambda *args: function(*args, scale=scale, sliding_window=static_window,
                                          **options))


IMPLEMENTATIONS = {
    "reference": Implementation("reference", "reference", reference.paged_attention, {},
                                zero_padding=False),
    "cpu": Implementation("cpu", "cpu", cpu_ffi.paged_attention, {}, zero_padding=True,
                          skip_reason=missing_compiler()),
    # Context chunks of 16 keys (the default is 64): the scenarios' block tables (up to 64 keys)
    # span four, which the default splits four ways, so windows of 1 and 4 skip whole chunks and
    # leave splits empty or fully masked, which the merge must give no weight and no NaN.
    "pallas": Implementation("pallas", "pallas_gpu", pallas_gpu.paged_attention,
                             {"interpret": True, "block_kv": 16}, zero_padding=True),
}


def implementation_param(name: str, *values):
    """``IMPLEMENTATIONS[name]`` and ``values`` as one pytest parameter set, named after them
    all, skipped where the implementation cannot run here."""
    implementation = IMPLEMENTATIONS[name]
    marks = pytest.mark.skipif(implementation.skip_reason is not None,
                               reason=implementation.skip_reason or "")
    return pytest.param(implementation, *values, id="-".join([name, *map(str, values)]),
                        marks=marks)
