"""The Llama-family causal LM (Llama 1-3, TinyLlama, SmolLM2, Mistral-style GQA) in Flax.

Run as a pure function: ``LlamaForCausalLM(...).apply({"params": params}, kv_cache, inputs)``
returns the updated cache and the logits of each row's last token.
Shape legend: T tokens, S rows, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.kv_cache import KVCache
from jaxllm.models.layers import LlamaDecoderLayer, RMSNorm, dot_general
from jaxllm.step_inputs import StepInputs


class LlamaForCausalLM(nn.Module):
    """Params: "embed_tokens", "norm", optional "lm_head", and the decoder layers, either
    stacked along a leading axis under "layers" (``scan_layers``) or as "layers_0".."layers_{L-1}".
    """

    config: ModelConfig
    dtype: Any
    attention_fn: Callable
    scan_layers: bool

    @nn.compact
    def __call__(self, kv_cache: KVCache, inputs: StepInputs) -> tuple[KVCache, jax.Array]:
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, name="embed_tokens")
        x = embed(inputs.token_ids)                                       # [T, D]
        cos, sin = jnp.split(inputs.rotary, 2, axis=-1)                    # [T, H/2] each
        layer_args = (c, self.dtype, self.attention_fn)
        if self.scan_layers:
            # A plain lax.scan of the unbound layer over the stacked params. (flax's nn.scan
            # re-traces the body with partial evaluation to check broadcast inputs, which
            # rejected the Pallas attention kernel on jax 0.11.)
            layer = LlamaDecoderLayer(*layer_args, parent=None)

            def body(carry, layer_params):
                return layer.apply({"params": layer_params}, carry, cos, sin, inputs)

            carry, _ = jax.lax.scan(body, (x, kv_cache.k, kv_cache.v, jnp.int32(0)),
                                    self.variables["params"]["layers"])
        else:
            carry = (x, kv_cache.k, kv_cache.v, 0)
            for i in range(c.num_hidden_layers):
                carry, _ = LlamaDecoderLayer(*layer_args, name=f"layers_{i}")(carry, cos, sin, inputs)
        x, k_cache, v_cache, _ = carry
        # Only each row's last token needs logits: [S, D] instead of [T, D] through the head.
        h = RMSNorm(c.rms_norm_eps, self.dtype, name="norm")(x[inputs.logits_indices])
        if c.tie_word_embeddings:
            # Contract against the [V, D] table as stored; embed.attend's ``h @ E.T`` made
            # XLA:CPU copy a transposed table every step (113 MB for SmolLM2).
            logits = dot_general(h, embed.embedding.astype(self.dtype), (((1,), (1,)), ((), ())))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, dot_general=dot_general,
                              name="lm_head")(h)
        return KVCache(k=k_cache, v=v_cache), logits.astype(jnp.float32)  # [S, V]


def fuse_qkv(params: dict) -> dict:
    """Replaces the loaded q/k/v_proj of the stacked "layers" with one "qkv_proj" whose kernel
    (and bias) is theirs concatenated along the output axis, as the model expects.

    One matrix-vector product instead of three: a batch-1 decode reads the same bytes in fewer,
    larger streams (on 2 CPU cores, SmolLM2-135M's 30 layers of dense math 26.5 -> 22.9 ms per
    step; the k and v matvecs alone read at half the bandwidth of the big ones). Fusing
    gate/up as well gained nothing at batch 1 and lost ~7% at 64 rows, so they stay apart.
    """
    attention = dict(params["layers"]["self_attn"])
    parts = [attention.pop(name) for name in ("q_proj", "k_proj", "v_proj")]
    attention["qkv_proj"] = {leaf: np.concatenate([p[leaf] for p in parts], axis=-1)
                             for leaf in parts[0]}
    return {**params, "layers": {**params["layers"], "self_attn": attention}}


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Turns stacked "layers" params into "layers_0".. for the unrolled model."""
    params = dict(params)
    stacked = params.pop("layers")
    for i in range(num_layers):
        params[f"layers_{i}"] = jax.tree_util.tree_map(lambda a, i=i: a[i], stacked)
    return params
