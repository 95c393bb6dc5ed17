"""``GET /metrics``: Prometheus text, named as vLLM names its metrics (``jaxllm:`` for
``vllm:``) so dashboards carry over.

Engine-wide numbers (running and waiting requests, KV usage, prefix-cache tokens, generated
tokens, compilations) are read from ``Engine.stats()`` at each scrape; per-request latencies
(TTFT, TPOT, end to end) and finish reasons are observed from each finished request's
``RequestOutput.metrics``. Every server has its own registry, so apps built in one process
(tests) do not share counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from jaxllm.outputs import RequestOutput

_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                50.0, 60.0, 120.0, 240.0)

# stats() key -> (metric name, help, gauge or counter)
_ENGINE_METRICS = {
    "num_running": ("jaxllm:num_requests_running", "Requests in the engine's running batch.", "gauge"),
    "num_waiting": ("jaxllm:num_requests_waiting", "Requests waiting in the engine's scheduler.", "gauge"),
    "kv_usage": ("jaxllm:kv_cache_usage_perc", "Fraction of usable KV blocks in use (0-1).", "gauge"),
    "kv_blocks_used": ("jaxllm:kv_cache_blocks_used", "KV blocks held by requests.", "gauge"),
    "kv_blocks_free": ("jaxllm:kv_cache_blocks_free", "KV blocks free (cached ones included).", "gauge"),
    "engine_dead": ("jaxllm:engine_dead", "1 once the engine's executor loop has died.", "gauge"),
    "prefix_cache_queried_tokens": ("jaxllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", "counter"),
    "prefix_cache_hit_tokens": ("jaxllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.", "counter"),
    "num_generated_tokens": ("jaxllm:generation_tokens", "Tokens generated.", "counter"),
    "num_compilations": ("jaxllm:compilations", "Compilations of the engine's step.", "counter"),
    "num_preemptions": ("jaxllm:num_preemptions", "Sequences preempted for lack of KV blocks.", "counter"),
    "num_steps": ("jaxllm:engine_steps", "Engine steps run.", "counter"),
}


class _EngineCollector:
    """Reads ``Engine.stats()`` (and the server's own waiting count) at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any]], server_waiting: Callable[[], int]) -> None:
        self._stats = stats
        self._server_waiting = server_waiting

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        for key, (name, doc, kind) in _ENGINE_METRICS.items():
            family = GaugeMetricFamily if kind == "gauge" else CounterMetricFamily
            yield family(name, doc, value=float(stats[key]))
        yield GaugeMetricFamily("jaxllm:server_requests_waiting",
                                "Requests the server admitted beyond the engine's max_num_seqs.",
                                value=float(self._server_waiting()))


class ServerMetrics:
    """The server's Prometheus registry: engine gauges plus per-request histograms."""

    def __init__(self, stats: Callable[[], dict[str, Any]], server_waiting: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(stats, server_waiting))
        r = self.registry
        self.ttft = Histogram("jaxllm:time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("jaxllm:time_per_output_token_seconds",
                              "Mean time per output token after the first, per request.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("jaxllm:e2e_request_latency_seconds", "Arrival to finish.",
                             buckets=_E2E_BUCKETS, registry=r)
        self.prompt_tokens = Counter("jaxllm:prompt_tokens", "Prompt tokens of finished requests.",
                                     registry=r)
        self.finished = Counter("jaxllm:request_success", "Finished requests by finish reason.",
                                ["finished_reason"], registry=r)

    def observe(self, output: RequestOutput) -> None:
        """Records a finished request."""
        m = output.metrics
        for histogram, value in ((self.ttft, m.time_to_first_token),
                                 (self.tpot, m.time_per_output_token)):
            if value is not None:
                histogram.observe(value)
        if m.finished_time is not None:
            self.e2e.observe(m.finished_time - m.arrival_time)
        self.prompt_tokens.inc(len(output.prompt_token_ids))
        reason = output.outputs[0].finish_reason if output.outputs else "abort"
        self.finished.labels(finished_reason=reason or "abort").inc()

    def render(self) -> tuple[bytes, str]:
        """(the exposition text, its content type)."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
