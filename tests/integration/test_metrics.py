"""Metrics and traces: Prometheus scraped over HTTP, OpenTelemetry in memory, both fed by
real jobs on real databases; and neither imported until asked for."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
import urllib.request

import pytest

pytest.importorskip("prometheus_client")
pytest.importorskip("opentelemetry.sdk")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine

from dbcancel import Jobs, Status
from dbcancel.metrics import otel, prometheus
from tests.models import Analysis, Base


def _run_until_cancelled(jobs, job_id, started):
    with jobs.run(job_id) as cp:
        started.set()
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            cp()
            time.sleep(0.001)


def _cancel_a_running_job(db, jobs, reason="user asked", before=None):
    """Start a real job in a thread, cancel it from this one (once `before()` is true),
    and wait until it stopped."""
    job_id = db.add()
    started = threading.Event()
    worker = threading.Thread(target=_run_until_cancelled, args=(jobs, job_id, started))
    worker.start()
    assert started.wait(30)
    deadline = time.monotonic() + 30
    while before is not None and not before():
        assert time.monotonic() < deadline, "never came"
        time.sleep(0.01)
    assert jobs.cancel(job_id, reason=reason)
    assert jobs.wait(job_id, timeout=30) is Status.CANCELLED
    worker.join(30)
    assert not worker.is_alive()
    return job_id


def _complete_a_job(jobs, job_id):
    with jobs.run(job_id) as cp:
        cp()


def _fail_a_job(jobs, job_id):
    def run():
        with jobs.run(job_id) as cp:
            cp()
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        run()


@pytest.fixture
def scraped():
    """A registry with dbcancel's metrics, served on a free loopback port; a function
    that GETs it and returns {(name, labels): value}."""
    registry = CollectorRegistry()
    prometheus.install(registry)
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    port = server.server_address[1]

    def scrape():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    try:
        yield scrape
    finally:
        prometheus.uninstall()
        server.shutdown()
        server.server_close()
        thread.join(10)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_a_real_cancel_fills_the_cancel_latency_histograms(db, scraped):
    jobs = db.jobs()
    table = (("table", "analysis"),)
    # Cancelled once the runtime thread has polled the running job at least once.
    _cancel_a_running_job(db, jobs, before=lambda: ("dbcancel_polls_total", table) in scraped())
    _complete_a_job(jobs, db.add())
    _fail_a_job(jobs, db.add())
    samples = scraped()
    assert samples[("dbcancel_cancels_requested_total", table)] == 1
    assert samples[("dbcancel_jobs_started_total", table)] == 3
    for status in ("cancelled", "completed", "failed"):
        key = ("dbcancel_jobs_ended_total", (("status", status), ("table", "analysis")))
        assert samples[key] == 1
    for name in ("dbcancel_cancel_observe_seconds", "dbcancel_cancel_stop_seconds"):
        assert samples[(f"{name}_count", table)] == 1
        assert 0 <= samples[(f"{name}_sum", table)] < 30
        inf = (("le", "+Inf"), ("table", "analysis"))
        assert samples[(f"{name}_bucket", inf)] == 1
    # The runtime thread polled the running job, and beat the worker row.
    assert samples[("dbcancel_polls_total", table)] >= 1
    ages = [v for (name, _), v in samples.items() if name == "dbcancel_heartbeat_age_seconds"]
    assert ages
    assert all(0 <= age < 60 for age in ages)


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_reaps_and_threadless_polls_are_counted(db, scraped):
    jobs = db.jobs(watch=False)
    job_id = db.add()
    with jobs.run(job_id) as cp:
        time.sleep(0.06)  # past the interval: the next cp() polls
        cp()
    dead = db.add(status="in_progress", worker_id="gone:1")
    assert jobs.reap(stale_after=1) == 1
    samples = scraped()
    table = (("table", "analysis"),)
    assert samples[("dbcancel_polls_total", table)] >= 1
    assert samples[("dbcancel_jobs_reaped_total", table)] == 1
    assert db.row(dead).status == Status.FAILED.value


@pytest.fixture
def telemetry():
    spans = InMemorySpanExporter()
    tracer_provider = TracerProvider()
    tracer_provider.add_span_processor(SimpleSpanProcessor(spans))
    reader = InMemoryMetricReader()
    meter_provider = MeterProvider(metric_readers=[reader])
    otel.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
    try:
        yield spans, reader, tracer_provider
    finally:
        otel.uninstall()
        meter_provider.shutdown()
        tracer_provider.shutdown()


def _points(reader):
    """{metric name: [data points]} of everything recorded so far."""
    found = {}
    for resource in reader.get_metrics_data().resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                found.setdefault(metric.name, []).extend(metric.data.data_points)
    return found


@pytest.mark.parametrize("database", ["sqlite", "postgresql"], indirect=True)
def test_otel_sees_a_span_per_run_with_its_end_and_the_metrics(db, telemetry):
    spans, reader, _ = telemetry
    jobs = db.jobs(heartbeat=0.2)  # beats while it runs, whatever beat came before
    cancelled = _cancel_a_running_job(db, jobs, reason="user asked")
    completed, failed = db.add(), db.add()
    _complete_a_job(jobs, completed)
    _fail_a_job(jobs, failed)

    by_id = {s.attributes["dbcancel.job_id"]: s for s in spans.get_finished_spans()}
    assert set(by_id) == {cancelled, completed, failed}
    for span in by_id.values():
        assert span.name == "dbcancel.run analysis"
        assert span.attributes["dbcancel.table"] == "analysis"
        assert span.end_time >= span.start_time
    assert by_id[cancelled].attributes["dbcancel.status"] == "cancelled"
    assert by_id[cancelled].attributes["dbcancel.cancel_reason"] == "user asked"
    assert by_id[completed].attributes["dbcancel.status"] == "completed"
    assert "dbcancel.cancel_reason" not in by_id[completed].attributes
    assert by_id[failed].attributes["dbcancel.status"] == "failed"
    assert by_id[failed].status.status_code is StatusCode.ERROR
    assert by_id[failed].events[0].name == "exception"

    points = _points(reader)
    (observe,) = points["dbcancel.cancel.observe.duration"]
    assert observe.count == 1
    assert 0 <= observe.sum < 30
    (stop,) = points["dbcancel.cancel.stop.duration"]
    assert stop.count == 1
    ended = {p.attributes["status"]: p.value for p in points["dbcancel.jobs.ended"]}
    assert ended == {"cancelled": 1, "completed": 1, "failed": 1}
    assert sum(p.value for p in points["dbcancel.cancels.requested"]) == 1
    assert sum(p.value for p in points["dbcancel.jobs.started"]) == 3
    assert points["dbcancel.heartbeat.age"]


def test_a_span_is_a_child_of_the_span_current_at_run(tmp_path, telemetry):
    spans, _, tracer_provider = telemetry
    engine = create_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(Analysis.__table__.insert().values(id=1))
    jobs = Jobs(engine, Analysis, interval=0.05)
    tracer = tracer_provider.get_tracer("test")
    with tracer.start_as_current_span("request") as parent, jobs.run(1) as cp:
        cp()
    engine.dispose()
    (job,) = [s for s in spans.get_finished_spans() if s.name.startswith("dbcancel.run")]
    assert job.parent is not None
    assert job.parent.span_id == parent.get_span_context().span_id


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_running_a_job_imports_neither_prometheus_nor_opentelemetry(tmp_path):
    proc = _python(
        f"""
        import sys
        from sqlalchemy import create_engine
        import dbcancel
        from tests.models import Analysis, Base
        engine = create_engine("sqlite:///{tmp_path / "jobs.db"}")
        Base.metadata.create_all(engine)
        with engine.begin() as conn:
            conn.execute(Analysis.__table__.insert().values(id=1))
        jobs = dbcancel.Jobs(engine, Analysis, interval=0.05)
        with jobs.run(1) as cp:
            cp()
        assert jobs.status(1) is dbcancel.Status.COMPLETED
        jobs.cancel(1)
        loaded = sorted(
            m for m in sys.modules if m.split(".")[0] in ("prometheus_client", "opentelemetry")
        )
        print("loaded:", loaded)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "loaded: []"


@pytest.mark.parametrize(
    ("module", "library", "extra"),
    [("prometheus", "prometheus_client", "prometheus"), ("otel", "opentelemetry", "otel")],
)
def test_a_missing_extra_says_what_to_install(module, library, extra):
    proc = _python(
        f"""
        import sys
        sys.modules[{library!r}] = None
        try:
            import dbcancel.metrics.{module}
        except ImportError as exc:
            print(exc)
        """
    )
    assert proc.returncode == 0, proc.stderr
    assert f"pip install 'dbcancel[{extra}]'" in proc.stdout


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_asyncjobs_runs_get_spans_and_latencies_too(db, telemetry):
    import asyncio

    from dbcancel import AsyncJobs
    from tests.aio import async_engine

    spans, reader, _ = telemetry
    done, cancelled = db.add(), db.add()

    async def main():
        engine = async_engine(db.url, "sqlite")
        jobs = AsyncJobs(engine, Analysis, interval=0.05)
        try:
            async with jobs.run(done) as cp:
                cp()
            async with jobs.run(cancelled, cancel_task=True) as cp:
                await jobs.cancel(cancelled, reason="async stop")
                await asyncio.sleep(30)  # cancelled by the cancel, at once
        finally:
            await engine.dispose()

    asyncio.run(main())
    by_id = {s.attributes["dbcancel.job_id"]: s for s in spans.get_finished_spans()}
    assert by_id[done].attributes["dbcancel.status"] == "completed"
    assert by_id[cancelled].attributes["dbcancel.status"] == "cancelled"
    assert by_id[cancelled].attributes["dbcancel.cancel_reason"] == "async stop"
    (observe,) = _points(reader)["dbcancel.cancel.observe.duration"]
    assert observe.count == 1


@pytest.mark.parametrize("database", ["sqlite"], indirect=True)
def test_a_failing_subscriber_is_logged_and_the_job_goes_on(db, caplog):
    from dbcancel import _events

    def broken(event, table, fields):
        raise RuntimeError("exporter down")

    _events.subscribe(broken)
    try:
        jobs = db.jobs()
        job_id = db.add()
        with jobs.run(job_id) as cp:
            cp()
        assert jobs.cancel(db.add())
    finally:
        _events.unsubscribe(broken)
    assert _events.on == ()
    assert jobs.status(job_id) is Status.COMPLETED
    failures = [r for r in caplog.records if "metrics subscriber failed" in r.getMessage()]
    assert {r.getMessage().split()[-1] for r in failures} >= {"'start'", "'end'", "'cancel'"}
