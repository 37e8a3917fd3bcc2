"""Prometheus metrics of the service, in a registry of its own (one per app, no process-wide state).

- `syncbn_jobs{status}`: jobs in the database by status (read at scrape time), summed over every owner: no
  metric carries an owner label, so whoever may scrape learns totals only, never whose jobs they are;
- `syncbn_queue_length`, `syncbn_running_jobs`, `syncbn_max_concurrent_jobs`;
- `syncbn_database_up`: 1 when the job counts could be read, 0 while the database does not answer (the counts
  are then left out of the scrape rather than failing it);
- `syncbn_leader`: 1 on the replica that holds the leader lease (schedules jobs), 0 on followers;
- `syncbn_leader_takeovers_total`: times this replica became the leader (its start included);
- `syncbn_records_ingested_total`: run records stored by the job manager;
- `syncbn_scheduler_errors_total`: failed passes of the scheduler thread (each retried);
- `syncbn_tracking_failures_total{tracker}`: failures of the runs' MLflow/TensorBoard trackers (none fails a job);
- `syncbn_http_request_duration_seconds{method,route,status}`: request latencies by route template
  (event streams are left out: their duration is the job's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.status import JobStatus

if TYPE_CHECKING:
    from service.jobs.manager import JobManager

__all__ = ["RequestMetricsMiddleware", "ServiceMetrics"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _JobsCollector(Collector):
    """Reads job counts from the store and counters from the manager each time Prometheus scrapes."""

    def __init__(self) -> None:
        self.manager: JobManager | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        manager = self.manager
        if manager is None:
            return
        try:
            counts = manager.store.count_by_status()
        except Exception:
            counts = None
        yield GaugeMetricFamily(
            "syncbn_database_up", "Whether the database answered this scrape.", value=int(counts is not None)
        )
        if counts is not None:
            jobs = GaugeMetricFamily("syncbn_jobs", "Jobs in the database by status (all owners).", labels=["status"])
            for status in JobStatus:
                jobs.add_metric([status.value], counts[status])
            yield jobs
            yield GaugeMetricFamily("syncbn_queue_length", "Jobs waiting to start.", value=counts[JobStatus.QUEUED])
        yield GaugeMetricFamily(
            "syncbn_leader", "1 when this replica holds the leader lease.", value=int(manager.leading)
        )
        yield CounterMetricFamily(
            "syncbn_leader_takeovers", "Times this replica became the leader.", value=manager.takeovers
        )
        yield GaugeMetricFamily("syncbn_running_jobs", "Runs being followed.", value=manager.running_count())
        yield GaugeMetricFamily(
            "syncbn_max_concurrent_jobs", "Jobs allowed to run at once.", value=manager.concurrency_limit()
        )
        yield CounterMetricFamily("syncbn_records_ingested", "Run records stored.", value=manager.records_ingested)
        yield CounterMetricFamily(
            "syncbn_scheduler_errors", "Failed scheduler passes (each retried).", value=manager.loop_errors
        )
        tracking = CounterMetricFamily(
            "syncbn_tracking_failures", "Failures of MLflow/TensorBoard trackers (jobs go on).", labels=["tracker"]
        )
        for tracker, count in sorted(dict(manager.tracking_failures).items()):
            tracking.add_metric([tracker], count)
        yield tracking


class ServiceMetrics:
    """The app's registry: request latencies plus the job collector (bound to the manager at start-up)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.request_duration = Histogram(
            "syncbn_http_request_duration_seconds",
            "HTTP request latency by method, route template and status code.",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self._jobs = _JobsCollector()
        self.registry.register(self._jobs)

    def bind(self, manager: JobManager | None) -> None:
        """Read job metrics from `manager` (None: stop, e.g. after shutdown)."""
        self._jobs.manager = manager

    def render(self) -> bytes:
        """The metrics in Prometheus' text exposition format."""
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Times every HTTP request and records it under its route template (`/v1/jobs/{job_id}`)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500
        streaming = False

        async def send_and_watch(message: Message) -> None:
            nonlocal status_code, streaming
            if message["type"] == "http.response.start":
                status_code = message["status"]
                headers = dict(message.get("headers") or [])
                streaming = headers.get(b"content-type", b"").startswith(b"text/event-stream")
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            if not streaming:
                route = getattr(scope.get("route"), "path", None) or "unmatched"
                self.metrics.request_duration.labels(scope["method"], route, str(status_code)).observe(
                    time.perf_counter() - started
                )
