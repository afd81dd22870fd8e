"""Throwaway PostgreSQL and MariaDB servers that tests may stop and start at will.

Each lives in its own temporary directory, listens on a free loopback port (never the
shared servers' 5432 and 3306) and is removed when the test module is done with it. A
missing binary skips the tests that need the server locally and fails them under
``CI=true``, like an unreachable shared server in ``tests/conftest.py``.

``throwaway_pgbouncer()`` puts a PgBouncer of our own in transaction pooling mode in
front of a throwaway PostgreSQL: its ``pooler_url`` goes through the pooler, its
``direct_url`` to the server itself. It never uses a PgBouncer the system may run on
the default port 6432.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_BIN = Path(os.environ.get("DBCANCEL_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
PGBOUNCER = os.environ.get("DBCANCEL_TEST_PGBOUNCER", "pgbouncer")
MARIADB_INSTALL = os.environ.get("DBCANCEL_TEST_MARIADB_INSTALL", "mariadb-install-db")
MARIADBD = os.environ.get("DBCANCEL_TEST_MARIADBD", "/usr/sbin/mariadbd")
START_TIMEOUT = 60.0


def free_port() -> int:
    """A loopback TCP port that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    assert port not in (5432, 3306, 6432)
    return port


def unavailable(what: str) -> None:
    """Skip locally, fail under CI: a server the tests need could not be set up."""
    if IN_CI:
        pytest.fail(f"{what} (under CI=true every throwaway server must start)")
    pytest.skip(what)


def _run(args: list[str], what: str) -> None:
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout}{done.stderr}")


class Server:
    """A database server of our own: ``start()``, ``stop()``, ``restart()``, ``remove()``."""

    name: str
    url: str

    def __init__(self) -> None:
        self.port = free_port()
        self.restarts = 0

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def restart(self) -> None:
        """Stop the server (its sessions end) and start it again; return once it answers."""
        self.stop()
        self.start()
        self.restarts += 1

    def wait_until_up(self) -> None:
        """Return once the server answers."""
        answer(self.url, "SELECT 1")


def answer(url: str, statement: str) -> None:
    """Run ``statement`` on a new connection to ``url``, retrying until the server answers.

    A bounded poll: a starting server sends no event.
    """
    engine = create_engine(url, poolclass=NullPool)
    deadline = time.monotonic() + START_TIMEOUT
    try:
        while True:
            try:
                with engine.begin() as conn:
                    conn.execute(text(statement))
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    finally:
        engine.dispose()


class PostgresServer(Server):
    """PostgreSQL run with ``pg_ctl`` (as the ``postgres`` OS user when we are root).

    ``settings`` are extra server settings, e.g. ``{"max_connections": 300}``.
    """

    name = "postgresql"

    def __init__(self, settings: dict[str, object] | None = None) -> None:
        super().__init__()
        self.settings = dict(settings or {})
        self.dir = Path(tempfile.mkdtemp(prefix="dbcancel-pg-"))
        self.data = self.dir / "data"
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._as: list[str] = []
        if os.geteuid() == 0:  # PostgreSQL refuses to run as root
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        _run(
            [
                *self._as,
                str(PG_BIN / "initdb"),
                "-D",
                str(self.data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
            "initdb",
        )

    def _ctl(self, *args: str) -> None:
        _run([*self._as, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args], "pg_ctl")

    def start(self) -> None:
        options = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.dir} "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        for key, value in self.settings.items():
            options += f" -c {key}={value}"
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o", options, "start")
        self.wait_until_up()

    def stop(self) -> None:
        # Fast: every session is terminated, the way a database restart ends them.
        self._ctl("-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class MariaDBServer(Server):
    """MariaDB run as a child process; ``root`` without a password, loopback only."""

    name = "mariadb"

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="dbcancel-mariadb-"))
        self.data = self.dir / "data"
        self.url = f"mysql+pymysql://root@127.0.0.1:{self.port}/dbcancel"
        self._process: subprocess.Popen[bytes] | None = None
        user = ["--user=root"] if os.geteuid() == 0 else []
        _run(
            [
                MARIADB_INSTALL,
                "--no-defaults",
                f"--datadir={self.data}",
                *user,
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--skip-name-resolve",
            ],
            "mariadb-install-db",
        )

    def start(self) -> None:
        user = ["--user=root"] if os.geteuid() == 0 else []
        self._process = subprocess.Popen(
            [
                MARIADBD,
                "--no-defaults",
                f"--datadir={self.data}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                f"--socket={self.dir / 'mariadb.sock'}",
                f"--pid-file={self.dir / 'mariadb.pid'}",
                f"--log-error={self.dir / 'server.log'}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                "--innodb-log-file-size=16M",
                "--innodb-flush-log-at-trx-commit=2",
                *user,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.wait_until_up()
        except Exception:
            self.stop()
            raise

    def wait_until_up(self) -> None:
        """Return once the server answers and the tests' database exists."""
        answer(self.url.replace("/dbcancel", "/mysql"), "CREATE DATABASE IF NOT EXISTS dbcancel")

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, 60)

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


class PgBouncer:
    """A PgBouncer of our own in front of ``postgres``, in transaction pooling mode.

    It listens on a free loopback port (never 6432, where a system PgBouncer may run),
    trusts every user listed in its own ``auth_file``, and keeps its configuration, log
    and pid file in a temporary directory. It runs as a child process, as the
    ``postgres`` OS user when we are root (PgBouncer refuses to run as root).
    ``pooler_url`` reaches any database of the server through the pooler;
    ``direct_url`` reaches the server itself.
    """

    def __init__(
        self,
        postgres: PostgresServer,
        *,
        pool_mode: str = "transaction",
        default_pool_size: int = 20,
        max_client_conn: int = 2000,
    ) -> None:
        self.postgres = postgres
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="dbcancel-pgbouncer-"))
        self.direct_url = postgres.url
        self.pooler_url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres"
        self._process: subprocess.Popen[bytes] | None = None
        (self.dir / "userlist.txt").write_text('"postgres" ""\n')
        (self.dir / "pgbouncer.ini").write_text(
            "[databases]\n"
            f"* = host=127.0.0.1 port={postgres.port}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.dir / 'userlist.txt'}\n"
            "admin_users = postgres\n"
            f"pool_mode = {pool_mode}\n"
            f"default_pool_size = {default_pool_size}\n"
            f"max_client_conn = {max_client_conn}\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.dir / 'pgbouncer.log'}\n"
            f"pidfile = {self.dir / 'pgbouncer.pid'}\n"
        )
        self._user: list[str] = []
        if os.geteuid() == 0:
            for path in (self.dir, *self.dir.iterdir()):
                shutil.chown(path, "postgres", "postgres")
            self._user = ["-u", "postgres"]

    @property
    def admin_url(self) -> str:
        """The pooler's admin console (``SHOW POOLS``, ``SHOW CLIENTS``...)."""
        return self.pooler_url.rsplit("/", 1)[0] + "/pgbouncer"

    def start(self) -> None:
        """Start the pooler; return once a query through it answers."""
        self._process = subprocess.Popen(
            [PGBOUNCER, *self._user, str(self.dir / "pgbouncer.ini")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            self.wait_until_up()
        except Exception:
            self.stop()
            raise

    def wait_until_up(self) -> None:
        """Return once a query through the pooler answers (fail fast if it exited)."""
        deadline = time.monotonic() + START_TIMEOUT
        engine = create_engine(self.pooler_url, poolclass=NullPool)
        try:
            while True:
                process = self._process
                if process is not None and process.poll() is not None:
                    log = self.dir / "pgbouncer.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"pgbouncer exited ({process.returncode}): {tail}")
                try:
                    with engine.connect() as conn:
                        conn.execute(text("SELECT 1"))
                    return
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        finally:
            engine.dispose()

    def stop(self) -> None:
        """Stop the pooler: SIGTERM, a shutdown that closes every client."""
        process, self._process = self._process, None
        if process is not None:
            _terminate(process, 30)

    def remove(self) -> None:
        """Stop the pooler and its PostgreSQL; remove both directories."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.postgres.remove()


def _terminate(process: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM `process` (a normal shutdown that closes every session), SIGKILL it if it
    has not exited within `grace` seconds."""
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def binaries_missing(name: str) -> str | None:
    """Why the throwaway server ``name`` cannot run here, or None when it can."""
    if name in ("postgresql", "pgbouncer"):
        needed = [str(PG_BIN / "initdb"), str(PG_BIN / "pg_ctl")]
        if os.geteuid() == 0:
            needed.append("runuser")
        if name == "pgbouncer":
            needed.append(PGBOUNCER)
    else:
        needed = [MARIADB_INSTALL, MARIADBD]
    missing = [n for n in needed if shutil.which(n) is None]
    return f"{', '.join(missing)} not found" if missing else None


def throwaway(name: str, settings: dict[str, object] | None = None) -> Server:
    """A started throwaway server.

    ``settings`` are extra PostgreSQL settings (``{"max_connections": 300}``). Missing
    binaries skip the test (fail it under CI); binaries that are there but do not start
    a server fail it.
    """
    why = binaries_missing(name)
    if why is not None:
        unavailable(f"no throwaway {name} server: {why}")
    server: Server | None = None
    try:
        server = PostgresServer(settings) if name == "postgresql" else MariaDBServer()
        server.start()
    except Exception as err:
        if server is not None:
            server.remove()
        pytest.fail(f"the throwaway {name} server did not start: {err}")
    assert server is not None
    return server


def throwaway_pgbouncer(
    settings: dict[str, object] | None = None,
    *,
    default_pool_size: int = 20,
    max_client_conn: int = 2000,
) -> PgBouncer:
    """A started PgBouncer (transaction pooling) in front of a started throwaway PostgreSQL.

    ``settings`` go to the PostgreSQL server (``{"max_connections": 300}``). Use
    ``pooler_url`` and ``direct_url``; ``remove()`` stops and removes both. A missing
    ``pgbouncer`` skips the test locally and fails it under ``CI=true``.
    """
    why = binaries_missing("pgbouncer")
    if why is not None:
        unavailable(f"no throwaway pgbouncer: {why}")
    postgres = throwaway("postgresql", settings)
    assert isinstance(postgres, PostgresServer)
    try:
        bouncer = PgBouncer(
            postgres, default_pool_size=default_pool_size, max_client_conn=max_client_conn
        )
    except Exception as err:
        postgres.remove()
        pytest.fail(f"the throwaway pgbouncer could not be set up: {err}")
    try:
        bouncer.start()
    except Exception as err:
        bouncer.remove()
        pytest.fail(f"the throwaway pgbouncer did not start: {err}")
    return bouncer
