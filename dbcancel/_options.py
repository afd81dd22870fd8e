"""The options every entry point takes, with one set of names, defaults and checks.

[`Jobs`][dbcancel.Jobs], `DjangoJobs`, the Flask extension and the task-queue
integrations take `interval`, `clock`, `watch`, `max_staleness`, `heartbeat`,
`listen_url` and `push`, and show them back the same way:
[`OptionsView`][dbcancel._options.OptionsView] gives an entry point that builds its
`Jobs` later (per app, per process) the same properties as `Jobs` itself, `watch` being
the mode in effect.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._client import check_seconds
from ._liveness import DEFAULT_HEARTBEAT

__all__ = ["DEFAULT_INTERVAL", "Options", "OptionsView"]

DEFAULT_INTERVAL = 0.5
"""Seconds between two polls of a running job's row, unless told otherwise."""


@dataclass(frozen=True, slots=True)
class Options:
    """The checked options of one entry point."""

    interval: float = DEFAULT_INTERVAL
    clock: Callable[[], float] | None = None
    watch: bool | None = None
    max_staleness: float | None = None
    heartbeat: float = DEFAULT_HEARTBEAT
    push: str | None = None
    listen_url: Any = None

    @classmethod
    def checked(
        cls,
        *,
        interval: Any = DEFAULT_INTERVAL,
        clock: Any = None,
        watch: Any = None,
        max_staleness: Any = None,
        heartbeat: Any = DEFAULT_HEARTBEAT,
        push: Any = None,
        listen_url: Any = None,
    ) -> Options:
        """The options, checked as [`Jobs`][dbcancel.Jobs] checks them: `TypeError` or
        `ValueError` naming the option that is wrong."""
        seconds = check_seconds("interval", interval)
        if clock is not None and not callable(clock):
            raise TypeError(f"clock must be a callable returning seconds, got {clock!r}")
        if watch is not None and not isinstance(watch, bool):
            raise TypeError(f"watch must be None, True or False, got {watch!r}")
        if watch and clock is not None:
            raise ValueError(
                "watch=True polls from a background thread on real time; a custom "
                "clock applies only to watch=False (use watch=False, or leave watch out, in "
                "tests that drive the clock)"
            )
        staleness = None if max_staleness is None else check_seconds("max_staleness", max_staleness)
        beat = check_seconds("heartbeat", heartbeat)
        from ._push import check_push

        checked_push = check_push(push)
        if listen_url is not None:
            from ._pg import listen_dsn

            listen_dsn(listen_url)  # raises on a bad value: nothing is opened
        return cls(seconds, clock, watch, staleness, beat, checked_push, listen_url)

    @property
    def watched(self) -> bool:
        """The mode `watch` stands for: None is watched unless a custom clock is given
        (a clock the caller drives cannot drive a background thread)."""
        return self.clock is None if self.watch is None else self.watch

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments of `Jobs` (and of `DjangoJobs`)."""
        return {
            "interval": self.interval,
            "clock": self.clock,
            "watch": self.watch,
            "max_staleness": self.max_staleness,
            "heartbeat": self.heartbeat,
            "listen_url": self.listen_url,
            "push": self.push,
        }


class OptionsView:
    """The options of an entry point, read back as [`Jobs`][dbcancel.Jobs] shows them."""

    _options: Options

    @property
    def interval(self) -> float:
        """Seconds between two polls of a running job's row."""
        return self._options.interval

    @property
    def watch(self) -> bool:
        """The mode in effect: True when a shared background watcher polls the running
        jobs (the default), False when each checkpoint polls its own row."""
        return self._options.watched

    @property
    def heartbeat(self) -> float:
        """Seconds between two beats of a worker process's row while jobs run."""
        return self._options.heartbeat

    @property
    def max_staleness(self) -> float | None:
        """Seconds without a successful poll after which running jobs are cancelled
        locally; None when they keep running through an outage."""
        return self._options.max_staleness

    @property
    def clock(self) -> Callable[[], float] | None:
        """The clock the checkpoints read; None for `time.monotonic`."""
        return self._options.clock

    @property
    def push(self) -> str | None:
        """The Redis URL cancels are pushed through; None for PostgreSQL's LISTEN
        (where the driver can) and polling."""
        return self._options.push

    @property
    def listen_url(self) -> Any:
        """The URL of the listener's own connection to PostgreSQL, as given; None when
        the listener connects through the engine (or the alias) like everything else."""
        return self._options.listen_url
