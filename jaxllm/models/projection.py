"""The model's projection and embedding modules, over float or quantized weights.

``Linear`` is ``nn.Dense`` (same params, same float math) whose kernel may also be a
``QuantizedWeight`` [N, K] (``jaxllm.quantization``): the product is then ``quantized_matmul``.
``Embed`` is ``nn.Embed`` whose table may be quantized: the lookup gathers the packed rows and
dequantizes only those. Both read an existing quantized param with ``get_variable``: flax's
``param`` would check it against the float shape its initializer makes.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.quantization import embedding_lookup, is_quantized, quantized_matmul


def existing_quantized(module: nn.Module, name: str) -> Any:
    """The module's param ``name`` when it exists and is quantized, else None."""
    if module.has_variable("params", name):
        value = module.get_variable("params", name)
        if is_quantized(value):
            return value
    return None


class Linear(nn.Module):
    """x [T, K] @ kernel (+ bias) -> [T, features]; kernel float [K, features] (through
    ``dot_general``, as ``nn.Dense(dot_general=...)``) or quantized [features, K]."""

    features: int
    use_bias: bool
    dtype: Any
    dot_general: Callable

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        quantized = existing_quantized(self, "kernel")
        if quantized is not None:
            y = quantized_matmul(x.astype(self.dtype), quantized)
        else:
            kernel = self.param("kernel", nn.initializers.lecun_normal(),
                                (x.shape[-1], self.features), jnp.float32)
            y = self.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                 (((x.ndim - 1,), (0,)), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
            y = y + bias.astype(self.dtype)
        return y


class Embed(nn.Module):
    """``nn.Embed``'s lookup [T] -> [T, D] in ``dtype``; ``table`` is the [V, D] param
    (float or quantized) for a tied head."""

    num_embeddings: int
    features: int
    dtype: Any

    def setup(self) -> None:
        self.table = existing_quantized(self, "embedding")
        if self.table is None:
            self.table = self.param("embedding", nn.initializers.variance_scaling(
                1.0, "fan_in", "normal", out_axis=0), (self.num_embeddings, self.features),
                jnp.float32)

    def __call__(self, token_ids: jax.Array) -> jax.Array:
        if is_quantized(self.table):
            return embedding_lookup(self.table, token_ids, self.dtype)
        return jnp.take(self.table.astype(self.dtype), token_ids, axis=0)
