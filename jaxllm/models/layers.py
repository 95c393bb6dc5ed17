"""Building blocks of Llama-family decoders, as Flax linen modules and plain functions.

Shape legend: T tokens, D model dim, N query heads, K kv heads, H head dim, F MLP dim.
Parameter names follow transformers' module names so the checkpoint weight map stays 1:1.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.kernels import cpu_matmul


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
    Elsewhere it is the plain dot.
    """
    if jax.default_backend() != "cpu":
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
    eps: float
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        # Normalise in float32 whatever the activation dtype, as transformers does.
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(self.dtype) * y.astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Rotary inverse frequencies [H/2] float32, with "linear" or "llama3" scaling applied."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    scaling = config.rope_scaling_dict
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq.astype(np.float32)
    if rope_type == "linear":
        return (inv_freq / scaling["factor"]).astype(np.float32)
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
        old_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return np.where(is_medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"rope_type {rope_type!r} is not supported (supported: default, linear, llama3)")


def rotary_cos_sin(positions: np.ndarray, inv_freq: np.ndarray, out: np.ndarray) -> None:
    """Host-side: out [T, H] float32 = cos | sin of positions [T] x inv_freq [H/2], in float32
    as transformers computes them (the step's ``StepInputs.rotary``)."""
    angles = np.multiply.outer(positions.astype(np.float32), inv_freq.astype(np.float32))
    half = inv_freq.shape[0]
    np.cos(angles, out=out[:, :half])
    np.sin(angles, out=out[:, half:])


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [T, n, H] in transformers' half-split ("rotate_half") layout."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    cos = cos[:, None, :].astype(x.dtype)
    sin = sin[:, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class LlamaMLP(nn.Module):
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c = self.config
        dense = lambda features, name: nn.Dense(features, use_bias=c.mlp_bias, dtype=self.dtype,
                                                dot_general=dot_general, name=name)
        gate = dense(c.intermediate_size, "gate_proj")(x)                 # [T, F]
        up = dense(c.intermediate_size, "up_proj")(x)                     # [T, F]
        return dense(c.hidden_size, "down_proj")(jax.nn.silu(gate) * up)  # [T, D]


class LlamaAttention(nn.Module):
    config: ModelConfig
    dtype: Any
    attention_fn: Callable

    @nn.compact
    def __call__(self, x, cos, sin, k_cache, v_cache, layer, inputs):
        c = self.config
        num_tokens = x.shape[0]
        dense = lambda features, name: nn.Dense(features, use_bias=c.attention_bias, dtype=self.dtype,
                                                dot_general=dot_general, name=name)
        q_dim, kv_dim = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        # q | k | v in one matmul: the checkpoint's three projections, fused at load
        # (``llama.fuse_qkv``).
        qkv = dense(q_dim + 2 * kv_dim, "qkv_proj")(x)
        q, k, v = jnp.split(qkv, [q_dim, q_dim + kv_dim], axis=-1)
        q = apply_rope(q.reshape(num_tokens, c.num_attention_heads, c.head_dim), cos, sin)   # [T, N, H]
        k = apply_rope(k.reshape(num_tokens, c.num_key_value_heads, c.head_dim), cos, sin)   # [T, K, H]
        v = v.reshape(num_tokens, c.num_key_value_heads, c.head_dim)                         # [T, K, H]
        out, k_cache, v_cache = self.attention_fn(q, k, v, k_cache, v_cache, layer, inputs,
                                                  scale=c.head_dim ** -0.5)
        out = dense(c.hidden_size, "o_proj")(out.reshape(num_tokens, -1))                   # [T, D]
        return out, k_cache, v_cache


class LlamaDecoderLayer(nn.Module):
    """One pre-norm decoder layer. The carry (x, k_cache, v_cache, layer) suits ``nn.scan``."""

    config: ModelConfig
    dtype: Any
    attention_fn: Callable

    @nn.compact
    def __call__(self, carry, cos, sin, inputs):
        x, k_cache, v_cache, layer = carry
        c = self.config
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="input_layernorm")(x)
        attn, k_cache, v_cache = LlamaAttention(c, self.dtype, self.attention_fn, name="self_attn")(
            h, cos, sin, k_cache, v_cache, layer, inputs)
        x = x + attn
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="post_attention_layernorm")(x)
        x = x + LlamaMLP(c, self.dtype, name="mlp")(h)
        return (x, k_cache, v_cache, layer + 1), None
