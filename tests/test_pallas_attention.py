"""What only the Pallas GPU kernel has, run in interpret mode on CPU: other tilings, static
windows, the default 64-key chunks on long contexts, the Triton lowering, the shapes it
refuses, and its registry default. Every scenario, layout and traced window runs in
``test_attention_kernels`` (with the harness's 16-key context chunks split four ways);
every check here is ``attention_harness``'s, against dense attention (every real token's
output, zeros for padding tokens, both written caches).

A long-context case poisons with NaN every cached chunk that lies wholly before the window of
all its row's tokens: reading one at all (even masked, as 0 * NaN) would show in the output, so
the test proves those chunks are skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_harness import (BF16, IMPLEMENTATIONS, Layout, Padding, build_case,
                               hide_keys_before_windows, scenario_case)
from jaxllm.kernels import default_attention
from jaxllm.kernels.paged_attention import pallas_gpu

PALLAS = IMPLEMENTATIONS["pallas"]
LAYOUT = Layout(8, 8, 2, 64)                                          # G = 4


@pytest.mark.parametrize("scenario, tiling", [
    # Prefill rows cut into several tiles; a split with no context chunks at all (contexts
    # under 32 keys).
    ("long_mixed", {"block_q": 8, "block_kv": 32, "num_splits": 2}),
    ("long_decode_only", {"num_splits": 2, "block_kv": 16}),
], ids=["tiles_and_empty_split", "decode_only"])
def test_pallas_attention_with_forced_tiling(scenario, tiling):
    """Tilings other than the harness's (16-key chunks split four ways, see
    ``attention_harness.IMPLEMENTATIONS``), which runs every scenario and window."""
    PALLAS.check(scenario_case(scenario, LAYOUT), **tiling)


def test_pallas_static_window():
    """A static window compiles a kernel of its own, which also caps the context splits."""
    PALLAS.check(scenario_case("mixed", LAYOUT), 4, static_window=True)


def test_pallas_static_window_of_zero_is_the_full_attention_kernel():
    """A static window <= 0 traces exactly what None does: no window operand read, no masks."""
    case = scenario_case("mixed", LAYOUT)

    def trace(window):
        return str(jax.make_jaxpr(lambda *a: pallas_gpu.paged_attention(
            *a, scale=case.scale, sliding_window=window, interpret=True))(*case.args()))
    assert trace(0) == trace(-3) == trace(None)
    assert trace(0) != trace(4)


# Long contexts under a window of 24: a decode on 230 tokens, a 6-token chunk on 200, a decode
# on 97, and a 100-token fresh prefill, whose last tile (tokens 96-99; tiles of 16) also skips
# the first in-step chunk of 64 keys (checked for its output only: earlier tiles read those keys).
LONG_ROWS = [(230, 1), (200, 6), (97, 1), (0, 100)]
LONG_WINDOW = 24


@pytest.mark.parametrize("static_window", [False, True], ids=["traced", "static"])
def test_pallas_window_skips_chunks_before_it_on_long_contexts(static_window):
    """NaN in every 64-key chunk (so every 16-key one too) before the window of all of a row's
    tokens; traced with four splits of 16-key chunks, static with the default tiling (64-key
    chunks: ``block_kv=None`` overrides the harness's 16)."""
    case = build_case(LONG_ROWS, LAYOUT, Padding.covering([LONG_ROWS], 8, num_tokens=128,
                                                          num_rows=4))
    hide_keys_before_windows(case, LONG_WINDOW, chunk=64)
    assert np.isnan(case.v_cache).any()
    tiling = {"block_kv": None} if static_window else {"num_splits": 4, "block_kv": 16}
    PALLAS.check(case, LONG_WINDOW, static_window=static_window, **tiling)


@pytest.mark.parametrize("window", [None, 4, "traced"])
def test_pallas_kernel_lowers_to_triton_for_cuda(window):
    """Lowering for CUDA needs no GPU (JAX then targets the oldest compute capability Triton
    supports) and runs the Triton lowering rule of every op in the kernel, which interpret mode
    never does: an op without one fails here, not first on a GPU machine."""
    args = scenario_case("mixed", Layout(8, 8, 2, 64, BF16)).args()
    tiling = {"num_splits": 4, "block_kv": 16}
    if window == "traced":
        traced = jax.jit(lambda *a, w: pallas_gpu.paged_attention(
            *a, scale=0.1, sliding_window=w, **tiling)).trace(*args, w=jnp.int32(4))
    else:
        traced = jax.jit(lambda *a: pallas_gpu.paged_attention(
            *a, scale=0.1, sliding_window=window, **tiling)).trace(*args)
    assert "__gpu$xla.gpu.triton" in traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("block_size, head_dim", [(4, 64), (8, 48)])
def test_pallas_attention_rejects_unsupported_shapes(block_size, head_dim):
    q = jnp.zeros((4, 2, head_dim))
    k = jnp.zeros((4, 1, head_dim))
    cache = jnp.zeros((1, 3, block_size, 1, head_dim))
    padding = Padding(num_tokens=4, num_rows=1, table_width=1, num_blocks=3)
    metadata = build_case([(0, 1)], Layout(8, 2, 1, 16), padding).metadata
    unsupported = "block size" if head_dim == 64 else "head dim"
    with pytest.raises(ValueError, match=f"unsupported {unsupported}"):
        pallas_gpu.paged_attention(q, k, k, cache, cache, 0, metadata, scale=1.0, interpret=True)


def test_pallas_is_the_gpu_default():
    assert default_attention("gpu") == default_attention("cuda") == "pallas_gpu"
