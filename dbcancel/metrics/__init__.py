"""Metrics and traces of dbcancel, through the ecosystem's own libraries.

[`dbcancel.metrics.prometheus`][dbcancel.metrics.prometheus] (the `prometheus` extra)
registers counters and histograms with a `prometheus_client` registry;
[`dbcancel.metrics.otel`][dbcancel.metrics.otel] (the `otel` extra) records a span per
job run and the same metrics through the OpenTelemetry API. Neither is imported by
`import dbcancel`; until one is installed, the places that report events cost one
global read each, and the checkpoint (`cp()`) is never one of them.
"""

from __future__ import annotations

__all__ = ["LATENCY_BUCKETS"]

LATENCY_BUCKETS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
"""Bucket bounds (seconds) of the cancel latency histograms: a pushed cancel takes
milliseconds, a polled one up to the interval, a worker's stop as long as its item."""
