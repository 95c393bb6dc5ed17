"""Every paged attention implementation against dense causal attention, on the same steps.

The cases, the float64 ground truth and the check are ``attention_harness``'s: each scenario
(decodes, prefills, chunks on cached context, mixed steps, contexts of several chunks) in each
layout an implementation supports, under each window (static None, traced 1, 4 and 0); every
real token's output, the padding tokens' output and both written caches are checked. The
scenarios of one layout share one padded shape, so each implementation compiles once per layout
and window kind. What only one implementation has (tiling, thread splits, fallbacks, lowering,
the engine) is tested in ``test_cpu_attention`` and ``test_pallas_attention``.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import (BF16, F32, FP8, IMPLEMENTATIONS, INT8, SCENARIOS, WINDOWS, Layout,
                               dense_attention, implementation_param, scenario_case)
from jaxllm.kernels import default_attention, get_attention
from jaxllm.kernels.paged_attention.quantized_kv import dequantize, quantize
from jaxllm.kernels.paged_attention.reference import write_kv

# The layouts each implementation runs every scenario and window in.
LAYOUTS = {
    # Every pair of block size, GQA ratio (1, 2, 3) and head dim appears at least once.
    "reference": [
        Layout(4, 4, 4, 16), Layout(4, 4, 2, 32), Layout(4, 6, 2, 16),
        Layout(8, 4, 4, 32), Layout(8, 4, 2, 16), Layout(8, 6, 2, 32),
        Layout(16, 4, 4, 16), Layout(16, 4, 2, 32), Layout(16, 6, 2, 32),
    ],
    # GQA ratios 1, 2, 3 (SmolLM2), 4 and 8 (the largest "few rows" decode), block sizes 4, 8
    # and 16, head dims 64 and 128, float32 and bfloat16, and bfloat16 caches under float32
    # queries. With these head counts the steps take both paths of the kernel (few query rows
    # per tile: keys along the vector lanes; many: query rows along the lanes).
    "cpu": [
        Layout(8, 4, 4, 64), Layout(16, 4, 2, 64, BF16), Layout(8, 8, 2, 128),
        Layout(16, 9, 3, 64), Layout(8, 9, 3, 64, BF16), Layout(16, 4, 1, 128, BF16),
        Layout(16, 16, 2, 64), Layout(16, 9, 3, 64, F32, BF16), Layout(4, 9, 3, 64),
        Layout(8, 4, 4, 64, BF16),
    ],
    # Every pair of block size, GQA ratio (1, 2, 4) and dtype appears once; head dim 64.
    "pallas": [
        Layout(8, 4, 4, 64), Layout(8, 4, 2, 64, BF16), Layout(8, 8, 2, 64),
        Layout(16, 4, 4, 64, BF16), Layout(16, 4, 2, 64), Layout(16, 8, 2, 64, BF16),
    ],
}
# Quantized caches (int8, fp8 e4m3) per implementation, and the windows they run under. Only
# the loading of cached K/V differs from a float cache, the same code under every window: the
# reference and Pallas (whose interpret-mode compilations cost ~5-10 s each) run one static and
# one traced window kind, or only the traced one; the C++ kernel, cheap to run, all of them,
# on both of its paths (GQA 3: few-row decodes, many-row prefills; GQA 4 at head dim 128).
QUANTIZED_LAYOUTS = {
    "reference": ([Layout(8, 6, 2, 32, F32, INT8), Layout(4, 4, 2, 16, BF16, FP8)], [None, 4]),
    "cpu": ([Layout(16, 9, 3, 64, F32, INT8), Layout(8, 8, 2, 128, F32, FP8),
             Layout(8, 4, 4, 64, BF16, INT8)], WINDOWS),
    "pallas": ([Layout(16, 8, 2, 64, BF16, FP8)], [4, 0]),
}


def window_id(window: int | None) -> str:
    return "full" if window is None else f"window{window}"


@pytest.mark.parametrize("window", WINDOWS, ids=window_id)
@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("implementation, layout", [
    implementation_param(name, layout) for name, layouts in LAYOUTS.items() for layout in layouts])
def test_attention_step_matches_dense_attention(implementation, layout, scenario, window):
    """Under jit as in the step (``layer`` traced); windows masked in the cached context and
    among the step's own tokens alike."""
    implementation.check(scenario_case(scenario, layout), window)


def _quantized_params():
    for name, (layouts, windows) in QUANTIZED_LAYOUTS.items():
        for layout in layouts:
            for window in windows:
                param = implementation_param(name, layout)
                yield pytest.param(*param.values, window, id=f"{param.id}-{window_id(window)}",
                                   marks=param.marks)


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("implementation, layout, window", list(_quantized_params()))
def test_attention_step_on_quantized_cache_matches_dense_attention(implementation, layout,
                                                                  scenario, window):
    """The ground truth reads every key and value as the quantized cache holds them, so the
    float tolerances apply; the caches' values and scales are checked bit for bit."""
    implementation.check(scenario_case(scenario, layout), window)


@pytest.mark.parametrize("cache_dtype", [INT8, FP8], ids=["int8", "fp8"])
def test_quantized_cache_stays_within_quantization_error_of_exact_attention(cache_dtype):
    """Against attention over the unquantized keys and values: the output is a convex
    combination of values, each off by at most the worst element error e of the quantization
    (int8: half a step, max|x| / 254 per token and head; fp8 e4m3: half an ulp, up to 2^-4 of
    the element), plus the shift of the weights from the keys' errors, which at this softmax
    scale (0.7 / sqrt(H)) moves scores by well under e. So the error stays within 2e (measured:
    ~1.2e for int8, ~0.6e for fp8), and above float error: the quantization is really there."""
    case = scenario_case("long_mixed", Layout(8, 6, 2, 32, F32, cache_dtype))
    out, _, _ = IMPLEMENTATIONS["reference"].run(case, 4)
    exact_caches = tuple(jnp.asarray(c) for c in case.exact_caches)
    exact = dense_attention(case.q, case.k, case.v, *exact_caches, case.layer, case.metadata,
                            scale=case.scale, sliding_window=4)
    element_error = max(
        float(jnp.abs(dequantize(quantize(x, cache_dtype)) - x).max())
        for x in (jnp.asarray(case.k), jnp.asarray(case.v), *exact_caches))
    error = np.abs(np.asarray(out)[:case.num_real] - exact).max()
    assert 1e-3 < error <= 2 * element_error


def test_write_kv_writes_one_layer_at_the_given_slots():
    cache = jnp.zeros((2, 3, 2, 1, 1))                                # L=2, B=3, Z=2, K=1, H=1
    new = jnp.array([[[1.0]], [[2.0]], [[3.0]]])                      # [T=3, K, H]
    out = np.asarray(write_kv(cache, new, 1, jnp.array([5, 2, 3])))
    expected = np.zeros((2, 3, 2, 1, 1))
    expected[1, 2, 1] = 1.0                                           # slot 5 = block 2, offset 1
    expected[1, 1, 0] = 2.0                                           # slot 2 = block 1, offset 0
    expected[1, 1, 1] = 3.0
    np.testing.assert_array_equal(out, expected)


def test_registry_serves_every_implementation_under_test():
    for implementation in IMPLEMENTATIONS.values():
        assert get_attention(implementation.registered_as) is implementation.function
    assert default_attention("tpu") == "reference"
    with pytest.raises(ValueError, match="unknown attention implementation"):
        get_attention("nope")
