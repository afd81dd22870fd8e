"""`CancellableModel`: the columns of a cancellable job as an abstract Django model.

```python
from dbcancel.contrib.django.models import CancellableModel

class Analysis(CancellableModel):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)
    session_key = models.CharField(max_length=40, db_index=True)
```

The fields and the CHECK constraint are those of
[`CancellableMixin`][dbcancel.CancellableMixin], so a table made by either ORM works with
both. Change `status` only through
[`dbcancel.contrib.django.DjangoJobs`][dbcancel.contrib.django.jobs.DjangoJobs]: the fields
are not editable in forms.
"""

from __future__ import annotations

from typing import Any

import django
from django.db import models
from django.db.models.signals import class_prepared

from dbcancel.models import (
    CANCEL_REASON_LENGTH,
    ERROR_LENGTH,
    REQUIRED_COLUMNS,
    WORKER_ID_LENGTH,
    WORKER_TABLE,
    Status,
    status_check_name,
)

__all__ = ["STATUS_CHOICES", "CancellableModel", "Worker", "status_check_constraint"]

STATUS_CHOICES: list[tuple[str, str]] = [
    (s.value, s.value.replace("_", " ").capitalize()) for s in Status
]
"""`choices` of the `status` field: the five values with readable labels."""

_STATUS_VALUES = [s.value for s in Status]
# Interpolated by Django for every concrete subclass; equals ck_<db_table>_status while
# the table has its default name, and _name_status_check renames it when it has not.
_ABSTRACT_NAME = "ck_%(app_label)s_%(class)s_status"


def status_check_constraint(name: str, field: str = "status") -> models.CheckConstraint:
    """The CHECK constraint that limits `field` to the five status values.

    [`CancellableModel`][dbcancel.contrib.django.models.CancellableModel] adds it for you,
    named `ck_<db_table>_status`. Use this for a job model that declares the fields itself
    (and lists it in `settings.DBCANCEL_MODELS`):

    ```python
    class Meta:
        constraints = [status_check_constraint("ck_legacy_jobs_status")]
    ```

    Works on every supported Django (`check=` became `condition=` in Django 5.1), so
    migrations that call it load on both.
    """
    condition = models.Q(**{f"{field}__in": _STATUS_VALUES})
    if django.VERSION >= (5, 1):
        return models.CheckConstraint(condition=condition, name=name)
    return models.CheckConstraint(check=condition, name=name)  # pragma: no cover - Django<5.1


class CancellableModel(models.Model):  # type: ignore[misc]
    """Adds the fields of a cancellable job to a Django model.

    `status` (`CharField(16)`, choices from [`Status`][dbcancel.Status], default
    `pending`, indexed), `cancel_requested_at`, `cancel_reason` (at most 255
    characters), `cancel_observed_at`, `started_at`, `finished_at`, `heartbeat_at`
    (aware datetimes, null), `error` (the text of the exception that failed the
    job), `worker_id` (the process running it) and `attempts` (how many times a worker
    started it), plus a CHECK constraint named
    `ck_<db_table>_status` that limits `status` to the five values. "Stopped" means
    `finished_at` is set.

    A subclass that declares its own `Meta.constraints` must keep this one: write
    `class Meta(CancellableModel.Meta):` and add to `constraints`, or the
    `dbcancel.E003` system check reports it.
    """

    status = models.CharField(
        max_length=16,
        choices=STATUS_CHOICES,
        default=Status.PENDING.value,
        db_index=True,
        editable=False,
    )
    """The job's state, one of [`Status`][dbcancel.Status]' values; see `TRANSITIONS`."""
    cancel_requested_at = models.DateTimeField(null=True, blank=True, editable=False)
    """When the first cancel was requested."""
    cancel_reason = models.CharField(
        max_length=CANCEL_REASON_LENGTH, null=True, blank=True, editable=False
    )
    """The reason given to the first cancel (at most 255 characters)."""
    cancel_observed_at = models.DateTimeField(null=True, blank=True, editable=False)
    """When a worker of the job first observed the cancel (stamped when it stops)."""
    started_at = models.DateTimeField(null=True, blank=True, editable=False)
    """When a worker moved the job to `in_progress`."""
    finished_at = models.DateTimeField(null=True, blank=True, editable=False)
    """When the job really stopped; null while a worker may still be running it."""
    heartbeat_at = models.DateTimeField(null=True, blank=True, editable=False)
    """Kept for rows started by dbcancel 0.1, whose workers beat each job's row;
    `jobs.reap()` reads it for rows without a `worker_id`."""
    error = models.TextField(null=True, blank=True, editable=False)
    """The text of the exception that failed the job."""
    worker_id = models.CharField(max_length=WORKER_ID_LENGTH, null=True, blank=True, editable=False)
    """The process running (or that ran) the job, `host:pid:token`: its
    [`Worker`][dbcancel.contrib.django.models.Worker] row says whether it is still alive."""
    attempts = models.PositiveIntegerField(default=0, editable=False)
    """How many times a worker started the job: 1 once its body ran, 2 once a retry's
    began, ... (a task queue's retry moves it back to `pending`, keeping this and the
    `error` that caused the retry). Added in dbcancel 0.3: `makemigrations` adds it to
    every concrete job model; a table without it runs jobs as before, uncounted."""

    class Meta:
        """Abstract; carries the status CHECK constraint to every concrete subclass."""

        abstract = True
        constraints = (status_check_constraint(_ABSTRACT_NAME),)

    @property
    def job_status(self) -> Status:
        """`status` as a [`Status`][dbcancel.Status] (the field itself holds the string)."""
        return Status(self.status)

    @property
    def stopped(self) -> bool:
        """True once the job has really stopped (`finished_at` is set)."""
        return self.finished_at is not None


def _name_status_check(sender: type, **kwargs: Any) -> None:
    """Name a job model's status constraint after its table, also when `db_table` is set.

    Django interpolates `%(app_label)s_%(class)s`, which is the table's name only while
    the table has its default name; the constraint must be `ck_<db_table>_status`, as
    the SQLAlchemy mixin names it, so that either ORM finds it.
    """
    if not (isinstance(sender, type) and issubclass(sender, CancellableModel)):
        return
    meta: Any = getattr(sender, "_meta")  # noqa: B009 - Django's documented Options object
    if meta.abstract:
        return
    interpolated = _ABSTRACT_NAME % {"app_label": meta.app_label.lower(), "class": meta.model_name}
    wanted = status_check_name(meta.db_table)
    for constraint in meta.constraints:
        # Each concrete model holds its own copy (Django clones them per class).
        if constraint.name == interpolated and constraint.name != wanted:
            constraint.name = wanted


class_prepared.connect(_name_status_check, dispatch_uid="dbcancel.name_status_check")


class Worker(models.Model):  # type: ignore[misc]
    """A process that runs jobs: one row per process, beaten while its jobs run.

    The table (`dbcancel_worker`, the same as the SQLAlchemy side's) comes with the
    app's migration: add `"dbcancel.contrib.django"` to `INSTALLED_APPS` and run
    `migrate`. `heartbeat_at` and `expires_at` are written on the database's clock.
    """

    id = models.CharField(primary_key=True, max_length=WORKER_ID_LENGTH)
    """`host:pid:token`: what the jobs' `worker_id` holds."""
    started_at = models.DateTimeField()
    """When the process first ran a job."""
    heartbeat_at = models.DateTimeField()
    """When the process last showed it was alive."""
    expires_at = models.DateTimeField(null=True, blank=True)
    """Until when that beat keeps the process alive for `jobs.reap()`: `heartbeat_at`
    plus [`MISSED_BEATS`][dbcancel.backend.MISSED_BEATS] of its heartbeat periods. Null
    in rows written before the column (migration `0002`): `stale_after` alone judges
    those."""

    class Meta:
        """The table both ORMs share."""

        app_label = "dbcancel"
        db_table = WORKER_TABLE

    def __str__(self) -> str:
        return str(self.id)


# -- what DjangoJobs and the system checks require of a job model -------------------------

_DATETIMES = (
    "cancel_requested_at",
    "cancel_observed_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
)


def _missing_fields(model: Any) -> list[str]:
    """The names of dbcancel's fields that `model` lacks (in the order dbcancel lists them)."""
    names = {f.name for f in model._meta.concrete_fields}
    return [name for name in REQUIRED_COLUMNS if name not in names]


def _wrong_fields(model: Any) -> list[str]:
    """Why the fields `model` has cannot hold what dbcancel writes, one line per field."""
    meta = model._meta
    fields = {f.name: f for f in meta.concrete_fields}
    problems: list[str] = []

    def text_field(name: str, min_length: int) -> None:
        field = fields.get(name)
        if field is None:
            return
        if field.is_relation or not isinstance(field, models.CharField | models.TextField):
            problems.append(f"'{name}' must be a CharField or TextField")
        elif isinstance(field, models.CharField) and (field.max_length or 0) < min_length:
            problems.append(f"'{name}' must hold at least {min_length} characters")
        elif not field.null:
            problems.append(f"'{name}' must be null=True")

    status = fields.get("status")
    longest = max(len(v) for v in _STATUS_VALUES)
    if status is not None:
        if status.is_relation or not isinstance(status, models.CharField):
            problems.append("'status' must be a CharField")
        elif (status.max_length or 0) < longest:
            problems.append(f"'status' must hold at least {longest} characters")
        elif status.null:
            problems.append("'status' must not be null=True")
    for name in _DATETIMES:
        field = fields.get(name)
        if field is None:
            continue
        if not isinstance(field, models.DateTimeField):
            problems.append(f"'{name}' must be a DateTimeField")
        elif not field.null:
            problems.append(f"'{name}' must be null=True")
    text_field("cancel_reason", CANCEL_REASON_LENGTH)
    text_field("error", ERROR_LENGTH)
    text_field("worker_id", WORKER_ID_LENGTH)
    return problems


def _has_status_check(model: Any) -> bool:
    """True when `model` declares a CHECK constraint limiting `status` to the five values."""
    for constraint in model._meta.constraints:
        if not isinstance(constraint, models.CheckConstraint):
            continue
        # Django 5.1 renamed `check` to `condition` (and deprecated reading `check`).
        condition = vars(constraint).get("condition", vars(constraint).get("check"))
        if not isinstance(condition, models.Q) or condition.negated:
            continue
        if len(condition.children) != 1 or not isinstance(condition.children[0], tuple):
            continue
        lookup, values = condition.children[0]
        if lookup == "status__in" and sorted(map(str, values)) == sorted(_STATUS_VALUES):
            return True
    return False
