"""jaxllm: a JAX/XLA-compiled inference engine for large language models."""

from jaxllm import strategy_examples  # noqa: F401  (registers typical, epsilon, eta)
from jaxllm.engine import Engine
from jaxllm.executor import EngineDeadError
from jaxllm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams
from jaxllm.strategies import register_strategy, registered_strategies

__all__ = ["Engine", "EngineDeadError", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "RequestMetrics", "Logprob", "register_strategy",
           "registered_strategies"]
__version__ = "0.1.0"
