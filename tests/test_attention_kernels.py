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
from attention_harness import (BF16, F32, IMPLEMENTATIONS, SCENARIOS, WINDOWS, Layout,
                               implementation_param, scenario_case)
from jaxllm.kernels import default_attention, get_attention
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
