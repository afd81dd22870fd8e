"""``manage.py dbcancel list|status|cancel|reap``: look at, cancel and reap jobs from a shell.

::

    manage.py dbcancel list [--all]
    manage.py dbcancel status 42
    manage.py dbcancel cancel 42 --reason "session deleted"
    manage.py dbcancel reap --stale-after 60

``--model app_label.ModelName`` names the job model (default: the setting
``DBCANCEL_DEFAULT_MODEL``, else the only job model installed); ``--database`` the
alias (default ``default``). Exit status 1 when a cancel is refused because the job had
already completed or failed, 2 for an unknown job or model or a usage error (such as a
bad ``--stale-after``).
"""

from __future__ import annotations

import argparse
import datetime as dt
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.db import DEFAULT_DB_ALIAS

from dbcancel.cli import add_stale_after, reap_summary
from dbcancel.contrib.django.backend import resolve_model
from dbcancel.contrib.django.checks import job_models
from dbcancel.contrib.django.jobs import DjangoJobs
from dbcancel.demo import format_table
from dbcancel.errors import JobNotFound
from dbcancel.models import TERMINAL, Status

__all__ = ["Command"]

_NOT_FOUND = 2
_REFUSED = 1


class Command(BaseCommand):  # type: ignore[misc]
    """``dbcancel list [--all]``, ``dbcancel status ID``, ``dbcancel cancel ID --reason TEXT``,
    ``dbcancel reap --stale-after SECONDS``."""

    help = "List, inspect, cancel and reap dbcancel jobs."

    def add_arguments(self, parser: Any) -> None:
        """The four subcommands; ``--model`` and ``--database`` go before or after them."""
        self._common(parser, argparse_default=True)
        sub = parser.add_subparsers(
            dest="action", metavar="{list,status,cancel,reap}", required=True
        )
        listing = sub.add_parser("list", help="list pending and running jobs (--all: every job)")
        listing.add_argument("--all", action="store_true", help="list finished jobs too")
        status = sub.add_parser("status", help="print a job's status")
        status.add_argument("job_id", metavar="ID")
        cancel = sub.add_parser(
            "cancel", help="cancel a pending or running job (its worker stops at a checkpoint)"
        )
        cancel.add_argument("job_id", metavar="ID")
        cancel.add_argument("--reason", default=None, help="recorded in cancel_reason")
        reap = sub.add_parser(
            "reap",
            help="stop jobs whose worker died (no heartbeat for --stale-after seconds)",
            description="In-progress jobs with no heartbeat for --stale-after seconds become "
            "failed, with the error 'worker lost'; cancelled jobs whose worker never stopped "
            "get finished_at, so that wait() and delete flows stop waiting for them. "
            "Heartbeats come from workers running with watch=True.",
        )
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

    def handle(self, *args: Any, **options: Any) -> None:
        """Run the subcommand named in ``options["action"]``."""
        jobs = self._jobs(options.get("model"), options.get("database") or DEFAULT_DB_ALIAS)
        action = options["action"]
        if action == "list":
            self._list(jobs, every=bool(options.get("all")))
        elif action == "status":
            job_id = self._job_id(jobs, options["job_id"])
            self.stdout.write(self._status(jobs, job_id).value)
        elif action == "reap":
            self._reap(jobs, options["stale_after"])
        else:
            self._cancel(jobs, self._job_id(jobs, options["job_id"]), options.get("reason"))

    # -- subcommands ------------------------------------------------------------------

    def _list(self, jobs: DjangoJobs, *, every: bool) -> None:
        qs = jobs.model._base_manager.using(jobs.using).order_by("pk")
        what = "jobs"
        if not every:
            qs = qs.exclude(status__in=sorted(s.value for s in TERMINAL))
            what = "pending or in_progress jobs"
        rows = list(
            qs.values_list(
                "pk", "status", "started_at", "finished_at", "cancel_requested_at", "cancel_reason"
            )
        )
        if not rows:
            self.stdout.write(f"no {what} in {jobs.model._meta.label}")
            return
        self.stdout.write(
            format_table(
                ["id", "status", "started_at", "finished_at", "cancel_requested_at", "reason"],
                [[str(r[0]), r[1], *(_when(v) for v in r[2:5]), _text(r[5])] for r in rows],
                right="0",
            )
        )

    def _status(self, jobs: DjangoJobs, job_id: Any) -> Status:
        try:
            return jobs.status(job_id)
        except JobNotFound as exc:
            raise CommandError(str(exc), returncode=_NOT_FOUND) from None

    def _cancel(self, jobs: DjangoJobs, job_id: Any, reason: str | None) -> None:
        label = f"{jobs.model_name} {job_id}"
        # Read first only to word the answer; cancel() itself decides, atomically.
        before = self._status(jobs, job_id)
        try:
            cancelled = jobs.cancel(job_id, reason=reason)
        except JobNotFound as exc:
            raise CommandError(str(exc), returncode=_NOT_FOUND) from None
        if not cancelled:
            after = self._status(jobs, job_id)
            raise CommandError(f"{label}: not cancelled: it is {after.value}", returncode=_REFUSED)
        if before is Status.CANCELLED:
            self.stdout.write(f"{label}: already cancelled")
        elif before is Status.IN_PROGRESS:
            self.stdout.write(
                f"{label}: cancelled (it was in progress: its worker stops at its next checkpoint)"
            )
        else:
            self.stdout.write(f"{label}: cancelled")

    def _reap(self, jobs: DjangoJobs, stale_after: float) -> None:
        # --stale-after was checked by argparse, so reap() has nothing left to refuse.
        count = jobs.reap(stale_after=stale_after)
        self.stdout.write(reap_summary(count, jobs.model._meta.label, stale_after))

    # -- arguments --------------------------------------------------------------------

    def _jobs(self, label: str | None, alias: str) -> DjangoJobs:
        label = label or getattr(settings, "DBCANCEL_DEFAULT_MODEL", None)
        try:
            if label:
                model = resolve_model(label)
            else:
                found = job_models()
                if len(found) != 1:
                    names = ", ".join(m._meta.label for m in found) or "none"
                    raise CommandError(
                        "name the job model with --model app_label.ModelName (or set "
                        f"DBCANCEL_DEFAULT_MODEL); job models installed: {names}",
                        returncode=_NOT_FOUND,
                    )
                model = found[0]
            return DjangoJobs(model, using=alias)
        except (TypeError, ValueError) as exc:
            raise CommandError(str(exc), returncode=_NOT_FOUND) from None

    def _job_id(self, jobs: DjangoJobs, text: str) -> Any:
        pk = jobs.model._meta.pk
        try:
            return pk.to_python(text)
        except ValidationError:
            raise CommandError(
                f"{jobs.model_name} ids are {pk.get_internal_type()} values; {text!r} is not one",
                returncode=_NOT_FOUND,
            ) from None


def _when(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dt.datetime) and value.tzinfo is not None:
        return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return str(value)


def _text(value: Any, limit: int = 60) -> str:
    if value is None:
        return "-"
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
