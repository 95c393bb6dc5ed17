"""jaxllm: a JAX/XLA-compiled inference engine for large language models."""

from jaxllm.engine import Engine
from jaxllm.executor import EngineDeadError
from jaxllm.outputs import CompletionOutput, RequestMetrics, RequestOutput
from jaxllm.sampling_params import RequestOutputKind, SamplingParams

__all__ = ["Engine", "EngineDeadError", "SamplingParams", "RequestOutputKind", "RequestOutput",
           "CompletionOutput", "RequestMetrics"]
__version__ = "0.1.0"
