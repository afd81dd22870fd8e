"""Prometheus metrics of dbcancel (the `prometheus` extra): `install()` and scrape.

```python
from dbcancel.metrics import prometheus

prometheus.install()  # the default registry; or install(registry=my_registry)
```

Every metric is labelled by `table` (the job table's name), `dbcancel_jobs_ended_total`
also by `status`, and the heartbeat age by `database`; none by job. The names are
listed in the docs' Metrics section. Counters count from `install()` on, in this
process.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

try:
    from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector
except ImportError as exc:  # pragma: no cover - the extra is installed in tests
    raise ImportError(
        "dbcancel.metrics.prometheus needs prometheus_client: pip install 'dbcancel[prometheus]'"
    ) from exc

from dbcancel import _events

from . import LATENCY_BUCKETS
from ._latency import latencies

__all__ = ["install", "uninstall"]


class _Metrics(Collector):
    """The metrics of one `install()`, fed by dbcancel's events; collects the
    heartbeat age itself, at scrape time."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()
        r = registry
        self.cancels = Counter(
            "dbcancel_cancels_requested",
            "Jobs cancelled by cancel() or cancel_where() in this process.",
            ["table"],
            registry=r,
        )
        self.observe = Histogram(
            "dbcancel_cancel_observe_seconds",
            "From a job's cancel_requested_at to cancel_observed_at (its worker saw it).",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.stop = Histogram(
            "dbcancel_cancel_stop_seconds",
            "From a job's cancel_observed_at to finished_at (its worker stopped).",
            ["table"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.started = Counter(
            "dbcancel_jobs_started", "Jobs started by run() in this process.", ["table"], registry=r
        )
        self.ended = Counter(
            "dbcancel_jobs_ended",
            "Runs of this process that ended, by the status they left.",
            ["table", "status"],
            registry=r,
        )
        self.reaped = Counter(
            "dbcancel_jobs_reaped", "Jobs stopped by reap() in this process.", ["table"], registry=r
        )
        self.polls = Counter(
            "dbcancel_polls", "Status queries of running jobs (batched).", ["table"], registry=r
        )
        self.poll_errors = Counter(
            "dbcancel_poll_errors", "Status queries that failed.", ["table"], registry=r
        )
        self.notifications = Counter(
            "dbcancel_notifications",
            "PostgreSQL notifications applied by the runtime.",
            ["table"],
            registry=r,
        )
        self.outage = Counter(
            "dbcancel_outage_seconds",
            "Seconds of poll outages that ended (first failed poll to the next that worked).",
            ["table"],
            registry=r,
        )
        r.register(self)

    def __call__(self, event: str, table: str, fields: dict[str, Any]) -> None:
        if event == "poll":
            self.polls.labels(table).inc()
            if not fields["ok"]:
                self.poll_errors.labels(table).inc()
            elif fields["outage"] is not None:
                self.outage.labels(table).inc(fields["outage"])
        elif event == "beat":
            with self._lock:
                self._beats[table] = time.monotonic()
        elif event == "start":
            self.started.labels(table).inc()
        elif event == "end":
            self.ended.labels(table, fields["status"]).inc()
            observe, stop = latencies(fields)
            if observe is not None:
                self.observe.labels(table).observe(observe)
            if stop is not None:
                self.stop.labels(table).observe(stop)
        elif event == "cancel":
            self.cancels.labels(table).inc(fields["count"])
        elif event == "notification":
            self.notifications.labels(table).inc(fields["count"])
        elif event == "reap":
            self.reaped.labels(table).inc(fields["count"])

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily(
            "dbcancel_heartbeat_age_seconds",
            "Seconds since this process's last heartbeat of its worker row that worked.",
            labels=["database"],
        )
        now = time.monotonic()
        with self._lock:
            beats = dict(self._beats)
        for database, at in sorted(beats.items()):
            gauge.add_metric([database], now - at)
        yield gauge

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "dbcancel_heartbeat_age_seconds",
            "Seconds since this process's last heartbeat of its worker row that worked.",
            labels=["database"],
        )

    def close(self) -> None:
        _events.unsubscribe(self)
        for collector in (
            self,
            self.cancels,
            self.observe,
            self.stop,
            self.started,
            self.ended,
            self.reaped,
            self.polls,
            self.poll_errors,
            self.notifications,
            self.outage,
        ):
            self.registry.unregister(collector)


_installed: _Metrics | None = None
_lock = threading.Lock()


def install(registry: CollectorRegistry | None = None) -> None:
    """Register dbcancel's metrics with `registry` (default: prometheus_client's global
    `REGISTRY`) and start feeding them. Installing again moves them to the new registry
    (from zero); expose them as usual, e.g. `prometheus_client.start_http_server(port)`.
    """
    global _installed
    with _lock:
        if _installed is not None:
            _installed.close()
            _installed = None
        metrics = _Metrics(REGISTRY if registry is None else registry)
        _events.subscribe(metrics)
        _installed = metrics


def uninstall() -> None:
    """Stop feeding dbcancel's metrics and unregister them; harmless when not installed."""
    global _installed
    with _lock:
        if _installed is not None:
            _installed.close()
            _installed = None
