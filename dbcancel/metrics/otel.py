"""OpenTelemetry traces and metrics of dbcancel (the `otel` extra).

```python
from dbcancel.metrics import otel

otel.install()  # the global tracer and meter providers; or pass your own
```

Each run of a job that starts it is a span `dbcancel.run <table>` (kind INTERNAL),
from the start of the job to the write of its end, a child of the span current where
`run()` was entered. Its attributes: `dbcancel.table`, `dbcancel.job_id`,
`dbcancel.status` (the status the run left: `completed`, `failed`, `cancelled`, or
`pending` for a retry) and, for a cancelled job, `dbcancel.cancel_reason`; a failed
job's span records its exception and has the status ERROR. The metrics are those of
[`dbcancel.metrics.prometheus`][dbcancel.metrics.prometheus], named the OpenTelemetry
way (the docs' Metrics section lists both).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

try:
    from opentelemetry import metrics, trace
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation
    from opentelemetry.trace import Span, SpanKind, StatusCode, TracerProvider
except ImportError as exc:  # pragma: no cover - the extra is installed in tests
    raise ImportError(
        "dbcancel.metrics.otel needs opentelemetry-api: pip install 'dbcancel[otel]'"
    ) from exc

from dbcancel import _events

from . import LATENCY_BUCKETS
from ._latency import latencies

__all__ = ["install", "uninstall"]

_SCOPE = "dbcancel"


def _id_value(job_id: Any) -> Any:
    """A job id as an attribute value: ints as they are, anything else as text."""
    return job_id if isinstance(job_id, int) and not isinstance(job_id, bool) else str(job_id)


class _Telemetry:
    """The instruments and open spans of one `install()`, fed by dbcancel's events."""

    def __init__(
        self, tracer_provider: TracerProvider | None, meter_provider: MeterProvider | None
    ) -> None:
        self.tracer = trace.get_tracer(_SCOPE, tracer_provider=tracer_provider)
        meter = metrics.get_meter(_SCOPE, meter_provider=meter_provider)
        self._spans: dict[int, Span] = {}
        self._beats: dict[str, float] = {}
        self._lock = threading.Lock()
        self.cancels = meter.create_counter(
            "dbcancel.cancels.requested", "{job}", "Jobs cancelled by cancel() or cancel_where()."
        )
        self.observe = _histogram(
            meter,
            "dbcancel.cancel.observe.duration",
            "From a job's cancel_requested_at to cancel_observed_at.",
        )
        self.stop = _histogram(
            meter,
            "dbcancel.cancel.stop.duration",
            "From a job's cancel_observed_at to finished_at.",
        )
        self.started = meter.create_counter("dbcancel.jobs.started", "{job}", "Jobs started.")
        self.ended = meter.create_counter(
            "dbcancel.jobs.ended", "{job}", "Runs that ended, by the status they left."
        )
        self.reaped = meter.create_counter(
            "dbcancel.jobs.reaped", "{job}", "Jobs stopped by reap()."
        )
        self.polls = meter.create_counter("dbcancel.polls", "{query}", "Status queries.")
        self.poll_errors = meter.create_counter(
            "dbcancel.poll.errors", "{query}", "Status queries that failed."
        )
        self.notifications = meter.create_counter(
            "dbcancel.notifications", "{notification}", "Notifications applied."
        )
        self.outage = meter.create_counter(
            "dbcancel.outage.duration", "s", "Seconds of poll outages that ended."
        )
        meter.create_observable_gauge(
            "dbcancel.heartbeat.age",
            [self._heartbeat_ages],
            "s",
            "Seconds since this process's last heartbeat that worked.",
        )

    def _heartbeat_ages(self, options: CallbackOptions) -> Iterable[Observation]:
        now = time.monotonic()
        with self._lock:
            beats = dict(self._beats)
        return [Observation(now - at, {"database": db}) for db, at in beats.items()]

    def __call__(self, event: str, table: str, fields: dict[str, Any]) -> None:
        attrs = {"table": table}
        if event == "start":
            self.started.add(1, attrs)
            span = self.tracer.start_span(
                f"dbcancel.run {table}",
                kind=SpanKind.INTERNAL,
                attributes={
                    "dbcancel.table": table,
                    "dbcancel.job_id": _id_value(fields["job_id"]),
                },
            )
            with self._lock:
                self._spans[id(fields["checkpoint"])] = span
        elif event == "end":
            status = fields["status"]
            self.ended.add(1, {"table": table, "status": status})
            observe, stop = latencies(fields)
            if observe is not None:
                self.observe.record(observe, attrs)
            if stop is not None:
                self.stop.record(stop, attrs)
            with self._lock:
                ended = self._spans.pop(id(fields["checkpoint"]), None)
            if ended is not None:
                ended.set_attribute("dbcancel.status", status)
                if fields["reason"] is not None:
                    ended.set_attribute("dbcancel.cancel_reason", fields["reason"])
                exc = fields["exception"]
                if exc is not None:
                    ended.record_exception(exc)
                    ended.set_status(StatusCode.ERROR, f"{type(exc).__name__}: {exc}")
                ended.end()
        elif event == "poll":
            self.polls.add(1, attrs)
            if not fields["ok"]:
                self.poll_errors.add(1, attrs)
            elif fields["outage"] is not None:
                self.outage.add(fields["outage"], attrs)
        elif event == "beat":
            with self._lock:
                self._beats[table] = time.monotonic()
        elif event == "cancel":
            self.cancels.add(fields["count"], attrs)
        elif event == "notification":
            self.notifications.add(fields["count"], attrs)
        elif event == "reap":
            self.reaped.add(fields["count"], attrs)


def _histogram(meter: Any, name: str, description: str) -> Any:
    """A histogram in seconds, with dbcancel's buckets where the API takes advice."""
    buckets = list(LATENCY_BUCKETS)
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=buckets
        )
    except TypeError:  # an API without bucket advice
        return meter.create_histogram(name, unit="s", description=description)


_installed: _Telemetry | None = None
_lock = threading.Lock()


def install(
    *,
    tracer_provider: TracerProvider | None = None,
    meter_provider: MeterProvider | None = None,
) -> None:
    """Record dbcancel's spans and metrics through `tracer_provider` and
    `meter_provider` (default: OpenTelemetry's global providers). Installing again
    replaces the earlier installation: runs under way then get no span."""
    global _installed
    with _lock:
        if _installed is not None:
            _events.unsubscribe(_installed)
        telemetry = _Telemetry(tracer_provider, meter_provider)
        _events.subscribe(telemetry)
        _installed = telemetry


def uninstall() -> None:
    """Stop recording; harmless when not installed. Spans of runs under way are not
    ended."""
    global _installed
    with _lock:
        if _installed is not None:
            _events.unsubscribe(_installed)
            _installed = None
