"""Building blocks shared by every model family, as Flax linen modules and plain functions.

Shape legend: T tokens, D model dim, N query heads, K kv heads, H head dim, Hr rotated dims of
a head, F MLP dim. Every block reads what varies between families from explicit
``ModelConfig`` fields (norm offset, qk-norm, biases, activation, scales), never from the
architecture name. The params tree they declare is documented in ``causal_lm``.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kernels import cpu_matmul
from jaxllm.models.projection import Linear
from jaxllm.lora.slab import apply_lora


def dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                preferred_element_type: Any = None) -> jax.Array:
    """``lax.dot_general`` for the model's matmuls (``nn.Dense(dot_general=...)``, the tied head).

    On CPU:
      * products of few rows (decode steps) with weights stored [D, F] (Dense) or [F, D] (a
        tied embedding table) go to the C++ kernel of ``jaxllm.kernels.cpu_matmul`` where it is
        measured faster than XLA's dot: it streams the weights at close to the memory bandwidth
        for every row count up to ~14, where XLA's dot slows with each row (SmolLM2's 30 MLP
        matrices, chained: 1.1-1.3x at one row, ~2x at four);
      * otherwise bfloat16 operands accumulate in float32 and round once (as torch does): XLA:CPU
        then runs them as one bf16 GEMM (YNNPACK), where a bf16-output dot ran an emulated loop
        ~10x slower than float32. That GEMM takes another slow path for a single row, so a
        one-row bf16 product is computed on the row twice and the copy dropped.
    Elsewhere, and under a device mesh (tensor parallelism: GSPMD partitions a plain dot over
    sharded weights, where it would gather them whole for the kernel's custom call), it is the
    plain dot.
    """
    if jax.default_backend() != "cpu" or not jax.sharding.get_abstract_mesh().empty:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(lhs, rhs))
    transposed = _weight_layout(lhs, rhs, dimension_numbers)
    if (transposed is not None and cpu_matmul.is_faster(lhs, rhs, transposed)
            and cpu_matmul.supports(lhs, rhs, transposed, out_dtype) and cpu_matmul.is_available()):
        return cpu_matmul.matmul(lhs, rhs, transposed=transposed, out_dtype=out_dtype)
    if lhs.dtype != jnp.bfloat16:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type)
    (lhs_contract, _), _ = dimension_numbers
    one_row = lhs.ndim == 2 and lhs.shape[0] == 1 and lhs_contract == (1,)
    operand = jnp.concatenate([lhs, lhs]) if one_row else lhs
    out = jax.lax.dot_general(operand, rhs, dimension_numbers, precision,
                              preferred_element_type=jnp.float32)
    return (out[:1] if one_row else out).astype(out_dtype)


def _weight_layout(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any) -> bool | None:
    """For x [R, D] against a 2-D weight: False for w [D, F], True for w [F, D]; else None."""
    (lhs_contract, rhs_contract), (lhs_batch, rhs_batch) = dimension_numbers
    if lhs.ndim != 2 or rhs.ndim != 2 or lhs_batch or rhs_batch or tuple(lhs_contract) != (1,):
        return None
    return {(0,): False, (1,): True}.get(tuple(rhs_contract))


class RMSNorm(nn.Module):
    """RMSNorm over the last axis, computed in float32 as transformers does.

    ``offset`` 0 scales by the weight (Llama: ``w * y`` in the activation dtype); Gemma stores
    w - 1 and scales by (1 + w), in float32 before the cast.
    """

    eps: float
    dtype: Any
    offset: float = 0.0

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.offset else nn.initializers.ones
        scale = self.param("scale", init, (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        if self.offset:
            return ((self.offset + scale.astype(jnp.float32)) * y).astype(self.dtype)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first Hr dims of x [T, n, H] in transformers' half-split ("rotate_half")
    layout; cos, sin: [T, Hr/2]. The remaining H - Hr dims pass through (partial rotary)."""
    half = cos.shape[-1]
    rotated, rest = (x, None) if 2 * half == x.shape[-1] else (x[..., :2 * half], x[..., 2 * half:])
    x1, x2 = jnp.split(rotated, 2, axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    parts = [x1 * cos - x2 * sin, x2 * cos + x1 * sin] + ([] if rest is None else [rest])
    return jnp.concatenate(parts, axis=-1)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


def dense(features: int, use_bias: bool, dtype: Any, name: str) -> Linear:
    """A projection whose matmul goes through :func:`dot_general`, or through
    ``quantized_matmul`` when its kernel is a quantized weight (``jaxllm.quantization``)."""
    return Linear(features, use_bias, dtype, dot_general, name=name)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): SwiGLU with silu, GeGLU with gelu."""

    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        gate = dense(c.intermediate_size, c.mlp_bias, self.dtype, "gate_proj")(x)       # [T, F]
        gate = apply_lora(self, "gate_proj", x, gate)
        up = dense(c.intermediate_size, c.mlp_bias, self.dtype, "up_proj")(x)           # [T, F]
        up = apply_lora(self, "up_proj", x, up)
        h = ACTIVATIONS[c.hidden_act](gate) * up
        out = dense(c.hidden_size, c.mlp_bias, self.dtype, "down_proj")(h)              # [T, D]
        return apply_lora(self, "down_proj", h, out)


class Attention(nn.Module):
    """Fused q|k|v projection, optional per-head q/k norms, RoPE, paged attention, output
    projection. q|k|v are one matmul: the checkpoint's projections are concatenated at load
    (one [D, (N + 2K) H] kernel: on 2 CPU cores SmolLM2's 30 layers of dense math went 26.5 ->
    22.9 ms per batch-1 step; the k and v matvecs alone read at half the bandwidth of big ones).
    Under tensor parallelism the fused axis holds ``qkv_shards`` blocks [q_s | k_s | v_s], one
    per shard, so a column split of the kernel hands each device whole heads of all three.
    """

    config: ModelConfig
    dtype: Any
    attention_fn: Callable

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, layer, window, metadata):
        c = self.config
        num_tokens = x.shape[0]
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        qkv = dense(q_dim + 2 * kv_dim, c.qkv_bias, self.dtype, "qkv_proj")(x)
        qkv = apply_lora(self, "qkv_proj", x, qkv)
        q_block, kv_block = q_dim // c.qkv_shards, kv_dim // c.qkv_shards
        q, k, v = jnp.split(qkv.reshape(num_tokens, c.qkv_shards, -1),
                            [q_block, q_block + kv_block], axis=-1)
        q = q.reshape(num_tokens, c.num_attention_heads, c.head_dim)                   # [T, N, H]
        k = k.reshape(num_tokens, c.num_key_value_heads, c.head_dim)                   # [T, K, H]
        v = v.reshape(num_tokens, c.num_key_value_heads, c.head_dim)                   # [T, K, H]
        if c.qk_norm:
            q = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="q_norm")(q)
            k = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="k_norm")(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out, k_cache, v_cache = self.attention_fn(q, k, v, k_cache, v_cache, layer, metadata,
                                                  scale=c.softmax_scale, sliding_window=window)
        out = out.reshape(num_tokens, -1)
        y = dense(c.hidden_size, c.o_bias, self.dtype, "o_proj")(out)
        return apply_lora(self, "o_proj", out, y), k_cache, v_cache                    # [T, D]


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer; with ``sandwich_norms`` the attention and MLP outputs are
    normalised too before their residual adds (Gemma). The carry (x, k_cache, v_cache, layer)
    suits ``lax.scan``; ``window`` and ``cos``/``sin`` are this layer's (``ModelConfig``).
    """

    config: ModelConfig
    dtype: Any
    attention_fn: Callable

    @nn.compact
    def __call__(self, carry, cos, sin, window, metadata):
        x, k_cache, v_cache, layer = carry
        c = self.config
        norm = lambda name: RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name=name)  # noqa: E731
        h = norm("input_norm")(x)
        h, k_cache, v_cache = Attention(c, self.dtype, self.attention_fn, name="self_attn")(
            h, cos, sin, k_cache, v_cache, layer, window, metadata)
        if c.sandwich_norms:
            h = norm("post_attention_norm")(h)
        x = x + h
        h = GatedMLP(c, self.dtype, name="mlp")(norm("pre_mlp_norm")(x))
        if c.sandwich_norms:
            h = norm("post_mlp_norm")(h)
        return (x + h, k_cache, v_cache, layer + 1), None
