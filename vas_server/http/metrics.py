"""The VAS counters for GET /metrics, beside vLLM's own `vllm:*` metrics.

They live in the engine's worker (the processor's `stats()`); the API process reads them at
scrape time with `collective_rpc("vas_stats")` (VASWorkerExtension) and renders them as
Prometheus text. A scrape never fails because of them: an engine that does not answer in
WORKER_STATS_TIMEOUT_S leaves them out.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Iterable, Mapping

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vas_server.http.asgi import Receive, Scope, Send, capture, send_raw

logger = logging.getLogger(__name__)

WORKER_STATS_TIMEOUT_S = 5.0

# processor stats key -> (metric name, kind, help)
WORKER_METRICS = {
    "vas_requests_total": ("vas_engine_vas_requests", "counter", "VAS requests the processor has admitted"),
    "active_requests": ("vas_engine_active_vas_requests", "gauge", "VAS requests in the engine's batch now"),
    "steps": ("vas_value_runtime_steps", "counter", "Decoding steps with steered rows"),
    "runtime_seconds_total": ("vas_value_runtime_seconds", "counter",
                              "Time spent steering: candidates, value heads, logits update"),
    "cache_slots_used": ("vas_value_cache_slots_used", "gauge", "Value-cache slots in use"),
    "cache_slots_total": ("vas_value_cache_slots", "gauge", "Value-cache slots allocated"),
    "dropped_requests": ("vas_engine_dropped_requests", "counter", "VAS requests that ran unsteered: cache full"),
    "resumed_requests": ("vas_engine_resumed_requests", "counter", "VAS requests resumed after preemption"),
    "remote_tokens": ("vas_remote_tokens", "counter", "Remote mode: tokens generated"),
    "remote_clamped_requests": ("vas_remote_clamped_requests", "counter",
                                "Remote mode: requests whose VAS top-K was above the upstream's log-prob cap, "
                                "served at the cap"),
    "remote_token_mismatches": ("vas_remote_token_mismatches", "counter",
                                "Remote mode: tokens the upstream named by text that MODEL's tokenizer maps to no "
                                "single id, and contexts sent as text that encode to other ids"),
    "remote_upstream_calls": ("vas_remote_upstream_calls", "counter", "Remote mode: upstream calls (tries included)"),
    "remote_calls_per_token": ("vas_remote_upstream_calls_per_token", "gauge",
                               "Remote mode: upstream calls per generated token (0 before the first)"),
    "remote_drafted_tokens": ("vas_remote_drafted_tokens", "counter", "Remote mode: tokens the upstream drafted"),
    "remote_accepted_tokens": ("vas_remote_accepted_tokens", "counter", "Remote mode: drafted tokens VAS accepted"),
    "remote_wasted_tokens": ("vas_remote_wasted_draft_tokens", "counter",
                             "Remote mode: drafted tokens never emitted (rejected, or after a rejection)"),
    "remote_acceptance_rate": ("vas_remote_draft_acceptance_rate", "gauge",
                               "Remote mode: accepted / drafted tokens (0 before the first draft)"),
    "heap_trims": ("vas_worker_heap_trims", "counter", "Times the worker gave freed heap memory back (malloc_trim)"),
    "heap_trim_seconds_total": ("vas_worker_heap_trim_seconds", "counter", "Time spent in those heap trims"),
}


async def render_vas_metrics(engine_client, preset_requests: Mapping[str, int]) -> bytes:
    """The worker's VAS counters and the API process's requests per preset, as Prometheus text."""
    presets = CounterMetricFamily("vas_preset_requests", "Requests that chose a preset as their model",
                                  labels=["preset"])
    for name, count in sorted(preset_requests.items()):
        presets.add_metric([name], count)
    text = generate_latest(_Families([presets]))
    try:
        # One entry per worker. Every tensor-parallel rank runs the same processor, and only the
        # last pipeline stage's count (the others answer {}): the first non-empty entry speaks.
        results = await asyncio.wait_for(engine_client.collective_rpc("vas_stats"), WORKER_STATS_TIMEOUT_S)
    except Exception as e:  # noqa: BLE001 - a scrape must not fail because the engine is busy
        logger.warning("could not read VAS worker stats: %r", e)
        return text
    stats = next((r for r in results or () if r), None)
    if stats is None:
        return text
    registry = CollectorRegistry()
    registry.register(_WorkerStats(stats))
    return text + generate_latest(registry)


class _Families:
    """A one-scrape collector over ready metric families."""

    def __init__(self, families: list[Metric]):
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return iter(self.families)


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


async def serve_metrics(app, server, scope: Scope, receive: Receive, send: Send) -> None:
    """GET /metrics: vLLM's own metrics, then the VAS ones (`server` is the middleware's ServerView)."""
    # vLLM's metrics app gzips when asked to; we append plain text, so ask for plain text.
    headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"accept-encoding"]
    status, out_headers, body = await capture(app, dict(scope, headers=headers), receive)
    if status == 200 and server.config.value_models:  # else no processor, no worker extension
        body += await render_vas_metrics(server.state.engine_client, server.preset_requests)
    await send_raw(send, status, out_headers, body)
