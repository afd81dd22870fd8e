"""The Celery worker of the example app: analyses run here, the web app only queues them.

Start the web app in celery mode (``python examples/flask_app/run.py --celery``, or any
``create_app()`` with ``ANALYSIS_RUNNER=celery``), then, from the repository root::

    celery --workdir examples/flask_app -A celery_worker worker --loglevel=INFO

The worker reads the same environment variables as the web app (``DATABASE_URL``,
``UPLOAD_FOLDER``, ``ANALYSIS_SERVER_URI``, ``CELERY_BROKER_URL``, ``CELERY_QUEUE``; their
defaults match ``run.py``'s) and any other setting from ``FLASK_``-prefixed ones
(``FLASK_FRAME_SIZE=4096``). It consumes ``CELERY_QUEUE``.

Each task is :func:`app.analyze_session` inside ``jobs.run(analysis_id)``, through
:class:`dbcancel.contrib.celery.CeleryJobs`: the web process cancels with
``analyses.jobs.cancel(...)`` and waits with ``analyses.jobs.wait(...)`` on the same
table, so a deletion returns only once this worker has stopped reading the files. On
PostgreSQL with psycopg 3 the cancel arrives by NOTIFY within milliseconds; elsewhere the
worker's watcher sees it at its next poll (every ``interval``, 0.5 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from app import ANALYZE_TASK, CELERY_KEY, Analysis, analyze_session, create_app, db  # noqa: E402

from dbcancel import Checkpoint  # noqa: E402
from dbcancel.contrib.celery import CeleryJobs  # noqa: E402

flask_app = create_app({"ANALYSIS_RUNNER": "celery"})
"""The Flask app whose config and database the tasks use (not served here)."""
flask_app.config.from_prefixed_env()

celery = flask_app.extensions[CELERY_KEY]
"""The Celery app this worker runs (``-A celery_worker`` finds it by this name): the one
``create_app()`` made for celery mode, with the web app's broker and queue."""

with flask_app.app_context():
    engine = db.engine
# Built here, in the process that forks the pool: CeleryJobs gives each child its own
# connections and its own Jobs.
cancellable = CeleryJobs(celery, engine, Analysis, interval=0.5)
"""Runs each analysis inside ``jobs.run(analysis_id)`` of the ``analysis`` table."""


@cancellable.task(name=ANALYZE_TASK)
def analyze(cp: Checkpoint, analysis_id: int, view: str) -> None:
    """Analyse the session of ``analysis_id``; a cancel stops it at its next checkpoint."""
    with flask_app.app_context():
        try:
            analyze_session(cp, analysis_id, view=view)
        finally:
            # Before run() writes the job's status: no uncommitted work holds a lock.
            db.session.remove()
