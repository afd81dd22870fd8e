"""System checks for job models, run by `manage.py check` (and `migrate`, `runserver`).

A job model is a concrete subclass of
[`CancellableModel`][dbcancel.contrib.django.models.CancellableModel], or a model named in the
setting `DBCANCEL_MODELS` (a list of `"app_label.ModelName"`), for tables that
declare the fields themselves.

* `dbcancel.E001` — the model lacks some of dbcancel's fields.
* `dbcancel.E002` — a field has the wrong type or nullability for what dbcancel writes.
* `dbcancel.E003` — the model lacks the CHECK constraint on `status`.
* `dbcancel.E004` — `DBCANCEL_MODELS` names something that is not an installed model.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from django.apps import apps
from django.conf import settings
from django.core.checks import CheckMessage, Error

from dbcancel.models import REQUIRED_COLUMNS, status_check_name

from .models import CancellableModel, _has_status_check, _missing_fields, _wrong_fields

__all__ = ["check_job_models", "check_model", "job_models"]

_SUBCLASS_HINT = (
    "Subclass dbcancel.contrib.django.models.CancellableModel, or add the fields it "
    f"defines ({', '.join(REQUIRED_COLUMNS)}) with the same types; then run makemigrations."
)


def _listed() -> list[Any]:
    value = getattr(settings, "DBCANCEL_MODELS", ())
    if isinstance(value, str):
        return [value]
    return list(value)


def job_models(app_configs: Iterable[Any] | None = None) -> list[Any]:
    """The concrete job models of `app_configs` (default: every installed app)."""
    configs = list(apps.get_app_configs() if app_configs is None else app_configs)
    listed = {str(label).lower() for label in _listed()}
    found = []
    for config in configs:
        for model in config.get_models():
            meta = model._meta
            if meta.abstract or meta.proxy:
                continue
            if issubclass(model, CancellableModel) or meta.label_lower in listed:
                found.append(model)
    return found


def check_model(model: Any) -> list[CheckMessage]:
    """The problems of one job model, as system check messages (empty when it is fine)."""
    meta = model._meta
    messages: list[CheckMessage] = []
    missing = _missing_fields(model)
    if missing:
        messages.append(
            Error(
                f"{meta.label} is a dbcancel job model but lacks the field(s) "
                f"{', '.join(missing)}.",
                hint=_SUBCLASS_HINT,
                obj=model,
                id="dbcancel.E001",
            )
        )
    wrong = _wrong_fields(model)
    if wrong:
        messages.append(
            Error(
                f"{meta.label} cannot store dbcancel's state: {'; '.join(wrong)}.",
                hint="Declare these fields as CancellableModel does (or inherit them from it), "
                "then run makemigrations.",
                obj=model,
                id="dbcancel.E002",
            )
        )
    # Without a status field E001 says it all. The constraint of a multi-table child
    # lives on its parent's table; an unmanaged table's constraints are not Django's.
    needs_check = (
        meta.managed
        and "status" not in missing
        and meta.get_field("status").model._meta.concrete_model is meta.concrete_model
    )
    if needs_check and not _has_status_check(model):
        name = status_check_name(meta.db_table)
        messages.append(
            Error(
                f"{meta.label} lacks the CHECK constraint that limits 'status' to the five "
                "job states.",
                hint=(
                    "Its Meta probably replaces CancellableModel's constraints: write "
                    "`class Meta(CancellableModel.Meta):` and extend `constraints`, or add "
                    "dbcancel.contrib.django.models.status_check_constraint"
                    f"({name!r}) to Meta.constraints; then run makemigrations."
                ),
                obj=model,
                id="dbcancel.E003",
            )
        )
    return messages


def _check_listed(configs: Sequence[Any] | None) -> list[CheckMessage]:
    value = getattr(settings, "DBCANCEL_MODELS", ())
    if isinstance(value, str) or not isinstance(value, list | tuple):
        return [
            Error(
                f"DBCANCEL_MODELS must be a list of 'app_label.ModelName' strings, got {value!r}.",
                hint='For example DBCANCEL_MODELS = ["analyses.Analysis"].',
                id="dbcancel.E004",
            )
        ]
    if configs is not None:
        # A check of some apps only: names in other apps are not this run's business.
        return []
    messages: list[CheckMessage] = []
    for label in value:
        try:
            apps.get_model(label)
        except (LookupError, ValueError, TypeError, AttributeError):
            messages.append(
                Error(
                    f"DBCANCEL_MODELS names {label!r}, which is not an installed model.",
                    hint="Name job models as 'app_label.ModelName', with their app in "
                    "INSTALLED_APPS.",
                    id="dbcancel.E004",
                )
            )
    return messages


def check_job_models(app_configs: Sequence[Any] | None = None, **kwargs: Any) -> list[CheckMessage]:
    """The system check registered by dbcancel's app: every job model, and the setting."""
    messages = _check_listed(app_configs)
    for model in job_models(app_configs):
        messages.extend(check_model(model))
    return messages
