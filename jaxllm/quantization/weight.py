"""The quantized weight pytree and the one matmul every projection calls on it.

A ``QuantizedWeight`` is a linear layer's weight w [N, K] (N output features, K input
features; HF's nn.Linear layout, the transpose of a Flax kernel) kept packed:
  * a GGUF type ("Q4_1", "Q4_K", ...): ``data`` uint8 [N, row_bytes], exactly GGUF's bytes of
    each output row (K / block_size blocks along K, as llama.cpp stores them); ``scale`` None;
  * "int8": ``data`` int8 [N, K] and ``scale`` float32 [N], w ~= data * scale[:, None]
    (symmetric, one scale per output channel).
``qtype``, the logical ``shape`` (N, K) and the ``implementation`` of ``quantized_matmul`` are
static metadata; the "cpu_int_dot" implementation keeps the same bytes permuted into
``interleaved``'s layout (same shape). Leaves may carry leading axes (a stacked layer axis L: data [L, N, row_bytes]);
``shape`` stays the one matrix's. The tied head uses the embedding table [V, D] as its w.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.quantization.ggml import GGML_TYPES, dequantize_rows, row_bytes
from jaxllm.quantization.interleaved import (GROUP, can_interleave, deinterleave, interleave,
                                             interleaved_rows)

INT8 = "int8"
QTYPES = (*GGML_TYPES, INT8)
# The implementations of ``quantized_matmul`` a weight may name. "cpu_int_dot" weights are
# stored in the interleaved layout (``interleaved``); the others as the module docstring says.
IMPLEMENTATIONS = ("reference", "cpu", "cpu_int_dot")
INT_DOT = "cpu_int_dot"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A weight w [N, K] kept quantized (see the module docstring for the layouts).

    Attributes:
        data: uint8 [..., N, row_bytes] (GGUF types) or int8 [..., N, K] ("int8").
        scale: float32 [..., N] for "int8"; None for GGUF types (their scales are in the blocks).
        qtype: "int8" or a GGUF type name from ``ggml.GGML_TYPES``.
        shape: (N, K), the logical shape of one matrix.
        implementation: which ``quantized_matmul`` runs on it (``IMPLEMENTATIONS``), chosen at
            load by ``matmul_implementation``, never while tracing.
    """

    data: jax.Array
    scale: jax.Array | None
    qtype: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, int] = dataclasses.field(metadata=dict(static=True))
    implementation: str = dataclasses.field(default="reference", metadata=dict(static=True))

    def __post_init__(self) -> None:
        if self.qtype not in QTYPES:
            raise ValueError(f"unknown quantized type {self.qtype!r}; supported: {', '.join(QTYPES)}")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(f"unknown quantized_matmul implementation {self.implementation!r}; "
                             f"available: {', '.join(IMPLEMENTATIONS)}")
        n, k = self.shape
        if not isinstance(self.data, (jax.Array, np.ndarray)):
            return   # placeholders of jax's tree utilities (tree_map with None / objects)
        width = k if self.qtype == INT8 else row_bytes(self.qtype, k)
        if tuple(self.data.shape[-2:]) != (n, width):
            raise ValueError(f"{self.qtype} data of a [{n}, {k}] weight must be [..., {n}, {width}], "
                             f"got {tuple(self.data.shape)}")

    @property
    def out_features(self) -> int:
        return self.shape[0]

    @property
    def in_features(self) -> int:
        return self.shape[1]


def dequantize(w: QuantizedWeight, rows: jax.Array | None = None) -> jax.Array:
    """w (or only its ``rows``, int [...] indices along N) as float32 [..., N or rows, K]."""
    data, scale = w.data, w.scale
    if rows is not None:
        if w.implementation == INT_DOT:
            data = interleaved_rows(data, w.qtype, rows)
        else:
            data = jnp.take(data, rows, axis=-2)
        scale = None if scale is None else jnp.take(scale, rows, axis=-1)
    elif w.implementation == INT_DOT:
        data = deinterleave(data, w.qtype)
    if w.qtype == INT8:
        return data.astype(jnp.float32) * scale[..., None]
    return dequantize_rows(data, w.qtype)


def embedding_lookup(table: QuantizedWeight, token_ids: jax.Array, dtype: jnp.dtype) -> jax.Array:
    """Rows ``token_ids`` [T] of a quantized embedding table [V, D] -> [T, D] in ``dtype``:
    gathers the packed rows and dequantizes only those."""
    return dequantize(table, token_ids).astype(dtype)


def matmul_implementation(platform: str) -> str:
    """The ``quantized_matmul`` implementation for quantized weights on a JAX platform, picked
    once at load and stored in each weight (``QuantizedWeight.implementation``).

    On CPU the C++ XLA FFI kernel (``jaxllm.kernels.cpu_quant_matmul``) where it builds; the
    jnp reference elsewhere and for the row counts the kernel does not win
    (``quantized_matmul`` chooses per static row count).
    """
    if platform == "cpu":
        from jaxllm.kernels import cpu_quant_matmul

        if cpu_quant_matmul.is_available():
            return "cpu"
    return "reference"


def packed_by_default(platform: str) -> bool:
    """Whether ``quantization="auto"`` keeps a GGUF's blocks on this platform: only where a
    kernel computes on them (the C++ kernel on CPU). The jnp reference alone dequantizes every
    weight at every step: on the 2-core CPU, SmolLM2 Q4_1 decoded at 6.4 tokens/s that way
    against 17.4 in float32."""
    return matmul_implementation(platform) != "reference"


def quantized_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [R, K] @ w.T -> [R, N] in x's dtype, accumulated in float32: the product every
    projection of the model runs on a quantized weight (q|k|v, o, MLP, the head).

    Dispatches on the static ``w.implementation`` (and the static row count); every
    implementation computes what ``reference_quantized_matmul`` does.
    """
    if x.ndim != 2 or x.shape[1] != w.in_features or w.data.ndim != 2:
        raise ValueError(f"quantized_matmul takes x [R, {w.in_features}] and one [N, K] weight; "
                         f"got x {x.shape}, data {w.data.shape}")
    return _differentiable_matmul(x, w)


@jax.custom_vjp
def _differentiable_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """``quantized_matmul``'s dispatch. Its backward pass (LoRA training over a quantized base)
    differentiates the reference, which XLA can, where the FFI kernels cannot be; the packed
    weights are frozen: their cotangent is zero."""
    rows, (n, k) = x.shape[0], w.shape
    if w.implementation == INT_DOT:
        from jaxllm.kernels import cpu_int_dot_matmul

        if cpu_int_dot_matmul.supports(rows, k, n, w.qtype):
            return cpu_int_dot_matmul.quantized_matmul(x, w.data, w.scale, qtype=w.qtype,
                                                        out_features=n).astype(x.dtype)
    if w.implementation == "cpu":
        from jaxllm.kernels import cpu_quant_matmul

        if cpu_quant_matmul.supports(rows, k, n, w.qtype) and cpu_quant_matmul.is_faster(rows, w.qtype):
            return cpu_quant_matmul.quantized_matmul(x, w.data, w.scale, qtype=w.qtype,
                                                     out_features=n).astype(x.dtype)
    return reference_quantized_matmul(x, w)


def _matmul_forward(x: jax.Array, w: QuantizedWeight) -> tuple[jax.Array, tuple]:
    return _differentiable_matmul(x, w), (x, w)


def _matmul_backward(residuals: tuple, dy: jax.Array) -> tuple[jax.Array, QuantizedWeight]:
    x, w = residuals
    _, pullback = jax.vjp(lambda x: reference_quantized_matmul(x, w), x)
    frozen = jax.tree.map(lambda a: np.zeros(a.shape, jax.dtypes.float0)
                          if jnp.issubdtype(a.dtype, jnp.integer) else jnp.zeros_like(a), w)
    return pullback(dy)[0], frozen


_differentiable_matmul.defvjp(_matmul_forward, _matmul_backward)


# Rows of w dequantized at a time by the reference: a [1024, K] float32 tile stays in cache
# where a whole table does not (SmolLM2's int8 tied head [49152, 576], one row of x, 2-core
# CPU: 154 ms whole, 6.8 ms in tiles of 1024 rows; Q8_0: 125 -> 32 ms).
_TILE_ROWS = 1024


def reference_quantized_matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """The jnp reference of ``quantized_matmul``, on every platform: dequantizes w a tile of
    rows at a time (int8: applies the per-channel scale to the [R, N] product instead, the
    same up to float rounding) and contracts each tile with x in float32."""
    # Dequantize only once x is there: XLA would otherwise hoist every layer's unpacking
    # (independent of the activations) to the start of the step, all of it live at once.
    x32, data = jax.lax.optimization_barrier((x.astype(jnp.float32), w.data))
    tile = _tile_rows(w.out_features)
    interleaved = w.implementation == INT_DOT
    if tile == w.out_features or (interleaved and tile % GROUP):
        out = _dequantized_product(x32, data, w.qtype, interleaved)
    else:
        tiles = data.reshape(w.out_features // tile, tile, w.data.shape[-1])
        out = jax.lax.map(lambda data: _dequantized_product(x32, data, w.qtype, interleaved), tiles)
        out = jnp.moveaxis(out, 0, 1).reshape(x.shape[0], w.out_features)   # [R, N]
    if w.qtype == INT8:
        out = out * w.scale
    return out.astype(x.dtype)


def _dequantized_product(x32: jax.Array, data: jax.Array, qtype: str, interleaved: bool
                         ) -> jax.Array:
    """x32 [R, K] @ rows [n, K].T of packed ``data`` [n, ...] (int8 rows unscaled; whole groups
    of ``interleaved`` data)."""
    if interleaved:
        data = deinterleave(data, qtype)
    rows = data.astype(jnp.float32) if qtype == INT8 else dequantize_rows(data, qtype)
    return jax.lax.dot_general(x32, rows, (((1,), (1,)), ((), ())))


def _tile_rows(n: int) -> int:
    """The largest divisor of n up to _TILE_ROWS (n itself when it is no larger, or when its
    largest such divisor is under 64 rows)."""
    if n <= _TILE_ROWS:
        return n
    tile = next(t for t in range(_TILE_ROWS, 0, -1) if n % t == 0)
    return tile if tile >= 64 else n


def quantize_int8(w: np.ndarray, implementation: str = "reference") -> QuantizedWeight:
    """Symmetric per-output-channel int8 of a float weight w [..., N, K]: scale = max |w_n| / 127
    (a zero row gets scale 0), data = round(w / scale)."""
    w = np.asarray(w, np.float32)
    scale = np.abs(w).max(axis=-1) / 127.0
    safe = np.where(scale == 0, 1.0, scale)[..., None]
    data = np.clip(np.rint(w / safe), -127, 127).astype(np.int8)
    return QuantizedWeight(data, scale.astype(np.float32), INT8, tuple(w.shape[-2:]), implementation)


def use_int_dot(params: Any) -> Any:
    """``params`` with every quantized weight the CPU integer-dot kernel takes (Q4_0, Q4_1, Q8_0,
    int8; N a multiple of 16) moved to it: interleaved, implementation "cpu_int_dot". Only
    weights of the "cpu" implementation move, and only where the kernel is available (AVX-512
    VNNI); the rest stay as they are.

    Why: the float kernel decodes every weight to float32 and is bound by that arithmetic; with
    x rounded to int16 per block of 32 and integer dot products, a decode step is bound by
    memory instead (SmolLM2 Q4_1: see the README's quantization table)."""
    from jaxllm.kernels import cpu_int_dot_matmul

    if not cpu_int_dot_matmul.is_available():
        return params

    def move(w: Any) -> Any:
        if not (is_quantized(w) and w.implementation == "cpu"
                and can_interleave(w.qtype, w.out_features)):
            return w
        return QuantizedWeight(interleave(np.asarray(w.data), w.qtype), w.scale, w.qtype, w.shape,
                               INT_DOT)

    return jax.tree_util.tree_map(move, params, is_leaf=is_quantized)


def is_quantized(x: object) -> bool:
    return isinstance(x, QuantizedWeight)
