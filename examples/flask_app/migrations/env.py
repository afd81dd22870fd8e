"""Alembic environment of the example app.

Importing :mod:`dbcancel.migrations` registers ``op.add_cancellation()`` and
``op.drop_cancellation()``. The database URL comes from ``-x url=...``, else
``$DATABASE_URL``, else ``sqlalchemy.url`` in alembic.ini; a relative SQLite path is taken
relative to the app's instance folder, as Flask-SQLAlchemy does.
"""

from __future__ import annotations

import os
import sys
from logging.config import fileConfig
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool
from sqlalchemy.engine import URL, make_url

import dbcancel.migrations  # noqa: F401 - registers op.add_cancellation()

APP_FOLDER = Path(__file__).resolve().parents[1]

config = context.config
# Programs that run Alembic in-process keep their own logging (configure_logger=False).
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

# The app's models, for `alembic revision --autogenerate`; app.py sits next to this folder.
if str(APP_FOLDER) not in sys.path:
    sys.path.insert(0, str(APP_FOLDER))
from app import db  # noqa: E402

target_metadata = db.metadata


def database_url() -> URL:
    raw = (
        config.attributes.get("url")
        or context.get_x_argument(as_dictionary=True).get("url")
        or os.environ.get("DATABASE_URL")
        or config.get_main_option("sqlalchemy.url")
    )
    url = make_url(str(raw))
    if url.get_backend_name() == "sqlite" and url.database not in (None, "", ":memory:"):
        path = APP_FOLDER / "instance" / str(url.database)  # an absolute path stays itself
        path.parent.mkdir(parents=True, exist_ok=True)
        url = url.set(database=str(path))
    return url


def run_migrations_offline() -> None:
    """``alembic upgrade --sql``: print the SQL (PostgreSQL and MariaDB; SQLite's batch
    mode needs a live database to read the table from)."""
    context.configure(url=database_url(), target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            context.configure(
                connection=connection,
                target_metadata=target_metadata,
                # SQLite cannot ALTER constraints: batch mode copies the table instead.
                render_as_batch=connection.dialect.name == "sqlite",
            )
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
