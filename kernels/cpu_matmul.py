"""Matrix products of few rows for XLA:CPU: a C++ kernel (``cpu_matmul.cc``) called through the
XLA FFI, for the model's dense layers and tied head in decode steps.

With few rows a product streams the weights once and is bound by memory bandwidth; XLA:CPU's
dot streams them well below it, and worse with every row added (on SmolLM2-135M's shapes, 2-core
AVX-512 VM, chained as in the model: ~21 GB/s for one row, ~14 for two, ~8.5 for four, where a
plain reduction reads ~30). The kernel reads each weight vector once for all rows, on XLA's own
intra-op threads (the layout of the work is described at the top of the .cc file).

It is compiled on first use for this machine and cached (``jaxllm.kernels.cpu_build``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import cpu_build

_SOURCE = Path(__file__).with_name("cpu_matmul.cc")
_TARGET = "jaxllm_matmul_cpu"
MAX_ROWS = 16          # the kernel's kMaxRows
# Up to how many rows the kernel beats XLA's dot, by weight dtype (30 chained SmolLM2 MLP
# matrices and the tied head, 2-core AVX-512 VM): float32 1.1-2x up to 14 rows, 0.9x at 16;
# bfloat16 (against XLA's float32-accumulating dot) 1.7-3x up to 4 rows, 0.35-0.7x at 10.
_FASTER_UP_TO = {jnp.dtype(jnp.float32): 14, jnp.dtype(jnp.bfloat16): 4}
_MAX_PARTIAL_BYTES = 1 << 20   # NN's partial sums beyond half of this machine's 2 MB L2: XLA
_COLUMN_MULTIPLE = 16  # the kernel's kColumnMultiple: NN's F, NT's D
_DTYPES = (jnp.float32, jnp.bfloat16)


@functools.cache
def _target() -> str | None:
    """Builds or finds the kernel and registers it with XLA, once per process; None (the reason
    logged once) when it cannot be built or loaded."""
    return _TARGET if cpu_build.register(_SOURCE, {"JaxllmMatmul": _TARGET}, "CPU matmul kernel") else None


def is_available() -> bool:
    """Whether the kernel builds and loads here (compiles it on the first call); never raises."""
    return _target() is not None


def _contracted_and_columns(w: jax.Array, transposed: bool) -> tuple[int, int]:
    """(D, F) of a weight stored [D, F], or [F, D] when ``transposed``."""
    return (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])


def supports(x: jax.Array, w: jax.Array, transposed: bool, out_dtype: jnp.dtype) -> bool:
    """Whether ``matmul`` takes these operands: x [R, D] with 1 <= R <= MAX_ROWS, w [D, F] (or
    [F, D] transposed) with the vector-width multiple the kernel needs, float32 or bfloat16."""
    if x.ndim != 2 or w.ndim != 2 or not 1 <= x.shape[0] <= MAX_ROWS:
        return False
    d, f = _contracted_and_columns(w, transposed)
    return (x.shape[1] == d and (d if transposed else f) % _COLUMN_MULTIPLE == 0
            and all(jnp.dtype(t) in _DTYPES for t in (x.dtype, w.dtype, out_dtype)))


def is_faster(x: jax.Array, w: jax.Array, transposed: bool) -> bool:
    """Whether the kernel is measured faster than XLA's dot for x [R, D] against this weight:
    few enough rows for the weight dtype and, in the NN layout, float32 partial sums [R, F]
    that stay cache-sized (a pass of 16 weight rows loads and stores them; measured up to 1536
    columns, where they take 86 kB at 14 rows)."""
    rows = x.shape[0]
    if not 1 <= rows <= _FASTER_UP_TO.get(jnp.dtype(w.dtype), 0):
        return False
    return transposed or rows * _contracted_and_columns(w, transposed)[1] * 4 <= _MAX_PARTIAL_BYTES


def matmul(x: jax.Array, w: jax.Array, *, transposed: bool = False,
           out_dtype: jnp.dtype | None = None) -> jax.Array:
    """x [R, D] @ w [D, F] (or @ w.T for w [F, D] when ``transposed``), accumulated in float32.

    Args:
        x: [R, D], R <= MAX_ROWS, float32 or bfloat16.
        w: [D, F], or [F, D] with ``transposed``; float32 or bfloat16.
        transposed: w is stored [F, D] (a tied embedding table).
        out_dtype: float32 or bfloat16; default x's dtype.

    Returns:
        [R, F] in ``out_dtype``.

    Raises:
        ValueError: for operands ``supports`` rejects.
        RuntimeError: the kernel cannot be built here (see ``is_available``).
    """
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    if not supports(x, w, transposed, out_dtype):
        raise ValueError(f"cpu matmul: unsupported operands x {x.shape} {x.dtype}, w {w.shape} "
                         f"{w.dtype}{' (transposed)' if transposed else ''}, out {out_dtype}; "
                         f"see supports()")
    target = _target()
    if target is None:
        raise RuntimeError("the CPU matmul kernel could not be built; see the log")
    _, f = _contracted_and_columns(w, transposed)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], f), out_dtype))
    return call(x, w, transposed=transposed, num_threads=np.int32(cpu_build.num_threads()))
