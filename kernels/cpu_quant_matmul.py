"""Matrix products of few rows with quantized weights for XLA:CPU: a C++ kernel
(``cpu_quant_matmul.cc``) called through the XLA FFI, for decode steps of a model whose weights
stay quantized in memory (GGUF blocks as the file stores them, or int8 per output feature).

Decode is bound by memory bandwidth: each step reads every weight once. The kernel reads each
packed block once for all rows of x, decodes it in registers to float32 and accumulates in
float32, so it matches a float32 dequantize-then-matmul up to rounding (x is not quantized).
Work is split over output features on XLA's intra-op threads.

It is compiled on first use for this machine and cached (``jaxllm.kernels.cpu_build``).
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import cpu_build

_SOURCE = Path(__file__).with_name("cpu_quant_matmul.cc")
_TARGET = "jaxllm_quant_matmul_cpu"

# qtype -> (weights per block, bytes per block), in the kernel's kTypes order (its qtype code).
# GGUF's sizes (gguf.constants.GGML_QUANT_SIZES); "int8" is a row of int8, read 32 at a time.
QTYPES: dict[str, tuple[int, int]] = {
    "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q8_0": (32, 34),
    "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "int8": (32, 32),
}
_CODES = {name: i for i, name in enumerate(QTYPES)}
MAX_ROWS = 64          # supports() limit: every 4 rows decode the weights once more (from L1)
# Up to how many rows the kernel beats XLA's dot on the same weights already dequantized to
# float32 (so the real fallback, which also dequantizes, is slower still): see is_faster.
_FASTER_UP_TO = {name: 8 if weights == 256 else 16 for name, (weights, _) in QTYPES.items()}
_X_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


@functools.cache
def _target() -> str | None:
    """Builds or finds the kernel and registers it with XLA, once per process; None (the reason
    logged once) when it cannot be built or loaded."""
    ok = cpu_build.register(_SOURCE, {"JaxllmQuantMatmul": _TARGET}, "CPU quantized matmul kernel")
    return _TARGET if ok else None


def is_available() -> bool:
    """Whether the kernel builds and loads here (compiles it on the first call); never raises."""
    return _target() is not None


def row_bytes(k: int, qtype: str) -> int:
    """Bytes of one output feature's weights: K / W blocks of B bytes (int8: K)."""
    weights, size = QTYPES[qtype]
    return k // weights * size


def supports(rows: int, k: int, n: int, qtype: str) -> bool:
    """Whether ``quantized_matmul`` takes x [rows, k] against n output features of ``qtype``:
    a known type, 1 <= rows <= MAX_ROWS, n >= 1 and k a positive multiple of the block size
    (32 weights; 256 for the K-quants)."""
    return (qtype in QTYPES and 1 <= rows <= MAX_ROWS and n >= 1 and k >= 1
            and k % QTYPES[qtype][0] == 0)


def is_faster(rows: int, qtype: str) -> bool:
    """Whether the kernel is measured faster than dequantize + XLA's dot for ``rows`` rows of x.

    Measured with benchmarks/quant_matmul_cpu.py (2-core AVX-512 VM shared with other jobs,
    process CPU time) against XLA's dot on weights already in float32, i.e. without the
    dequantization the fallback also pays. All of a SmolLM2-135M step's products (Q4_0, Q4_1,
    Q5_0, Q8_0, int8): 1.7-2.4x at 1 row, 2.4-4.8x at 2-4, 1.6x at 8, 1.1-1.5x at 16, 0.8-1.07x
    at 32: up to 16 rows. Gemma 3's attention output and MLP down (Q4_K, Q5_K, Q6_K): 1.8-2.9x
    at 1 row, 1.8-2.3x at 4, 1.04-1.34x at 8, 0.7-0.9x at 16: up to 8 rows.
    """
    return qtype in QTYPES and 1 <= rows <= _FASTER_UP_TO[qtype]


def _check(x: jax.Array, data: jax.Array, scale: jax.Array | None, qtype: str,
           out_features: int) -> None:
    """ValueError naming the problem, before any work, for operands the kernel rejects."""
    def bad(what: str) -> ValueError:
        return ValueError(f"cpu quantized matmul ({qtype}): {what}")

    if qtype not in QTYPES:
        raise ValueError(f"cpu quantized matmul: unknown qtype {qtype!r}; known: {list(QTYPES)}")
    if x.ndim != 2 or jnp.dtype(x.dtype) not in _X_DTYPES:
        raise bad(f"x must be [R, K] float32 or bfloat16; got {x.shape} {x.dtype}")
    rows, k = x.shape
    if not supports(rows, k, out_features, qtype):
        raise bad(f"unsupported x {x.shape} against {out_features} features: needs 1 <= R <= "
                  f"{MAX_ROWS} and K a multiple of {QTYPES[qtype][0]}; see supports()")
    want = (out_features, k if qtype == "int8" else row_bytes(k, qtype))
    dtype = jnp.dtype(jnp.int8 if qtype == "int8" else jnp.uint8)
    if data.shape != want or jnp.dtype(data.dtype) != dtype:
        raise bad(f"data must be {dtype.name}{list(want)} for x {x.shape}; "
                  f"got {data.dtype}{list(data.shape)}")
    if qtype == "int8":
        if scale is None or scale.shape != (out_features,) or scale.dtype != jnp.float32:
            got = None if scale is None else f"{scale.dtype}{list(scale.shape)}"
            raise bad(f"scale must be float32[{out_features}]; got {got}")
    elif scale is not None:
        raise bad("GGUF blocks carry their scales: pass scale=None")


def quantized_matmul(x: jax.Array, data: jax.Array, scale: jax.Array | None, *, qtype: str,
                     out_features: int) -> jax.Array:
    """x [R, K] @ dequant(w)^T for weights w [N, K] kept quantized, accumulated in float32.

    Args:
        x: [R, K], float32 or bfloat16, 1 <= R <= MAX_ROWS.
        data: GGUF types: uint8 [N, row_bytes], each row GGUF's blocks of one output feature
            along K, as the file stores them; "int8": int8 [N, K].
        scale: "int8": float32 [N] (w = data * scale[:, None]); GGUF types: None.
        qtype: "Q4_0", "Q4_1", "Q5_0", "Q8_0", "Q4_K", "Q5_K", "Q6_K" or "int8".
        out_features: N.

    Returns:
        float32 [R, N].

    Raises:
        ValueError: for operands the kernel does not take (see ``supports``), before any work.
        RuntimeError: the kernel cannot be built here (see ``is_available``).
    """
    _check(x, data, scale, qtype, out_features)
    target = _target()
    if target is None:
        raise RuntimeError("the CPU quantized matmul kernel could not be built; see the log")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((x.shape[0], out_features), jnp.float32))
    if scale is None:
        scale = jnp.zeros((1,), jnp.float32)   # unused by GGUF types; the handler takes 3 args
    return call(x, data, scale, qtype=np.int32(_CODES[qtype]),
                num_threads=np.int32(cpu_build.num_threads()))
