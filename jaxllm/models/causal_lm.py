"""The decoder-only causal LM every family runs: embeddings, a stack of layers, norm, head.

Run as a pure function: ``CausalLM(...).apply({"params": params}, kv_cache, inputs)`` returns
the updated cache and the logits of each row's last token. The family supplies the layer class
(``ModelFamily.layer``; the shared ``layers.DecoderLayer`` by default) and the ``ModelConfig``.

The params tree (Flax linen names), every per-layer leaf stacked along a leading axis L:

    embed_tokens/embedding                          [V, D]
    layers/input_norm/scale                         [L, D]
    layers/self_attn/qkv_proj/kernel                [L, D, (N + 2K) H]   q | k | v fused
    layers/self_attn/qkv_proj/bias                  [L, (N + 2K) H]      (qkv_bias)
    layers/self_attn/{q,k}_norm/scale               [L, H]               (qk_norm)
    layers/self_attn/o_proj/kernel, bias            [L, N H, D], [L, D]  (bias: o_bias)
    layers/post_attention_norm/scale                [L, D]               (sandwich_norms)
    layers/pre_mlp_norm/scale                       [L, D]
    layers/mlp/{gate,up}_proj/kernel, bias          [L, D, F], [L, F]    (bias: mlp_bias)
    layers/mlp/down_proj/kernel, bias               [L, F, D], [L, D]    (bias: mlp_bias)
    layers/post_mlp_norm/scale                      [L, D]               (sandwich_norms)
    norm/scale                                      [D]
    lm_head/kernel                                  [D, V]               (untied head only)

Any kernel and the embedding may instead be a ``jaxllm.quantization.QuantizedWeight`` [out, in]
(``lm_head/kernel`` [V, D], ``qkv_proj/kernel`` [L, (N + 2K) H, D], ...). Unrolled models
(``scan_layers=False``) take "layers_0".."layers_{L-1}" instead of "layers"
(``unstack_layers``). Shape legend: T tokens, S rows, D model dim, V vocabulary, L layers.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache
from jaxllm.models.layers import DecoderLayer, RMSNorm, dot_general
from jaxllm.models.projection import Embed, existing_quantized
from jaxllm.quantization import is_quantized, quantized_matmul
from jaxllm.step_inputs import StepInputs


class LMHead(nn.Module):
    """Float32 logits [T, V] of final-normed hidden states [T, D]: against the embedding
    table when tied (no params of its own), else its own ``kernel`` [D, V] (either may be a
    quantized [V, D] weight); then the optional soft cap. ``jaxllm.step`` runs it alone for
    prompt logprobs."""
    config: ModelConfig
    dtype: Any

    @nn.compact
    def __call__(self, h: jax.Array, embedding: Any) -> jax.Array:
        c = self.config
        if c.tie_word_embeddings:
            # Contract against the [V, D] table as stored; embed.attend's ``h @ E.T`` made
            # XLA:CPU copy a transposed table every step (113 MB for SmolLM2).
            weight, contract = embedding, (((1,), (1,)), ((), ()))
        elif (weight := existing_quantized(self, "kernel")) is None:
            weight = self.param("kernel", nn.initializers.lecun_normal(),
                                (c.hidden_size, c.vocab_size), jnp.float32)
            contract = (((1,), (0,)), ((), ()))
        if is_quantized(weight):
            logits = quantized_matmul(h.astype(self.dtype), weight)
        else:
            logits = dot_general(h.astype(self.dtype), weight.astype(self.dtype), contract)
        logits = logits.astype(jnp.float32)
        if c.final_logit_softcapping is not None:
            cap = c.final_logit_softcapping
            logits = cap * jnp.tanh(logits / cap)
        return logits


class CausalLM(nn.Module):
    config: ModelConfig
    dtype: Any
    attention_fn: Callable
    scan_layers: bool
    layer_cls: type = DecoderLayer

    @nn.compact
    def __call__(self, kv_cache: KVCache, inputs: StepInputs) -> tuple[KVCache, jax.Array]:
        c = self.config
        embed = Embed(c.vocab_size, c.hidden_size, self.dtype, name="embed_tokens")
        x = embed(inputs.token_ids)                                       # [T, D]
        if c.embedding_scale is not None:
            # In the activation dtype, as transformers scales (sqrt(640) is 25.25 in bf16).
            x = x * jnp.asarray(c.embedding_scale, self.dtype)
        metadata = inputs.attention
        layer_args = (c, self.dtype, self.attention_fn)
        if self.scan_layers:
            x, k_cache, v_cache = self._scan(x, kv_cache, inputs, layer_args)
        else:
            carry = (x, kv_cache.k, kv_cache.v, 0)
            for i in range(c.num_hidden_layers):
                cos, sin = jnp.split(inputs.rotary[c.layer_rope[i]], 2, axis=-1)  # [T, Hr/2]
                window = c.layer_windows[i] or None
                carry, _ = self.layer_cls(*layer_args, name=f"layers_{i}")(
                    carry, cos, sin, window, metadata)
            x, k_cache, v_cache, _ = carry
        # Only each row's last token needs logits: [S, D] instead of [T, D] through the head.
        h = RMSNorm(c.rms_norm_eps, self.dtype, c.norm_offset, name="norm")(x[inputs.logits_indices])
        logits = LMHead(c, self.dtype, name="lm_head")(h, embed.table)    # [S, V]
        return KVCache(k=k_cache, v=v_cache), logits

    def _scan(self, x, kv_cache, inputs, layer_args):
        """A plain lax.scan of the unbound layer over the stacked params. (flax's nn.scan
        re-traces the body with partial evaluation to check broadcast inputs, which rejected
        the Pallas attention kernel on jax 0.11.) Per-layer windows and rotary tables travel
        as scanned arrays only when layers differ; a uniform model keeps them static."""
        c = self.config
        layer = self.layer_cls(*layer_args, parent=None)
        uniform_window = len(set(c.layer_windows)) == 1
        uniform_rope = len(set(c.layer_rope)) == 1
        xs = (self.variables["params"]["layers"],
              None if uniform_window else jnp.asarray(c.layer_windows, jnp.int32),
              None if uniform_rope else jnp.asarray(c.layer_rope, jnp.int32),
              self.variables.get("lora", {}).get("layers"))   # LoRA slabs (jaxllm.lora.slab)

        def body(carry, per_layer):
            layer_params, window, rope_index, layer_lora = per_layer
            window = (c.layer_windows[0] or None) if uniform_window else window
            rotary = inputs.rotary[c.layer_rope[0] if uniform_rope else rope_index]
            cos, sin = jnp.split(rotary, 2, axis=-1)
            variables = {"params": layer_params}
            if layer_lora is not None:
                variables["lora"] = layer_lora
            return layer.apply(variables, carry, cos, sin, window, inputs.attention)

        carry, _ = jax.lax.scan(body, (x, kv_cache.k, kv_cache.v, jnp.int32(0)), xs)
        return carry[:3]


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Turns stacked "layers" params into "layers_0".. for the unrolled model."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
    return params
