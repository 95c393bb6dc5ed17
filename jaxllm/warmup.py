"""Compiles every step shape of a :class:`~jaxllm.buckets.BucketPolicy` before serving.

Each key is compiled and run once on a step of padding only (``StepLayout.padding``, the layout
``prepare_inputs`` pads with), which changes nothing outside the reserved KV block 0. Every
sampling feature but Python logits processors runs inside these same executables, so after
warm-up no request compiles anything; the penalty slots' seeding call is compiled here too
(with the first step).
Running (not only compiling) also fills JAX's persistent compilation cache and any lazy
initialisation, so a second start-up only loads. (JAX does not write executables with host
callbacks to that cache, so the variant for Python logits processors, compiled on first use,
is compiled afresh every start-up.)
"""

from __future__ import annotations

from typing import Iterable

import jax
import numpy as np
import tqdm.auto as tqdm

from jaxllm.buckets import BaseKey, BucketPolicy
from jaxllm.model_runner import ModelRunner, PreparedStep
from jaxllm.step_inputs import StepKey


def warmup(model_runner: ModelRunner, policy: BucketPolicy, *, progress: bool = True,
           keys: Iterable[BaseKey] | None = None) -> int:
    """Compiles and runs the runner's step once for every base key of ``policy``.

    Call it before any request is submitted (it updates the runner's device state like a step).

    Args:
        policy: the bucket policy whose ``keys()`` the engine's steps use.
        progress: show a "Compiling steps" tqdm bar.
        keys: a subset of keys to warm (default: all of ``policy.keys()``).

    Returns:
        How many step executables were newly compiled (keys compiled before are only run).
    """
    keys = tuple(policy.keys() if keys is None else keys)
    step = model_runner.step
    before = step.num_compilations
    # Slot 0 holds no sequence yet: seeding it with no tokens leaves it as it is (all zeros).
    # The seeding rides with the first step, so a multi-host follower replays it too.
    seeds = [(0, np.full(model_runner.max_model_len, -1, np.int32), 0)]
    for key in tqdm.tqdm(keys, desc="Compiling steps", unit="step", disable=not progress):
        key = StepKey(*key)
        padding = PreparedStep(key, model_runner.layout.padding(key), seeds)
        seeds = []
        jax.block_until_ready(model_runner.run_step(padding))
    return step.num_compilations - before
