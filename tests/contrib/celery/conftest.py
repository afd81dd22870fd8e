"""Fixtures shared by the tests that run real Celery workers."""

from __future__ import annotations

import pytest
import redis
from celery import Celery

from tests.conftest import IN_CI

from .workers import BACKEND, BROKER


@pytest.fixture(scope="module")
def services() -> None:
    """RabbitMQ and Redis answer; under CI=true a missing one fails instead of skipping."""
    app = Celery(broker=BROKER)
    try:
        with app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=5)
        with redis.Redis.from_url(BACKEND, socket_timeout=5) as client:
            client.ping()
    except Exception as err:
        message = f"RabbitMQ or Redis is not reachable: {err}"
        if IN_CI:
            pytest.fail(f"{message} (under CI=true every service must be up)")
        pytest.skip(message)
