"""Matrix products of few rows with quantized weights as integer dot products on XLA:CPU (AVX-512
VNNI): a C++ kernel (``cpu_int_dot_matmul.cc``) called through the XLA FFI, for decode steps.

Each row of x is quantized to int16 in blocks of 32 inside the call (a float32 product up to
~1e-5 relative rounding; llama.cpp's 8-bit activations change greedy text); the weights are
read in the interleaved layout of ``jaxllm.quantization.interleaved`` (Q4_0, Q4_1, Q8_0 blocks;
int8 rows with a float32 scale per feature). One vpdpwssd does 32 multiply-adds on weights
widened in registers, so the product is bound by memory where the float kernel
(``cpu_quant_matmul``) is bound by decoding weights to float32.

It is compiled on first use for this machine and cached (``jaxllm.kernels.cpu_build``); without
AVX-512 VNNI it is unavailable and the float kernel serves.
"""

from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels import cpu_build

_SOURCE = Path(__file__).with_name("cpu_int_dot_matmul.cc")
_TARGET = "jaxllm_int_dot_matmul_cpu"
# In the kernel's kTypes order (its qtype code); bytes of one feature's block of 32 weights.
QTYPES: dict[str, int] = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34, "int8": 32}
_CODES = {name: i for i, name in enumerate(QTYPES)}
# Most rows of x per call. The kernel beats the jnp reference (dequantize + XLA's dot) at every
# row count measured, and even XLA's dot on weights already in float32: 30 of SmolLM2's Q4_1
# gate|up products, 2-core AVX-512 VM under load, ms: 8 rows 6.8 vs 28 (float32 dot) vs 90
# (reference); 32 rows 25 vs 53 vs 119; 64 rows 49 vs 88 vs 154. So it takes prefill chunks too.
MAX_ROWS = 4096
_ISA = ("__AVX512F__", "__AVX512BW__", "__AVX512VNNI__")


@functools.cache
def _target() -> str | None:
    if not cpu_build.has_macros(_ISA):
        return None
    ok = cpu_build.register(_SOURCE, {"JaxllmIntDotMatmul": _TARGET}, "CPU integer-dot matmul kernel")
    return _TARGET if ok else None


def is_available() -> bool:
    """Whether this CPU has AVX-512 VNNI and the kernel builds and loads; never raises."""
    return _target() is not None


def supports(rows: int, k: int, n: int, qtype: str) -> bool:
    """Whether the kernel takes x [rows, k] against n features of ``qtype``: 1 <= rows <=
    MAX_ROWS, k a multiple of 32 and n of 16."""
    return qtype in QTYPES and 1 <= rows <= MAX_ROWS and k >= 32 and k % 32 == 0 and n % 16 == 0


def quantized_matmul(x: jax.Array, data: jax.Array, scale: jax.Array | None, *, qtype: str,
                     out_features: int) -> jax.Array:
    """x [R, K] @ dequant(w)^T, x's rows quantized to int16 per 32 -> float32 [R, N].

    Args:
        x: [R, K] float32 or bfloat16 (taken as float32).
        data: interleaved weights [N, row_bytes] (``jaxllm.quantization.interleaved``): uint8
            for GGUF types, int8 for "int8".
        scale: float32 [N] for "int8"; None for GGUF types.

    Raises:
        ValueError: operands the kernel does not take, before any work.
        RuntimeError: the kernel is unavailable here (see ``is_available``).
    """
    rows, k = x.shape
    if not supports(rows, k, out_features, qtype):
        raise ValueError(f"cpu integer-dot matmul ({qtype}): unsupported x {x.shape} against "
                         f"{out_features} features; see supports()")
    width = k if qtype == "int8" else k // 32 * QTYPES[qtype]
    dtype = jnp.dtype(jnp.int8 if qtype == "int8" else jnp.uint8)
    if data.shape != (out_features, width) or jnp.dtype(data.dtype) != dtype:
        raise ValueError(f"cpu integer-dot matmul ({qtype}): data must be {dtype.name}"
                         f"[{out_features}, {width}]; got {data.dtype}{list(data.shape)}")
    if (qtype == "int8") != (scale is not None):
        raise ValueError(f"cpu integer-dot matmul ({qtype}): a float32 scale [N] goes with int8 "
                         "weights only")
    target = _target()
    if target is None:
        raise RuntimeError("the CPU integer-dot matmul kernel is unavailable (needs AVX-512 VNNI)")
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct((rows, out_features), jnp.float32))
    if scale is None:
        scale = jnp.zeros((1,), jnp.float32)
    return call(x.astype(jnp.float32), data, scale, qtype=np.int32(_CODES[qtype]),
                num_threads=np.int32(cpu_build.num_threads()))
