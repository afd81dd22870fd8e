"""dbcancel behind PgBouncer in transaction pooling mode.

Each module gets a PgBouncer of its own in front of a throwaway PostgreSQL (see
``servers.throwaway_pgbouncer``); nothing here touches a PgBouncer the system may run.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from .servers import PgBouncer, throwaway_pgbouncer

pytestmark = pytest.mark.postgresql


@pytest.fixture(scope="module")
def bouncer() -> Iterator[PgBouncer]:
    server = throwaway_pgbouncer()
    try:
        yield server
    finally:
        server.remove()


def test_the_pooler_is_in_transaction_mode_in_front_of_its_own_server(bouncer: PgBouncer) -> None:
    pooled = create_engine(
        bouncer.pooler_url, poolclass=NullPool, connect_args={"prepare_threshold": None}
    )
    direct = create_engine(bouncer.direct_url, poolclass=NullPool)
    try:
        with pooled.connect() as conn:
            port = conn.execute(text("SELECT inet_server_port()")).scalar_one()
        assert port == bouncer.postgres.port
        with direct.connect() as conn:
            assert conn.execute(text("SELECT inet_server_port()")).scalar_one() == port
    finally:
        pooled.dispose()
        direct.dispose()
    import psycopg

    with psycopg.connect(
        f"host=127.0.0.1 port={bouncer.port} user=postgres dbname=pgbouncer",
        autocommit=True,
        prepare_threshold=None,
    ) as admin:
        modes = {row[0]: row[1] for row in admin.execute("SHOW CONFIG").fetchall()}
    assert modes["pool_mode"] == "transaction"
    assert int(modes["listen_port"]) == bouncer.port != 6432
