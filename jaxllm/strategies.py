"""Pluggable sampling strategies: jittable logits filters registered by name.

A strategy is a pure function ``fn(logits, args) -> logits`` over a batch of rows:

* ``logits``: [S, V] float32, already divided by each row's temperature and truncated by the
  built-in min-p / top-k / top-p (removed tokens are ``-inf``);
* ``args``: ``{name: [S] float32}``, one entry per argument declared at registration, holding
  each row's ``SamplingParams.strategy_args`` value (or the declared default);
* it returns [S, V] float32 logits; tokens it removes must be ``-inf``. It must not change
  shapes or depend on Python values of ``logits`` (it runs inside the compiled step).

The engine then draws from softmax(returned logits) with the row's own seeded key, so a strategy
never handles randomness. Register before creating the Engine; requests select it with
``SamplingParams(strategy="name", strategy_args={...})``. Several strategies, and rows using
none, share one compiled step: a strategy's function runs only when some row in the batch
selected it (``lax.cond``), and its result is kept only for those rows.

    import jax.numpy as jnp
    from jaxllm import register_strategy

    @register_strategy("my_floor", floor=-5.0)
    def my_floor(logits, args):
        return jnp.where(logits >= args["floor"][:, None], logits, -jnp.inf)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Mapping

import jax

StrategyFn = Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]


@dataclasses.dataclass(frozen=True)
class SamplingStrategy:
    """A registered strategy: its function and its arguments' names and default values."""

    name: str
    fn: StrategyFn
    defaults: tuple[tuple[str, float], ...]

    @property
    def arg_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.defaults)

    def arg_values(self, strategy_args: Mapping[str, float] | None) -> list[float]:
        """This strategy's argument row for one request: given values over the defaults."""
        given = dict(strategy_args or {})
        return [float(given.get(name, default)) for name, default in self.defaults]

    def validate_args(self, strategy_args: Mapping[str, float] | None) -> None:
        for name, value in (strategy_args or {}).items():
            if name not in self.arg_names:
                raise ValueError(f"strategy_args: strategy {self.name!r} takes "
                                 f"{list(self.arg_names)}, got unknown argument {name!r}")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"strategy_args[{name!r}] must be a finite number, got {value!r}")


_REGISTRY: dict[str, SamplingStrategy] = {}


def register_strategy(name: str, **defaults: float) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: registers ``fn`` as the sampling strategy ``name`` with keyword defaults.

    Re-registering a name replaces it (handy in notebooks); engines created earlier keep the
    strategies they were built with.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a strategy name must be a non-empty string, got {name!r}")
    for arg, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"strategy {name!r}: default of {arg!r} must be a number, got {value!r}")

    def decorator(fn: StrategyFn) -> StrategyFn:
        _REGISTRY[name] = SamplingStrategy(name, fn, tuple((k, float(v)) for k, v in defaults.items()))
        return fn

    return decorator


def registered_strategies() -> tuple[SamplingStrategy, ...]:
    """A snapshot of the registry, in registration order."""
    return tuple(_REGISTRY.values())
