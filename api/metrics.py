"""Prometheus metrics: requests (by route template, method, status), latency, jobs by status, queue
depth and job durations. DB-derived series are computed at scrape time, so they are right whichever
process (API, worker) changed the rows. Each app owns its registry (several apps per test process)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config.settings import Settings
from storage.db import get_sessionmaker
from storage.models import Job, JobStatus
from workers.transport import get_dispatcher

log = logging.getLogger(__name__)


class StateCollector(Collector):
    """Jobs by status, queue depth and succeeded-job durations, read from the DB and broker per scrape."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator:
        jobs = GaugeMetricFamily("longdoc_jobs", "Jobs by status", labels=["status"])
        durations = SummaryMetricFamily("longdoc_job_duration_seconds",
                                        "Run time (started to finished) of succeeded jobs", labels=["task"])
        try:
            with get_sessionmaker(self.settings.effective_database_url)() as session:
                counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
                seconds = _duration_seconds(session.get_bind().dialect.name)
                rows = session.execute(
                    select(Job.task, func.count(), func.sum(seconds))
                    .where(Job.status == JobStatus.succeeded, Job.started_at.is_not(None),
                           Job.finished_at.is_not(None))
                    .group_by(Job.task)).all()
        except Exception as exc:  # a scrape must not fail because the DB is down; readyz reports that
            log.warning("metrics: database query failed: %s", exc.__class__.__name__)
            counts, rows = {}, []
        for status in JobStatus:
            jobs.add_metric([status.value], counts.get(status, 0))
        for task, count, seconds in rows:
            durations.add_metric([task.value], count_value=count, sum_value=float(seconds or 0.0))
        yield jobs
        yield durations
        depth = GaugeMetricFamily("longdoc_queue_depth", "Messages waiting per queue (-1: broker down)",
                                  labels=["queue"])
        for queue, n in get_dispatcher(self.settings).queue_depths().items():
            depth.add_metric([queue], n)
        yield depth


def _duration_seconds(dialect: str) -> ColumnElement[float]:
    if dialect == "postgresql":
        return func.extract("epoch", Job.finished_at - Job.started_at)
    return (func.julianday(Job.finished_at) - func.julianday(Job.started_at)) * 86400.0


class Metrics:
    def __init__(self, settings: Settings) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("longdoc_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("longdoc_http_request_duration_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10))
        self.registry.register(StateCollector(settings))


class MetricsMiddleware:
    """Counts every request under its route template (/v1/jobs/{job_id}), never the raw path."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(scope["method"], route, str(status)).inc()
            self.metrics.latency.labels(scope["method"], route).observe(time.perf_counter() - start)
