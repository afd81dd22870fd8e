"""Redis for the push tests: the shared server's address, and throwaway servers of
their own (`redis-server --port <free> --save ''`) that a test may kill and start again.

An unreachable shared Redis, or a missing `redis-server`, skips the tests that need it
locally and fails them under ``CI=true``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid

from .servers import free_port, unavailable

SHARED = os.environ.get("DBCANCEL_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_SERVER = os.environ.get("DBCANCEL_TEST_REDIS_SERVER", "redis-server")


def shared_url() -> str:
    """A URL of the shared Redis with a database number of this test's own (1-15):
    channels carry the number, so concurrent tests do not hear each other."""
    import redis

    client = redis.Redis.from_url(SHARED, socket_timeout=5)
    try:
        client.ping()
    except Exception as err:
        unavailable(f"Redis is not reachable at {SHARED}: {err}")
    finally:
        client.close()
    return f"{SHARED}/{1 + uuid.uuid4().int % 15}"


class RedisServer:
    """A redis-server of the test's own on a free loopback port, without persistence."""

    def __init__(self) -> None:
        binary = shutil.which(REDIS_SERVER)
        if binary is None:
            unavailable(f"{REDIS_SERVER} is not installed")
        self.binary = str(binary)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=sys.stderr)
        self.wait_until_up()

    def wait_until_up(self, timeout: float = 20.0) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server (no goodbye to its clients but the closed sockets)."""
        process, self.process = self.process, None
        if process is not None:
            process.kill()
            process.wait(30)
