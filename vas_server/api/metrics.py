"""Prometheus metrics for GET /metrics.

Three sources, rendered together:
  * the server's own counters (this module's `Metrics`, one registry per app so that several
    apps in one process, as in tests, never collide);
  * the VAS processor's counters, read from the engine's worker at scrape time with
    `collective_rpc("vas_stats")` (absent when the engine runs without value models);
  * vLLM's own metrics (`vllm:*`, e.g. `vllm:num_requests_running`), which vLLM registers in
    prometheus_client's default registry.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Mapping

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

logger = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# processor stats key -> (metric name, kind, help)
WORKER_METRICS = {
    "vas_requests_total": ("vas_engine_vas_requests", "counter", "VAS requests the value runtime has admitted"),
    "active_requests": ("vas_engine_active_vas_requests", "gauge", "VAS requests in the engine's batch now"),
    "steps": ("vas_value_runtime_steps", "counter", "Decoding steps on which the value runtime ran"),
    "runtime_seconds_total": ("vas_value_runtime_seconds", "counter", "Time spent in the value runtime"),
    "cache_slots_used": ("vas_value_cache_slots_used", "gauge", "Value-cache slots in use"),
    "cache_slots_total": ("vas_value_cache_slots", "gauge", "Value-cache slots allocated"),
    "dropped_requests": ("vas_engine_dropped_requests", "counter", "VAS requests that ran unsteered: cache full"),
    "resumed_requests": ("vas_engine_resumed_requests", "counter", "VAS requests resumed after preemption"),
}


def route_label(request) -> str:
    """The matched route's path (bounded label values), or "unmatched" for unknown URLs."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unmatched"


class Metrics:
    def __init__(self, unfinished_engine_requests: Callable[[], int]):
        disable_created_metrics()  # the `*_created` timestamp series double the output for nothing
        self.registry = CollectorRegistry()
        r = self.registry
        self.responses = Counter("vas_server_responses", "HTTP responses by path and status code",
                                 ["path", "status"], registry=r)
        self.requests = Counter("vas_server_generation_requests", "Generation requests accepted, by endpoint",
                                ["endpoint"], registry=r)
        self.vas_requests = Counter("vas_server_vas_requests", "Generation requests with non-zero vas_weights",
                                    ["endpoint"], registry=r)
        self.prompt_tokens = Counter("vas_server_prompt_tokens", "Prompt tokens of accepted requests", registry=r)
        self.completion_tokens = Counter("vas_server_completion_tokens", "Tokens generated", registry=r)
        self.in_flight = Gauge("vas_server_requests_in_flight", "Generation requests being answered", registry=r)
        engine_requests = Gauge("vas_server_engine_requests_unfinished",
                                "Engine requests not yet finished, as the API process sees them", registry=r)
        engine_requests.set_function(unfinished_engine_requests)

    def render(self, worker_stats: Mapping[str, float] | None) -> bytes:
        worker = CollectorRegistry()
        if worker_stats is not None:
            worker.register(_WorkerStats(worker_stats))
        return generate_latest(self.registry) + generate_latest(worker) + generate_latest(REGISTRY)


class _WorkerStats:
    """A one-scrape collector over a snapshot of the processor's stats."""

    def __init__(self, stats: Mapping[str, float]):
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        for key, (name, kind, help_text) in WORKER_METRICS.items():
            if key not in self.stats:
                continue
            family = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            yield family(name, help_text, value=float(self.stats[key]))
        steps, seconds = self.stats.get("steps"), self.stats.get("runtime_seconds_total")
        if steps is not None and seconds is not None:
            yield GaugeMetricFamily("vas_value_runtime_seconds_per_step",
                                    "Mean value-runtime time per decoding step (0 before the first)",
                                    value=seconds / steps if steps else 0.0)
