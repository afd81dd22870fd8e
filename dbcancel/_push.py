"""Push through Redis pub/sub: cancels reach hundreds of processes without a database
connection each.

`Jobs(..., push="redis://host:6379/0")` wraps the backend in a
[`PushBackend`][dbcancel._push.PushBackend]: every committed cancel (and every end of a
job, for the `wait()` calls of other processes) is PUBLISHed on the table's Redis channel
once the database has committed it, and the runtime thread listens on ONE Redis
connection per process and URL (a [`RedisListener`][dbcancel._push.RedisListener] per
table, all sharing it) instead of a PostgreSQL LISTEN connection per process.

A push is a hint, never the truth: on arrival the runtime polls the named table at once
and wakes the waiters of the named job; the row decides. A forged, duplicated or lost
message therefore never changes a result: a lost one costs at most one interval (the
poll that would have come anyway), a forged one a poll. A publish that fails is logged,
not raised: the cancel is committed already, and polling will see it.

Channels: `dbcancel:<Redis db>:<table>:<hash>` per table, the hash of the table's
identity (vendor, server, database, schema, table, as the backends resolve it for their
keys), so that two tenants' tables of one name never share a channel, and the SQLAlchemy
and the Django side of one table do; and that name followed by `:<job id>` per job. A
cancel or the end of one job goes to the job's channel, which only the process that runs
or waits for the job subscribes to (the runtime tells each listener which jobs to
`follow`): with one channel per table, every cancel would wake every process of a
fleet. What concerns several jobs (`cancel_where`, `reap`) goes to the table's channel.
Redis pub/sub ignores the database number; the channel carries it, so that URLs with
different numbers stay apart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Collection, Hashable, Mapping
from typing import Any, cast
from urllib.parse import urlsplit

from .backend import ENDED, Backend, Change, end_payload, read_payload
from .models import Status

__all__ = [
    "PushBackend",
    "RedisListener",
    "check_push",
    "redis_channel",
    "with_push",
]

log = logging.getLogger("dbcancel")

SCHEMES = ("redis", "rediss", "unix")
"""URL schemes `push=` accepts (those of `redis.Redis.from_url`)."""

PUBLISH_TIMEOUT = 0.5
"""Seconds a publish may take (connect and reply) before it is given up, logged."""

CONNECT_TIMEOUT = 0.5
"""Seconds the subscriber's connect (and its subscription's confirmation) may take: the
runtime thread waits that long at most, then polls on and tries again later."""

_PUBLISH_BACKOFF = 5.0
"""Longest pause between publish tries while Redis is down (cancels go on unpushed)."""


def check_push(push: Any) -> str | None:
    """`push` checked: None, or a Redis URL (`redis://`, `rediss://`, `unix://`).

    Raises `TypeError` or `ValueError` naming the option, and `ImportError` naming the
    extra when the `redis` package is missing.
    """
    if push is None:
        return None
    if not isinstance(push, str):
        raise TypeError(
            f"push must be None or a Redis URL such as 'redis://127.0.0.1:6379/0', got {push!r}"
        )
    try:
        parts = urlsplit(push)
        port = parts.port
    except ValueError as err:
        raise ValueError(f"push={push!r} is not a Redis URL: {err}") from None
    if parts.scheme not in SCHEMES:
        raise ValueError(
            f"push={push!r} is not a Redis URL: it must start with redis://, rediss:// or "
            "unix:// (such as 'redis://127.0.0.1:6379/0')"
        )
    if parts.scheme != "unix" and not parts.hostname:
        raise ValueError(f"push={push!r} names no host (such as 'redis://127.0.0.1:6379/0')")
    if port is not None and not 0 < port < 65536:
        raise ValueError(f"push={push!r}: port {port} is out of range")
    db = parts.path.strip("/")
    if parts.scheme != "unix" and db and not db.isdigit():
        raise ValueError(
            f"push={push!r} is not a Redis URL: its path must be a database number, got {db!r}"
        )
    _redis()
    try:
        _redis().connection.parse_url(push)
    except ValueError as err:
        raise ValueError(f"push={push!r} is not a Redis URL: {err}") from None
    return push


def _redis() -> Any:
    try:
        import redis
    except ImportError:
        raise ImportError(
            "push='redis://...' publishes cancels through Redis and needs the redis "
            "package: pip install 'dbcancel[redis]'"
        ) from None
    return redis


def _db_of(url: str) -> int:
    """The database number a Redis URL selects (0 unless it says)."""
    kwargs = _redis().connection.parse_url(url)
    return int(kwargs.get("db", 0) or 0)


def redis_channel(url: str, key: Hashable) -> str:
    """The Redis channel of the table whose backend key is `key`, for `url`.

    The key's first element (the ORM) is left out: a cancel through Django reaches the
    SQLAlchemy watchers of the same table, as on PostgreSQL.
    """
    parts = list(key) if isinstance(key, tuple) else [key]
    identity = json.dumps([str(p) for p in parts[1:]] if len(parts) > 1 else [str(key)])
    digest = hashlib.sha256(identity.encode()).hexdigest()[:20]
    table = str(parts[-1])[:40]
    return f"dbcancel:{_db_of(url)}:{table}:{digest}"


def job_channel(table_channel: str, job_id: Any) -> str:
    """The channel of one job of the table on `table_channel`: its cancels and its end
    go there, so that only the process that runs (or waits for) the job hears them."""
    text = str(job_id)
    if len(text) > 64 or not text.isprintable():
        text = "#" + hashlib.sha256(text.encode()).hexdigest()[:24]
    return f"{table_channel}:{text}"


def _client(url: str, **kwargs: Any) -> Any:
    redis = _redis()
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    # No retries inside redis-py: the runtime reconnects with its own backoff, and a
    # cancel must not wait for a Redis that is down.
    return redis.Redis.from_url(url, decode_responses=True, retry=Retry(NoBackoff(), 0), **kwargs)


class _Publisher:
    """PUBLISH to one URL from any thread (redis-py's pool is thread safe), skipping
    the tries for a while after a failure so that cancels stay fast while Redis is down."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._lock = threading.Lock()
        self._client: Any = None
        self._failures = 0
        self._retry_at = -math.inf
        self.published = 0
        self.failed = 0

    def publish(self, channel: str, payload: str) -> None:
        if time.monotonic() < self._retry_at:
            self.failed += 1
            return
        try:
            with self._lock:
                if self._client is None:
                    self._client = _client(
                        self.url,
                        socket_timeout=PUBLISH_TIMEOUT,
                        socket_connect_timeout=PUBLISH_TIMEOUT,
                    )
                client = self._client
            client.publish(channel, payload)
        except Exception:
            self.failed += 1
            with self._lock:
                self._failures += 1
                first = self._failures == 1
                pause = min(0.1 * 2.0 ** (self._failures - 1), _PUBLISH_BACKOFF)
                self._retry_at = time.monotonic() + pause
            if first:
                log.warning(
                    "dbcancel: publishing a cancel to Redis (%s) failed; the cancel is "
                    "committed, watchers see it at their next poll",
                    _safe(self.url),
                    exc_info=True,
                )
            return
        self.published += 1
        if self._failures:
            with self._lock:
                self._failures = 0
                self._retry_at = -math.inf
            log.warning("dbcancel: publishing cancels to Redis (%s) works again", _safe(self.url))


def _safe(url: str) -> str:
    """`url` without its password, for log lines."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return parts._replace(netloc=netloc).geturl()


class _Hub:
    """The process's one subscriber connection to one Redis URL, shared by the
    listeners of every table pushed through it (used by the runtime thread)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.lock = threading.RLock()
        self.pubsub: Any = None
        self.generation = 0  # bumped at every close: listeners of an older one reconnect
        self.listeners: dict[str, set[RedisListener]] = {}  # by channel

    def subscribe(self, listener: RedisListener, channel: str) -> int:
        """Subscribe `listener` to `channel`, connecting first if needed; the generation
        of the connection it is on. Raises when Redis cannot be reached."""
        with self.lock:
            if self.pubsub is None:
                pubsub = _client(
                    self.url, socket_connect_timeout=CONNECT_TIMEOUT, socket_timeout=CONNECT_TIMEOUT
                ).pubsub()
                self.pubsub = pubsub
                self.listeners.clear()
            try:
                if channel not in self.listeners:
                    self.pubsub.subscribe(channel)
                    self._confirm(channel)
            except BaseException:
                self.close()
                raise
            self.listeners.setdefault(channel, set()).add(listener)
            return self.generation

    def follow(self, listener: RedisListener, channel: str) -> None:
        """Subscribe `listener` to one more channel on the live connection, without
        waiting for Redis to confirm (a message sent before that is missed: polling
        sees its cancel). Raises when the connection broke (and closes it)."""
        with self.lock:
            if self.pubsub is None:
                return
            try:
                if channel not in self.listeners:
                    self.pubsub.subscribe(channel)
            except BaseException:
                self.close()
                raise
            self.listeners.setdefault(channel, set()).add(listener)

    def _confirm(self, channel: str) -> None:
        """Wait for Redis to confirm the subscription: a cancel published before that
        reaches nobody, so the runtime polls once the listener is up, not before."""
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"Redis did not confirm the subscription to {channel}")
            message = self.pubsub.get_message(timeout=left)
            if message is None:
                continue
            if message.get("type") == "subscribe" and message.get("channel") == channel:
                return
            self._deliver([message])

    def unsubscribe(self, listener: RedisListener, channel: str) -> None:
        with self.lock:
            listeners = self.listeners.get(channel)
            if listeners is None:
                return
            listeners.discard(listener)
            if listeners:
                return
            del self.listeners[channel]
            if not self.listeners:
                self.close()
                return
            try:
                self.pubsub.unsubscribe(channel)
            except Exception:
                self.close()

    def fileno(self) -> int | None:
        with self.lock:
            connection = None if self.pubsub is None else self.pubsub.connection
            sock = None if connection is None else getattr(connection, "_sock", None)
            return None if sock is None else int(sock.fileno())

    def drain(self, timeout: float) -> None:
        """Read every message waiting (up to `timeout` seconds for the first) into the
        inboxes of their listeners. Raises when the connection broke (and closes it)."""
        with self.lock:
            pubsub = self.pubsub
            if pubsub is None:
                return
            try:
                messages = []
                message = pubsub.get_message(timeout=timeout)
                while message is not None:
                    messages.append(message)
                    message = pubsub.get_message(timeout=0.0)
            except BaseException:
                self.close()
                raise
            self._deliver(messages)

    def _deliver(self, messages: list[dict[str, Any]]) -> None:
        for message in messages:
            if message.get("type") != "message":
                continue
            channel, data = message.get("channel"), message.get("data")
            if not isinstance(channel, str) or not isinstance(data, str):
                continue
            for listener in self.listeners.get(channel, ()):
                listener.inbox.append((channel, _hint(data)))

    def close(self) -> None:
        with self.lock:
            pubsub, self.pubsub = self.pubsub, None
            self.generation += 1
            self.listeners.clear()
            if pubsub is not None:
                with contextlib.suppress(Exception):
                    pubsub.close()


def _hint(payload: str) -> str:
    """A pushed payload as the runtime may take it: a hint to read the row.

    A cancel that names its job comes in as the bare id (the runtime polls the table
    and wakes that job's waiters); the row, not the message, says whether and why the
    job was cancelled. Ends and "poll everything" pass as they are: they only wake.
    """
    kind, job_id, _ = read_payload(payload)
    if kind == ENDED or job_id is None:
        return payload
    if read_payload(job_id)[0] == "poll":
        return job_id
    return "*"  # an id that would read as a cancel payload itself: poll them all


_hubs: dict[str, _Hub] = {}
_publishers: dict[str, _Publisher] = {}
_registry_lock = threading.Lock()


def _hub(url: str) -> _Hub:
    with _registry_lock:
        hub = _hubs.get(url)
        if hub is None:
            hub = _hubs[url] = _Hub(url)
        return hub


def _publisher(url: str) -> _Publisher:
    with _registry_lock:
        publisher = _publishers.get(url)
        if publisher is None:
            publisher = _publishers[url] = _Publisher(url)
        return publisher


class RedisListener:
    """The runtime's listener for one table pushed through Redis: a share of the
    process's one subscriber connection to the URL (see the module docstring).

    `connected` is True while the table's channel is subscribed on a live connection:
    `Jobs.stats().listening` reads it.
    """

    shared = True
    """Not a database connection of its own (the runtime does not count it as one)."""

    def __init__(self, url: str, key: Any) -> None:
        self._url = url
        self._key = key  # a callable giving the backend key (it may ask the database)
        self._hub = _hub(url)
        self._channel: str | None = None
        self._generation: int | None = None
        self._jobs: dict[str, str] = {}  # job id text -> its channel, subscribed
        self.inbox: list[tuple[str, str]] = []

    def connect(self) -> None:
        """Subscribe to the table's channel (connecting the shared connection if it is
        not up); raises when Redis cannot be reached."""
        self.close()
        channel = self._channel = redis_channel(self._url, self._key())
        self._generation = self._hub.subscribe(self, channel)

    def follow(self, job_ids: Collection[str]) -> None:
        """Be subscribed to the channels of exactly these jobs (those the table runs or
        waits for in this process); the runtime calls it as they change."""
        if not self.connected or self._channel is None:
            return
        wanted = set(job_ids)
        for job_id in [j for j in self._jobs if j not in wanted]:
            self._hub.unsubscribe(self, self._jobs.pop(job_id))
        for job_id in wanted - self._jobs.keys():
            channel = job_channel(self._channel, job_id)
            self._hub.follow(self, channel)
            self._jobs[job_id] = channel

    @property
    def connected(self) -> bool:
        """True while subscribed on the live shared connection."""
        hub = self._hub
        return (
            self._generation is not None
            and self._generation == hub.generation
            and (hub.pubsub is not None)
        )

    def channel_name(self) -> str | None:
        """The table's Redis channel, once connected."""
        return self._channel

    def fileno(self) -> int | None:
        """The shared connection's socket (every listener of the URL returns it)."""
        return self._hub.fileno() if self.connected else None

    def receive(self, timeout: float) -> list[tuple[str, str]]:
        """The `(channel, payload)` pairs that arrived for this table; raises when the
        shared connection broke."""
        if not self.connected:
            if self._generation is not None:
                self._generation = None
                raise ConnectionError(f"the Redis connection to {_safe(self._url)} was lost")
            return []
        self._hub.drain(timeout)
        notes, self.inbox = self.inbox, []
        return notes

    def wait(self, timeout: float) -> list[str] | None:
        """The payloads that arrived within `timeout` seconds; None when not connected."""
        if not self.connected:
            return None
        return [payload for _, payload in self.receive(timeout)]

    def close(self) -> None:
        """Leave the channel (the shared connection closes with its last table)."""
        generation, self._generation = self._generation, None
        self.inbox = []
        jobs, self._jobs = self._jobs, {}
        if generation is not None and generation == self._hub.generation and self._channel:
            for channel in jobs.values():
                self._hub.unsubscribe(self, channel)
            self._hub.unsubscribe(self, self._channel)


class PushBackend:
    """A backend whose committed cancels and job ends are also published to Redis.

    Every member not written here is the wrapped backend's (`inner`). Its listener is a
    [`RedisListener`][dbcancel._push.RedisListener], on whatever database. A write made
    in a caller's transaction (`apply(..., using=...)`) is not published: it is not
    committed when `apply` returns; polling sees it.
    """

    def __init__(self, inner: Backend, url: str) -> None:
        self.inner = inner
        self.push = url
        self._publisher = _publisher(url)
        self._channel: str | None = None

    def __getattr__(self, name: str) -> Any:
        if name == "inner":  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"<PushBackend {self.inner!r} push={_safe(self.push)}>"

    def listener(self) -> RedisListener:
        """A listener on the process's shared Redis subscription."""
        inner = self.inner
        return RedisListener(self.push, lambda: inner.key)

    def publish(self, payload: str, job_id: Any = None) -> None:
        """Publish `payload` on the channel of job `job_id`, or on the table's for None
        (several jobs); failures are logged, not raised."""
        try:
            channel = self._channel
            if channel is None:
                channel = self._channel = redis_channel(self.push, self.inner.key)
        except Exception:  # the key needs the database: it answered the write, so rare
            log.debug("dbcancel: no Redis channel for %s", self.inner.label, exc_info=True)
            return
        if job_id is not None:
            channel = job_channel(channel, job_id)
        self._publisher.publish(channel, payload)

    def apply(
        self,
        change: Change,
        *,
        job_id: Any = None,
        filters: Mapping[str, Any] | None = None,
        using: Any = None,
    ) -> int:
        """The wrapped `apply`, then a publish of what it committed."""
        count = self.inner.apply(change, job_id=job_id, filters=filters, using=using)
        if count and using is None:
            if change.to is Status.CANCELLED:
                from .backend import cancel_payload

                reason = change.values.get("cancel_reason")
                payload = "*" if job_id is None else cancel_payload(job_id, reason)
                self.publish(payload, job_id)
            elif "finished_at" in change.stamp:
                self.publish(end_payload(job_id), job_id)
        return count

    def mark_stopped(self, job_id: Any, observed_at: Any = None) -> None:
        """The wrapped `mark_stopped`, then a publish of the job's end."""
        self.inner.mark_stopped(job_id, observed_at)
        self.publish(end_payload(job_id), job_id)

    def reap(self, stale_after: float, error: str) -> int:
        """The wrapped `reap`, then a publish that wakes every waiter when it reaped."""
        count = self.inner.reap(stale_after, error)
        if count:
            self.publish(end_payload(None))
        return count


def with_push(backend: Backend, push: str | None) -> Backend:
    """`backend` wrapped to push through `push` (a checked URL), or as it is for None."""
    if push is None:
        return backend
    if isinstance(backend, PushBackend):
        backend = backend.inner
    # A Backend: every member it does not write is the wrapped one's.
    return cast(Backend, PushBackend(backend, push))


def unwrap(backend: Any) -> Any:
    """The backend under a `PushBackend`, or `backend` itself."""
    return backend.inner if isinstance(backend, PushBackend) else backend


def _reset_after_fork() -> None:
    global _registry_lock
    # The parent's connections are the parent's: the child opens its own. Kept
    # referenced, never closed from the child.
    _orphans.extend(_hubs.values())
    _hubs.clear()
    _publishers.clear()
    _registry_lock = threading.Lock()


_orphans: list[_Hub] = []
os.register_at_fork(after_in_child=_reset_after_fork)
