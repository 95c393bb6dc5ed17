"""The pytrees that cross the host/device boundary once per step.

Shape legend: T tokens in the step (bucketed), S sequences (rows, bucketed), P blocks per row
(bucketed), V vocabulary, L max_model_len, A strategy arguments, K max logprobs, R rotary tables
(one per distinct RoPE base of the model). The token layout the attention kernels read is their
own ``AttentionMetadata`` (``jaxllm.kernels.paged_attention.metadata``, padding rules there).

Optional sampling features travel in arrays whose width is 0 unless some row of the step uses
them (history: penalties; logit_bias: logit_bias / allowed_token_ids / min_tokens;
prompt_next_ids: prompt logprobs; use_processors: Python logits processors, whose host callback
would also keep the step out of JAX's persistent compilation cache). Those widths join the compile key, so each such variant of a
bucket is compiled once, and per-request values never change a shape.

Rotary cos/sin come from the host (``rotary``), computed once per step from the positions: left
to XLA:CPU, cos(positions x inv_freq) was fused into every layer's rotary fusion and evaluated
again per head and layer (~40 ms of a 512-token SmolLM2 step, ~12 ms of a 64-row decode).
A model with several RoPE tables (Gemma 3: local and global bases) gets one per table; each
layer reads its own (``ModelConfig.layer_rope``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from jaxllm.kernels.paged_attention.metadata import AttentionMetadata

# The [S] fields of SamplingTensors: (dtype, the neutral value a padding row holds).
SAMPLING_ROW_FIELDS: dict[str, tuple[type, Any]] = {
    "temperature": (np.float32, 0.0), "top_k": (np.int32, 0), "top_p": (np.float32, 1.0),
    "min_p": (np.float32, 0.0), "repetition_penalty": (np.float32, 1.0),
    "frequency_penalty": (np.float32, 0.0), "presence_penalty": (np.float32, 0.0),
    "seeds": (np.uint32, 0), "output_index": (np.int32, 0), "num_logprobs": (np.int32, -1),
    "strategy_ids": (np.int32, 0), "prompt_lens": (np.int32, 0),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    token_ids: jax.Array            # [T] int32   flattened new tokens of every scheduled row
    attention: AttentionMetadata    # positions, slots, rows [T]; block tables [S, P]; context [S]
    logits_indices: jax.Array       # [S] int32   index in T of each row's last token
    rotary: jax.Array               # [R, T, Hr] float32 cos | sin of each token's rotary angles
                                    #   (Hr/2 each; Hr = the rotated part of the head dim)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array         # [S] float32  0 = greedy
    top_k: jax.Array               # [S] int32    0 = disabled
    top_p: jax.Array               # [S] float32  1 = disabled
    min_p: jax.Array               # [S] float32  0 = disabled
    repetition_penalty: jax.Array  # [S] float32  1 = disabled
    frequency_penalty: jax.Array   # [S] float32  0 = disabled
    presence_penalty: jax.Array    # [S] float32  0 = disabled
    seeds: jax.Array               # [S] uint32   per-request seed (low 32 bits)
    output_index: jax.Array        # [S] int32    index of the token being sampled in the output
    num_logprobs: jax.Array        # [S] int32    top alternatives wanted, -1 = no logprobs
    strategy_ids: jax.Array        # [S] int32    registered strategy (1-based), 0 = none
    strategy_args: jax.Array       # [S, A] float32 that strategy's arguments, in declared order
    prompt_lens: jax.Array         # [S] int32    prompt part of each history row
    history: jax.Array             # [S, L or 0] int32 prompt + output token ids, -1 padded
    logit_bias: jax.Array          # [S, V or 0] float32 added to the raw logits (-inf = banned)
    use_processors: jax.Array      # [S or 0] bool row has Python logits processors
    prompt_next_ids: jax.Array     # [T or 0] int32 next prompt token after each token, -1 none

    @classmethod
    def build(cls, num_rows: int, **values: Any) -> "SamplingTensors":
        """Host arrays for ``num_rows`` rows: neutral (greedy) settings unless given in ``values``.

        Row fields broadcast a scalar or take an [S] array; the 2-D and prompt fields take
        arrays (default: one zero strategy argument, no history, bias or prompt logprobs).
        For tests and for trying a strategy on hand-made logits.
        """
        fields = {name: np.broadcast_to(np.asarray(values.pop(name, neutral), dtype), (num_rows,)).copy()
                  for name, (dtype, neutral) in SAMPLING_ROW_FIELDS.items()}
        fields["strategy_args"] = np.asarray(values.pop("strategy_args", np.zeros((num_rows, 1))), np.float32)
        fields["history"] = np.asarray(values.pop("history", np.zeros((num_rows, 0))), np.int32)
        fields["logit_bias"] = np.asarray(values.pop("logit_bias", np.zeros((num_rows, 0))), np.float32)
        fields["use_processors"] = np.asarray(values.pop("use_processors", np.zeros(0)), np.bool_)
        fields["prompt_next_ids"] = np.asarray(values.pop("prompt_next_ids", np.zeros(0)), np.int32)
        if values:
            raise TypeError(f"unknown SamplingTensors fields: {sorted(values)}")
        return cls(**fields)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepOutputs:
    token_ids: jax.Array             # [S] int32    sampled token of each row
    logprobs: jax.Array              # [S] float32  log-softmax of the raw logits at that token
    ranks: jax.Array                 # [S] int32    its rank (1 = most likely); 0 if not asked
    top_token_ids: jax.Array         # [S, K] int32   most likely tokens, when asked
    top_logprobs: jax.Array          # [S, K] float32 and their logprobs
    prompt_logprobs: jax.Array       # [T or 0] float32 logprob of the next prompt token
    prompt_ranks: jax.Array          # [T or 0] int32
    prompt_top_token_ids: jax.Array  # [T or 0, K] int32
    prompt_top_logprobs: jax.Array   # [T or 0, K] float32
