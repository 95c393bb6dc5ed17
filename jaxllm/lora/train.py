"""Training a LoRA adapter in pure JAX over the engine's own model code.

    base = TrainBase.from_engine(engine)                  # the engine's model and weights
    lora_params = init_lora(base, rank=8, targets=["q_proj", "v_proj"], key=jax.random.key(0))
    step = make_train_step(base, optax.adamw(1e-3), lora_alpha=16)
    opt_state = step.init(lora_params)
    lora_params, opt_state, loss = step(lora_params, opt_state, tokens, loss_mask)
    save_peft(lora_params, "my-adapter", lora_alpha=16, targets=base.targets)

The forward is ``CausalLM`` itself (the same layers and the same ``apply_lora`` the server runs)
over a batch laid out as one prefill step of B rows, with the pure-JAX reference attention
(differentiable; the serving kernels are not) and a one-block scratch KV cache that no token
reads back (no row has cached context). ``lora_params[module] = {"a": [L, D, r], "b": [L, r,
F]}`` in transformers' module names, the update ``x a b * lora_alpha / r`` (PEFT's).
Shape legend: B sequences, S tokens each, L layers, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.kernels.paged_attention.metadata import AttentionMetadata
from jaxllm.kernels.paged_attention.reference import paged_attention
from jaxllm.kv_cache import KVCache
from jaxllm.lora.adapter import LoRAAdapter
from jaxllm.lora.slab import engine_factors, lora_variables
from jaxllm.lora.targets import Projection, TargetModule, lora_targets
from jaxllm.models.causal_lm import CausalLM, unstack_layers
from jaxllm.models.rope import RotaryTables
from jaxllm.step_inputs import StepInputs


@dataclasses.dataclass(frozen=True)
class TrainBase:
    """The frozen base model: its code (with the reference attention), weights and modules."""

    model: CausalLM
    params: Any
    config: ModelConfig
    targets: dict[str, TargetModule]
    projections: dict[str, Projection]

    @classmethod
    def from_engine(cls, engine: Any, scan_layers: bool = True) -> TrainBase:
        """The engine's model and its weights (shared when the layouts agree, else restacked).

        ``scan_layers``: train a scanned model, whose gradient compiles once per layer body:
        on SmolLM2 (30 layers, 2 CPU cores) the first step cost ~10 CPU-s against ~15
        unrolled, and later steps the same (~1.5 CPU-s for 4 x 40 tokens).
        """
        m, params = engine.model, engine.model_runner.params
        scan = scan_layers
        if scan and not m.scan_layers:
            layers = [params[f"layers_{i}"] for i in range(m.config.num_hidden_layers)]
            params = {k: v for k, v in params.items() if not k.startswith("layers_")}
            params["layers"] = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *layers)
        elif not scan and m.scan_layers:
            params = unstack_layers(params, m.config.num_hidden_layers)
        model = CausalLM(config=m.config, dtype=m.dtype, attention_fn=paged_attention,
                         scan_layers=scan, layer_cls=m.layer_cls)
        targets, projections = lora_targets(engine.family.weight_map(engine.model_config))
        return cls(model, params, engine.model_config, targets, projections)


def init_lora(base: TrainBase, rank: int, targets: Sequence[str], key: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """New factors for ``targets`` (transformers module names, e.g. "q_proj"): A drawn as
    PEFT does (uniform in +-1/sqrt(D)), B zero, so training starts at the base model."""
    unknown = sorted(set(targets) - set(base.targets))
    if unknown or not targets:
        raise ValueError(f"unknown LoRA target modules {unknown or list(targets)} "
                         f"(this model's: {', '.join(sorted(base.targets))})")
    if type(rank) is not int or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    num_layers = base.config.num_hidden_layers
    out = {}
    for module, k in zip(sorted(targets), jax.random.split(key, len(targets))):
        t = base.targets[module]
        bound = 1 / math.sqrt(t.in_dim)
        out[module] = {"a": jax.random.uniform(k, (num_layers, t.in_dim, rank), jnp.float32, -bound, bound),
                       "b": jnp.zeros((num_layers, rank, t.out_dim), jnp.float32)}
    return out


def _batch_inputs(config: ModelConfig, num_rows: int, seq_len: int, tokens: jax.Array) -> StepInputs:
    """B rows of S tokens as one prefill step: every token's logits, no cached context."""
    num_tokens = num_rows * seq_len
    positions = np.tile(np.arange(seq_len, dtype=np.int32), num_rows)
    tables = RotaryTables(config.rope)
    rotary = np.zeros((tables.shape[0], num_tokens, tables.shape[1]), np.float32)
    tables.fill(positions, rotary)
    metadata = AttentionMetadata(
        positions=jnp.asarray(positions), slot_mapping=jnp.zeros(num_tokens, jnp.int32),
        token_rows=jnp.repeat(jnp.arange(num_rows, dtype=jnp.int32), seq_len),
        block_tables=jnp.zeros((num_rows, 1), jnp.int32), context_lens=jnp.zeros(num_rows, jnp.int32))
    return StepInputs(token_ids=tokens.reshape(-1), attention=metadata,
                      logits_indices=jnp.arange(num_tokens, dtype=jnp.int32), rotary=jnp.asarray(rotary))


def forward_logits(base: TrainBase, params: Any, lora_params: dict | None, tokens: jax.Array,
                   lora_alpha: float = 16.0) -> jax.Array:
    """Float32 logits [B, S, V] of token ids [B, S] under the adapter (None: the base)."""
    c = base.config
    num_rows, seq_len = tokens.shape
    inputs = _batch_inputs(c, num_rows, seq_len, tokens)
    cache_shape = (c.num_hidden_layers, 1, 1, c.num_key_value_heads, c.head_dim)
    kv_cache = KVCache(k=jnp.zeros(cache_shape, base.model.dtype), v=jnp.zeros(cache_shape, base.model.dtype))
    variables = {"params": params}
    if lora_params:
        rank = next(iter(lora_params.values()))["a"].shape[-1]
        adapter = LoRAAdapter(rank, lora_alpha / rank,
                              {m: (w["a"], w["b"]) for m, w in lora_params.items()})
        factors = engine_factors(adapter, base.targets, base.projections, rank)
        slab = {name: (a[:, :, None], b[:, None]) for name, (a, b) in factors.items()}   # one slot
        variables["lora"] = lora_variables(slab, jnp.zeros(num_rows * seq_len, jnp.int32),
                                           base.model.scan_layers)
    _, logits = base.model.apply(variables, kv_cache, inputs)
    return logits.reshape(num_rows, seq_len, -1)


def causal_lm_loss(base: TrainBase, params: Any, lora_params: dict, tokens: jax.Array,
                   loss_mask: jax.Array, lora_alpha: float = 16.0) -> jax.Array:
    """Mean next-token cross-entropy over the tokens where ``loss_mask`` [B, S] is 1 (the
    completion, not the prompt or padding): token t is predicted from tokens < t."""
    logits = forward_logits(base, params, lora_params, tokens, lora_alpha)[:, :-1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    target = jnp.take_along_axis(logprobs, tokens[:, 1:, None], axis=-1)[..., 0]
    mask = loss_mask[:, 1:].astype(jnp.float32)
    return -(target * mask).sum() / jnp.maximum(mask.sum(), 1.0)


class TrainStep:
    """``step(lora_params, opt_state, tokens [B, S], loss_mask [B, S]) -> (lora_params,
    opt_state, loss)``: one jitted optax update of the factors (the base stays frozen)."""

    def __init__(self, base: TrainBase, optimizer: Any, lora_alpha: float) -> None:
        self.base, self.optimizer = base, optimizer

        def step(params, lora_params, opt_state, tokens, loss_mask):
            loss, grads = jax.value_and_grad(
                lambda lp: causal_lm_loss(base, params, lp, tokens, loss_mask, lora_alpha))(lora_params)
            updates, opt_state = optimizer.update(grads, opt_state, lora_params)
            return _apply_updates(lora_params, updates), opt_state, loss

        self._jitted: Callable = jax.jit(step)

    def init(self, lora_params: dict) -> Any:
        return self.optimizer.init(lora_params)

    def __call__(self, lora_params: dict, opt_state: Any, tokens: Any, loss_mask: Any
                 ) -> tuple[dict, Any, jax.Array]:
        return self._jitted(self.base.params, lora_params, opt_state,
                            jnp.asarray(tokens, jnp.int32), jnp.asarray(loss_mask, jnp.int32))


def _apply_updates(params: Any, updates: Any) -> Any:
    return jax.tree_util.tree_map(lambda p, u: p + u, params, updates)


def make_train_step(base: TrainBase, optimizer: Any = None, lora_alpha: float = 16.0) -> TrainStep:
    """A jitted train step; ``optimizer`` defaults to ``optax.adamw(1e-3)``."""
    if optimizer is None:
        try:
            import optax
        except ImportError as e:
            raise ImportError("LoRA training needs optax: pip install optax") from e
        optimizer = optax.adamw(1e-3)
    return TrainStep(base, optimizer, lora_alpha)
