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

A strategy is traced into every step an engine compiles, so a broken one would fail steps in
the middle of serving, for every request. It is checked twice before that can happen, each
time by tracing it once with ``jax.eval_shape`` (no computation, milliseconds):

* ``register_strategy`` traces it on [3, 1024] float32 logits and refuses, with a ValueError
  naming it, a function that raises while traced or returns anything but [S, V] float32
  (a [S, 1] result that would broadcast, a [S, V - 1] one);
* ``Engine()`` traces each strategy it would serve at its own shape ([max_num_seqs, vocab
  size]), since a strategy can fail only there (a fixed top-k wider than the vocabulary), or
  can have reached the registry without the first check. An engine leaves a failing strategy
  out with a logged warning, and refuses requests that select it at submission with a
  ValueError saying why: a strategy registered elsewhere cannot break it. With
  ``Engine(strategies=[...])`` it serves exactly the strategies named, and a name that is not
  registered or fails the check is an error at ``Engine()``.

``unregister_strategy(name)`` removes one; engines keep the strategies they were built with.

    import jax.numpy as jnp
    from jaxllm import register_strategy

    @register_strategy("my_floor", floor=-5.0)
    def my_floor(logits, args):
        return jnp.where(logits >= args["floor"][:, None], logits, -jnp.inf)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from jaxllm.request_handle import short_error

StrategyFn = Callable[[jax.Array, Mapping[str, jax.Array]], jax.Array]
# (rows, vocabulary) of the abstract logits register_strategy traces a strategy on
REGISTRATION_SHAPE = (3, 1024)

logger = logging.getLogger(__name__)


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


@dataclasses.dataclass(frozen=True)
class RefusedStrategy:
    """A registered strategy an engine left out because it failed the engine's check: the
    input processor refuses requests that select it, with the reason."""

    name: str
    reason: str

    def validate_args(self, strategy_args: Mapping[str, float] | None) -> None:
        raise ValueError(f"strategy {self.name!r} is not served by this engine: {self.reason}")


_REGISTRY: dict[str, SamplingStrategy] = {}


def check_strategy(strategy: SamplingStrategy, num_rows: int, vocab_size: int) -> None:
    """Traces ``strategy`` once on abstract [num_rows, vocab_size] float32 logits (and its
    [num_rows] float32 arguments); a ValueError naming it if it raises or returns anything
    but logits of that shape and dtype."""
    logits = jax.ShapeDtypeStruct((num_rows, vocab_size), jnp.float32)
    args = {name: jax.ShapeDtypeStruct((num_rows,), jnp.float32) for name in strategy.arg_names}
    where = f"on [{num_rows}, {vocab_size}] float32 logits"
    try:
        out = jax.eval_shape(strategy.fn, logits, args)
    except Exception as exc:  # noqa: BLE001 - user code: any failure refuses the strategy
        raise ValueError(f"strategy {strategy.name!r} failed {where}: {short_error(exc)}") from exc
    if not (isinstance(out, jax.ShapeDtypeStruct) and out.shape == logits.shape
            and out.dtype == jnp.float32):
        got = (f"{out.dtype}{list(out.shape)}" if isinstance(out, jax.ShapeDtypeStruct)
               else type(out).__name__)
        raise ValueError(f"strategy {strategy.name!r} must return [S, V] float32 logits; "
                         f"{where} it returned {got}")


def register_strategy(name: str, **defaults: float) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: registers ``fn`` as the sampling strategy ``name`` with keyword defaults.

    The function is traced once first (``check_strategy`` on ``REGISTRATION_SHAPE``): one that
    fails or returns the wrong shape or dtype is refused with a ValueError, and the registry
    is left as it was. Re-registering a name replaces it (handy in notebooks); engines created
    earlier keep the strategies they were built with.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"a strategy name must be a non-empty string, got {name!r}")
    for arg, value in defaults.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"strategy {name!r}: default of {arg!r} must be a number, got {value!r}")

    def decorator(fn: StrategyFn) -> StrategyFn:
        strategy = SamplingStrategy(name, fn, tuple((k, float(v)) for k, v in defaults.items()))
        check_strategy(strategy, *REGISTRATION_SHAPE)
        _REGISTRY[name] = strategy
        return fn

    return decorator


def unregister_strategy(name: str) -> None:
    """Removes the strategy ``name`` from the registry (engines created earlier keep it); a
    ValueError if none is registered under that name."""
    if _REGISTRY.pop(name, None) is None:
        raise ValueError(f"no strategy {name!r} is registered; registered: {sorted(_REGISTRY)}")


def registered_strategies() -> tuple[SamplingStrategy, ...]:
    """A snapshot of the registry, in registration order."""
    return tuple(_REGISTRY.values())


def engine_strategies(num_rows: int, vocab_size: int, selected: tuple[str, ...] | None = None
                      ) -> tuple[dict[str, SamplingStrategy], dict[str, RefusedStrategy]]:
    """The strategies an engine serves, each checked at its shape, and those it leaves out.

    Args:
        num_rows, vocab_size: the engine's largest sampler batch and its vocabulary.
        selected: the names to serve (``EngineConfig.strategies``); one that is not registered
            or fails its check is a ValueError. None: every registered strategy that passes,
            the others left out with a logged warning.
    Returns:
        ({name: strategy} served, in registration order; {name: RefusedStrategy} left out).
    """
    registry = dict(_REGISTRY)
    if selected is not None:
        unknown = [name for name in selected if name not in registry]
        if unknown:
            raise ValueError(f"strategies: {unknown[0]!r} is not registered; registered: {sorted(registry)}")
        registry = {name: s for name, s in registry.items() if name in selected}
    served, refused = {}, {}
    for name, strategy in registry.items():
        try:
            check_strategy(strategy, num_rows, vocab_size)
        except ValueError as exc:
            if selected is not None:
                raise
            logger.warning("leaving out sampling strategy %r: %s", name, exc)
            refused[name] = RefusedStrategy(name, str(exc))
        else:
            served[name] = strategy
    return served, refused
