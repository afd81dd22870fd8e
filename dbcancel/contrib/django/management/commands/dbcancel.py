"""`manage.py dbcancel list|status|cancel|reap`: look at, cancel and reap jobs from a shell.

```text
manage.py dbcancel list [--all | --status S]
manage.py dbcancel status 42
manage.py dbcancel cancel 42 --reason "session deleted"
manage.py dbcancel reap --stale-after 60
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
    EXIT_ERROR,
    LIST_HELP,
    LIST_SUMMARY,
    REAP_HELP,
    REAP_SUMMARY,
    REASON_HELP,
    STATUS_HELP,
    STATUS_OPTION_HELP,
    STATUS_SUMMARY,
    WORKER_COLUMN,
    JobDetail,
    Outcome,
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
    `dbcancel cancel ID [--reason TEXT]`, `dbcancel reap --stale-after SECONDS`."""

    help = (
        "List, inspect, cancel and reap dbcancel jobs. Exit status: 0 success, 1 cancel "
        "refused (the job had already completed or failed), 2 usage error, unknown job or "
        "model, or database error, 130 interrupted. Times are UTC."
    )
    prog = "manage.py dbcancel"
    """The program name of error lines; `run_from_argv` sets it from the command line."""

    def add_arguments(self, parser: Any) -> None:
        """The four subcommands; `--model` and `--database` go before or after them."""
        self._common(parser, argparse_default=True)
        sub = parser.add_subparsers(
            dest="action", metavar="{list,status,cancel,reap}", required=True
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
        for subparser in (listing, status, cancel, reap):
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
