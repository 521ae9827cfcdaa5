"""A gpu worker's Prometheus /metrics: the serving engine's counters, read at scrape time.

The engine lives in the worker process (the API never loads it), so the worker serves its own
/metrics on `worker_metrics_port` (0 = off), started by `longdoc worker` next to the engine preload.
Until the engine has loaded, only `longdoc_engine_loaded 0` is exported; an engine without a serving
engine (extractive) exports `longdoc_engine_loaded 1` and nothing else. Values come from
ServingEngine.stats() (its own counters plus the scheduler's); reading them from the scrape thread
is a read of a few ints, never a wait on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from config.settings import Settings

log = logging.getLogger(__name__)

# stats() key -> (series name, help); counters only ever grow over the engine's life
COUNTERS = {
    "requests": ("longdoc_engine_requests", "Requests submitted to the engine"),
    "failed": ("longdoc_engine_failed_requests", "Requests that ended with an error (canceled included)"),
    "tokens_in": ("longdoc_engine_prompt_tokens", "Prompt tokens submitted"),
    "tokens_out": ("longdoc_engine_generated_tokens", "Tokens generated and accepted"),
    "prefix_hit_tokens": ("longdoc_engine_prefix_hit_tokens", "Prompt tokens served from the prefix cache"),
    "tokens_scheduled": ("longdoc_engine_scheduled_tokens", "Tokens computed (prefill chunks + decodes)"),
    "preemptions": ("longdoc_engine_preemptions", "Sequences preempted for want of KV blocks"),
    "steps": ("longdoc_engine_steps", "Engine steps launched"),
}
GAUGES = {
    "running": ("longdoc_engine_running_sequences", "Sequences holding KV blocks"),
    "waiting": ("longdoc_engine_waiting_sequences", "Sequences waiting for admission"),
    "blocks_used": ("longdoc_engine_kv_blocks_used", "KV blocks held by sequences"),
    "blocks_free": ("longdoc_engine_kv_blocks_free", "KV blocks allocatable (free + evictable cached)"),
    "blocks_cached": ("longdoc_engine_kv_blocks_cached", "Unheld KV blocks kept findable by content"),
}


class EngineCollector(Collector):
    def __init__(self) -> None:
        self.engine: Any = None  # the task engine (pipeline.tasks), once loaded

    def attach(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Iterator:
        engine = self.engine
        yield GaugeMetricFamily("longdoc_engine_loaded", "1 once this worker's engine has loaded",
                                value=int(engine is not None))
        serving = getattr(engine, "serving", None)
        if serving is None:
            return
        stats = serving.stats()
        for key, (name, doc) in COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=stats.get(key, 0))
        yield CounterMetricFamily("longdoc_engine_busy_seconds", "Wall time the engine thread spent in steps",
                                  value=stats.get("busy_ms", 0) / 1000.0)
        yield CounterMetricFamily("longdoc_engine_launch_seconds", "Of which queuing steps on the device",
                                  value=stats.get("launch_ms", 0) / 1000.0)
        yield CounterMetricFamily("longdoc_engine_wait_seconds", "Of which waiting for steps' results",
                                  value=stats.get("wait_ms", 0) / 1000.0)
        for key, (name, doc) in GAUGES.items():
            yield GaugeMetricFamily(name, doc, value=stats.get(key, 0))


def start_engine_metrics(settings: Settings) -> EngineCollector | None:
    """Serve /metrics on settings.worker_metrics_port from a daemon thread; None when the port is 0."""
    if not settings.worker_metrics_port:
        return None
    collector = EngineCollector()
    registry = CollectorRegistry()
    registry.register(collector)
    start_http_server(settings.worker_metrics_port, addr=settings.worker_metrics_host, registry=registry)
    log.info("engine metrics on http://%s:%d/metrics", settings.worker_metrics_host, settings.worker_metrics_port)
    return collector
