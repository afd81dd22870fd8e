"""Metrics of ``DjangoJobs``: a real cancel of a real running job fills the cancel
latency histograms from the row's timestamps, read through the Django backend."""

from __future__ import annotations

import threading

import pytest

pytest.importorskip("prometheus_client")

from prometheus_client import CollectorRegistry

from dbcancel import Status
from dbcancel.metrics import prometheus

from .conftest import JOIN_TIMEOUT, Threads


def test_a_cancel_fills_the_latency_histograms(alias, jobs, add):
    registry = CollectorRegistry()
    prometheus.install(registry)
    try:
        job = add()
        entered = threading.Event()

        def work():
            with jobs.run(job) as cp:
                entered.set()
                while True:
                    cp()
                    entered.wait(0.001)

        threads = Threads()
        threads.start(work, "worker")
        assert entered.wait(JOIN_TIMEOUT)
        assert jobs.cancel(job, reason="enough")
        assert jobs.wait(job, timeout=JOIN_TIMEOUT) is Status.CANCELLED
        threads.join()
        assert threads.errors == []
        table = {"table": jobs.model._meta.db_table}
        for name in ("dbcancel_cancel_observe_seconds", "dbcancel_cancel_stop_seconds"):
            assert registry.get_sample_value(f"{name}_count", table) == 1
            assert 0 <= registry.get_sample_value(f"{name}_sum", table) < JOIN_TIMEOUT
        ended = {**table, "status": "cancelled"}
        assert registry.get_sample_value("dbcancel_jobs_ended_total", ended) == 1
    finally:
        prometheus.uninstall()
