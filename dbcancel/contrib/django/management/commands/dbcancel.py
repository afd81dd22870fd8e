"""`manage.py dbcancel list|status|cancel|reap|workers|top`: look at, cancel and reap jobs
from a shell, and watch the fleet.

```text
manage.py dbcancel list [--all | --status S]
manage.py dbcancel status 42
manage.py dbcancel cancel 42 --reason "session deleted"
manage.py dbcancel reap --stale-after 60
manage.py dbcancel workers
manage.py dbcancel top [--every 2] [--once]
```

`--model app_label.ModelName` names the job model (default: the setting
`DBCANCEL_DEFAULT_MODEL`, else the only job model installed); `--database` the
alias (default `default`). The commands print the same lines and exit with the same
statuses as `python -m dbcancel` and `flask dbcancel` (all three run
`dbcancel._commands`; messages name the model's table): 0 on success, 1 when a
cancel is refused because the job had already completed or failed, 2 for an unknown job
or model, a usage error (such as a bad `--stale-after`) or a database error, 130 when
interrupted. Through `call_command` a failure raises `CommandError` with that
status as its `returncode`. Neither this module nor `dbcancel._commands` imports
SQLAlchemy, and neither does `import dbcancel`: the command runs where it is not
installed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import uuid
from collections.abc import Collection
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS, models
from django.db import Error as DatabaseError

from dbcancel import _commands as commands
from dbcancel._commands import (
    ALL_HELP,
    CANCEL_HELP,
    CANCEL_SUMMARY,
    EVERY_HELP,
    EXIT_ERROR,
    LIST_HELP,
    LIST_SUMMARY,
    ONCE_HELP,
    REAP_HELP,
    REAP_SUMMARY,
    REASON_HELP,
    STATUS_HELP,
    STATUS_OPTION_HELP,
    STATUS_SUMMARY,
    TOP_HELP,
    TOP_SUMMARY,
    WORKER_COLUMN,
    WORKERS_HELP,
    WORKERS_SUMMARY,
    ActiveDetail,
    JobDetail,
    Outcome,
    WorkerDetail,
    add_stale_after,
    id_kind_error,
)
from dbcancel.contrib.django.backend import resolve_model
from dbcancel.contrib.django.checks import job_models
from dbcancel.contrib.django.jobs import DjangoJobs
from dbcancel.models import Status

__all__ = ["Command", "DjangoRows"]


class DjangoRows:
    """The rows of a Django job model, read for `list` and `status`
    (`dbcancel._commands.Rows`).

    A field whose column is `worker_id` is shown as the job's worker when the model
    has one.
    """

    def __init__(self, jobs: DjangoJobs) -> None:
        self._backend: Any = jobs._backend
        self.model: Any = jobs.model
        """The job model."""
        self.using = jobs.using
        """The database alias."""
        self.label: str = self.model._meta.db_table
        """The model's table, as every message names it."""
        self.errors: tuple[type[BaseException], ...] = (DatabaseError,)
        """Django's database errors, reported as one line."""
        worker = [
            f.attname
            for f in self.model._meta.concrete_fields
            if getattr(f, "column", None) == WORKER_COLUMN
        ]
        self._fields = [
            "pk",
            "status",
            "started_at",
            "finished_at",
            "beat",
            "cancel_reason",
            "error",
            *worker[:1],
        ]
        self._worker_field = worker[0] if worker else None

    def parse_id(self, text: str) -> Any:
        """`text` as a primary key value, converted as `python -m dbcancel` does."""
        pk = self.model._meta.pk
        kind: type | None = None
        if isinstance(pk, models.IntegerField):  # AutoField and BigAutoField too
            kind = int
        elif isinstance(pk, models.UUIDField):
            kind = uuid.UUID
        elif isinstance(pk, models.CharField | models.TextField):
            return text
        if kind is not None:
            try:
                return kind(text)
            except (TypeError, ValueError, ArithmeticError):
                raise id_kind_error(self.label, kind, text) from None
        try:
            return pk.to_python(text)
        except ValidationError:
            raise ValueError(
                f"{self.label} ids are {pk.get_internal_type()} values; {text!r} is not one"
            ) from None

    def _rows(self) -> Any:
        """The jobs, each with `beat`: its worker's last heartbeat (from the worker
        table, where the job names one), else the job row's own `heartbeat_at`."""
        from django.db import connections
        from django.db.models import F, OuterRef, Subquery
        from django.db.models.functions import Coalesce

        from dbcancel.contrib.django.models import Worker
        from dbcancel.models import WORKER_TABLE

        qs = self.model._base_manager.using(self.using)
        tables = connections[self.using].introspection.table_names()
        if self._worker_field is None or WORKER_TABLE not in tables:
            return qs.annotate(beat=F("heartbeat_at"))
        workers = Worker.objects.using(self.using).filter(pk=OuterRef(self._worker_field))
        beat = Subquery(workers.values("heartbeat_at")[:1])
        return qs.annotate(beat=Coalesce(beat, F("heartbeat_at")))

    def one(self, job_id: Any) -> JobDetail | None:
        """The job's row, or None."""
        row = self._rows().filter(pk=job_id).values_list(*self._fields).first()
        return None if row is None else _detail(row)

    def many(self, statuses: Collection[str] | None) -> list[JobDetail]:
        """The rows in `statuses` (every row for None), in id order."""
        qs = self._rows()
        if statuses is not None:
            qs = qs.filter(status__in=sorted(statuses))
        return [_detail(r) for r in qs.order_by("pk").values_list(*self._fields)]

    def _has_worker_table(self) -> bool:
        from django.db import connections

        from dbcancel.models import WORKER_TABLE

        return WORKER_TABLE in connections[self.using].introspection.table_names()

    def workers(self) -> tuple[dt.datetime, list[WorkerDetail]] | None:
        """The database's clock and the worker rows, each with the number of this
        model's jobs it runs (not stopped), by id; None without a worker table."""
        from django.db.models import Count, OuterRef, Q, Subquery

        from dbcancel.contrib.django.models import Worker

        if not self._has_worker_table():
            return None
        now: dt.datetime = self._backend._server_now()
        qs = Worker.objects.using(self.using).order_by("pk")
        fields = ["pk", "heartbeat_at", "expires_at"]
        if self._worker_field is not None:
            live = Q(finished_at__isnull=True) & Q(
                status__in=[Status.IN_PROGRESS.value, Status.CANCELLED.value]
            )
            jobs = (
                self.model._base_manager.using(self.using)
                .filter(live, **{self._worker_field: OuterRef("pk")})
                .order_by()
                .values(self._worker_field)
                .annotate(n=Count("pk"))
                .values("n")
            )
            qs = qs.annotate(running=Subquery(jobs[:1]))
            fields.append("running")
        listed = []
        for row in qs.values_list(*fields):
            running = (row[3] or 0) if self._worker_field is not None else None
            listed.append(WorkerDetail(str(row[0]), row[1], row[2], running))
        return now, listed

    def active(self) -> tuple[dt.datetime, list[ActiveDetail]]:
        """The database's clock and the jobs started and not stopped, by id."""
        now: dt.datetime = self._backend._server_now()
        qs = self._rows().filter(
            finished_at__isnull=True,
            started_at__isnull=False,
            status__in=[Status.IN_PROGRESS.value, Status.CANCELLED.value],
        )
        fields = ["pk", "status", "started_at", "beat", "cancel_requested_at", "cancel_reason"]
        if self._worker_field is not None:
            fields.append(self._worker_field)
        listed = []
        for row in qs.order_by("pk").values_list(*fields):
            worker = row[6] if len(row) > 6 else None
            listed.append(
                ActiveDetail(
                    row[0],
                    str(getattr(row[1], "value", row[1])),
                    row[2],
                    row[3],
                    row[4],
                    row[5],
                    None if worker is None else str(worker),
                )
            )
        return now, listed

    def describe(self, exc: BaseException) -> str:
        """`database error on database 'alias': first line of the driver's message`."""
        from django.db import connections

        password = connections[self.using].settings_dict.get("PASSWORD") or None
        return f"database error on database {self.using!r}: " + commands.db_reason(exc, password)


def _detail(row: tuple[Any, ...]) -> JobDetail:
    job_id, status, started, finished, beat, reason, error, *worker = row
    value = worker[0] if worker else None
    return JobDetail(
        job_id,
        str(getattr(status, "value", status)),
        started,
        finished,
        beat,
        reason,
        error,
        None if value is None else str(value),
    )


class Command(BaseCommand):  # type: ignore[misc]
    """`dbcancel list [--all | --status S]`, `dbcancel status ID`,
    `dbcancel cancel ID [--reason TEXT]`, `dbcancel reap --stale-after SECONDS`,
    `dbcancel workers`, `dbcancel top [--every S] [--once]`."""

    help = (
        "List, inspect, cancel and reap dbcancel jobs; list its workers, watch running "
        "jobs (top). Exit status: 0 success, 1 cancel "
        "refused (the job had already completed or failed), 2 usage error, unknown job or "
        "model, or database error, 130 interrupted. Times are UTC."
    )
    prog = "manage.py dbcancel"
    """The program name of error lines; `run_from_argv` sets it from the command line."""

    def add_arguments(self, parser: Any) -> None:
        """The subcommands; `--model` and `--database` go before or after them."""
        self._common(parser, argparse_default=True)
        sub = parser.add_subparsers(
            dest="action", metavar="{list,status,cancel,reap,workers,top}", required=True
        )
        listing = sub.add_parser("list", help=LIST_SUMMARY, description=LIST_HELP)
        which = listing.add_mutually_exclusive_group()
        which.add_argument("--all", action="store_true", help=ALL_HELP)
        which.add_argument(
            "--status", choices=[s.value for s in Status], metavar="S", help=STATUS_OPTION_HELP
        )
        status = sub.add_parser("status", help=STATUS_SUMMARY, description=STATUS_HELP)
        status.add_argument("job_id", metavar="ID", help="the job's primary key")
        cancel = sub.add_parser("cancel", help=CANCEL_SUMMARY, description=CANCEL_HELP)
        cancel.add_argument("job_id", metavar="ID", help="the job's primary key")
        cancel.add_argument("--reason", default=None, metavar="TEXT", help=REASON_HELP)
        reap = sub.add_parser("reap", help=REAP_SUMMARY, description=REAP_HELP)
        add_stale_after(reap)
        fleet = sub.add_parser("workers", help=WORKERS_SUMMARY, description=WORKERS_HELP)
        top = sub.add_parser("top", help=TOP_SUMMARY, description=TOP_HELP)
        top.add_argument(
            "--every", type=commands.positive_seconds, default=2.0, metavar="S", help=EVERY_HELP
        )
        top.add_argument("--once", action="store_true", help=ONCE_HELP)
        for subparser in (listing, status, cancel, reap, fleet, top):
            self._common(subparser, argparse_default=False)

    @staticmethod
    def _common(parser: Any, *, argparse_default: bool) -> None:
        # Given after the subcommand, a subparser's value must not be overwritten by the
        # top level's default: only the top level has defaults.
        model_default: Any = None if argparse_default else argparse.SUPPRESS
        db_default: Any = DEFAULT_DB_ALIAS if argparse_default else argparse.SUPPRESS
        parser.add_argument(
            "--model",
            default=model_default,
            help="the job model, app_label.ModelName (default: DBCANCEL_DEFAULT_MODEL, "
            "else the only job model installed)",
        )
        parser.add_argument(
            "--database", default=db_default, help='the database alias (default "default")'
        )

    def run_from_argv(self, argv: list[str]) -> None:
        """Run from `manage.py`: error lines start with `manage.py dbcancel:`."""
        self.prog = f"{os.path.basename(argv[0])} {argv[1]}"
        super().run_from_argv(argv)

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the subcommand named in `options["action"]` and print its outcome.

        From the command line: its lines on stdout and stderr, and its exit status.
        Through `call_command`: its lines on `stdout`, or `CommandError` with
        the exit status as `returncode` when it is not 0.
        """
        try:
            self._finish(self._outcome(options))
        except KeyboardInterrupt:
            self._finish(commands.interrupted())

    def _outcome(self, options: dict[str, Any]) -> Outcome:
        try:
            jobs = self._jobs(options.get("model"), options.get("database") or DEFAULT_DB_ALIAS)
        except ValueError as exc:
            return Outcome(EXIT_ERROR, err=f"error: {exc}")
        rows = DjangoRows(jobs)
        action = options["action"]
        if action == "list":
            every = bool(options.get("all"))
            return commands.list_jobs(rows, every=every, status=options.get("status"))
        if action == "status":
            return commands.status(jobs, rows, options["job_id"])
        if action == "workers":
            return commands.workers(rows)
        if action == "top":
            return commands.top(
                rows,
                every=options.get("every") or 2.0,
                once=bool(options.get("once")),
                show=lambda text: (self.stdout.write(text + "\n"), self.stdout.flush()),
            )
        if action == "reap":
            # --stale-after was checked by argparse, so reap() has nothing left to refuse.
            return commands.reap(jobs, rows, options["stale_after"])
        return commands.cancel(jobs, rows, options["job_id"], options.get("reason"))

    def _finish(self, outcome: Outcome) -> None:
        if getattr(self, "_called_from_command_line", False):
            status = commands.emit(
                outcome, self.prog, stdout=self.stdout.write, stderr=self.stderr.write
            )
            if status:
                sys.exit(status)
            return
        if outcome.status:
            message = outcome.err.removeprefix("error: ") or outcome.out
            raise CommandError(message, returncode=outcome.status)
        if outcome.out:
            self.stdout.write(outcome.out)

    def _jobs(self, label: str | None, alias: str) -> DjangoJobs:
        """The DjangoJobs of `--model` on `--database`; ValueError saying what to fix."""
        label = label or getattr(settings, "DBCANCEL_DEFAULT_MODEL", None)
        try:
            if label:
                model = resolve_model(label)
            else:
                found = job_models()
                if len(found) != 1:
                    names = ", ".join(m._meta.label for m in found) or "none"
                    raise ValueError(
                        "name the job model with --model app_label.ModelName (or set "
                        f"DBCANCEL_DEFAULT_MODEL); job models installed: {names}"
                    )
                model = found[0]
            return DjangoJobs(model, using=alias)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
