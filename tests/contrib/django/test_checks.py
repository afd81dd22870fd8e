"""System checks for job models, and the model's fields and constraint."""

from __future__ import annotations

from typing import Any

import pytest
from django.apps import apps
from django.core import checks
from django.db import connections, models
from django.db.migrations.autodetector import MigrationAutodetector
from django.db.migrations.loader import MigrationLoader
from django.db.migrations.questioner import NonInteractiveMigrationQuestioner
from django.db.migrations.state import ProjectState
from django.test import override_settings
from django.test.utils import isolate_apps

from dbcancel import Status
from dbcancel.contrib.django.checks import check_job_models, job_models
from dbcancel.contrib.django.models import (
    STATUS_CHOICES,
    CancellableModel,
    status_check_constraint,
)
from dbcancel.models import REQUIRED_COLUMNS, status_check_name

from .testapp.models import Analysis, Renamed

APP = "tests.contrib.django.testapp"


def run_check(isolated: Any) -> list[checks.CheckMessage]:
    return check_job_models(app_configs=isolated.get_app_configs())


# -- the model -----------------------------------------------------------------------------


def test_fields_are_those_of_the_mixin():
    fields = {f.name: f for f in Analysis._meta.concrete_fields}
    assert set(REQUIRED_COLUMNS) <= set(fields)
    status = fields["status"]
    assert (status.max_length, status.default, status.db_index, status.null) == (
        16,
        "pending",
        True,
        False,
    )
    assert [value for value, _ in status.choices] == [s.value for s in Status]
    assert STATUS_CHOICES[1] == ("in_progress", "In progress")
    assert fields["cancel_reason"].max_length == 255
    for name in REQUIRED_COLUMNS[1:]:
        assert fields[name].null, name
        assert not fields[name].editable, name  # forms cannot bypass the transitions
    job = Analysis()
    assert (job.job_status, job.stopped) == (Status.PENDING, False)


def test_constraint_is_named_after_the_table():
    for model, table in [
        (Analysis, "testapp_analysis"),
        (Renamed, "dbcancel_renamed_jobs"),  # a db_table of its own
        (apps.get_model("analyses", "Analysis"), "analyses_analysis"),
    ]:
        assert model._meta.db_table == table
        assert [c.name for c in model._meta.constraints] == [status_check_name(table)]


def test_constraint_exists_in_the_database(alias):
    conn = connections[alias]
    for model in (Analysis, Renamed):
        table = model._meta.db_table
        with conn.cursor() as cursor:
            found = conn.introspection.get_constraints(cursor, table)
        name = status_check_name(table)
        assert name in found, sorted(found)
        assert found[name]["check"]


def test_example_migrations_match_its_models():
    """The example's migration (with status_check_constraint) is what its model says."""
    loader = MigrationLoader(None, ignore_no_migrations=True)
    autodetector = MigrationAutodetector(
        loader.project_state(),
        ProjectState.from_apps(apps),
        NonInteractiveMigrationQuestioner(specified_apps={"analyses"}, dry_run=True),
    )
    changes = autodetector.changes(graph=loader.graph, trim_to_apps={"analyses"})
    assert "analyses" not in changes


# -- the system checks ---------------------------------------------------------------------


def test_installed_job_models_pass():
    assert {m._meta.label for m in job_models()} == {
        "testapp.Analysis",
        "testapp.Renamed",
        "testapp.Tracked",
        "analyses.Analysis",
    }
    assert [m for m in checks.run_checks(tags=[checks.Tags.models]) if "dbcancel" in m.id] == []


@pytest.mark.django_isolate_apps(APP)
def test_model_missing_fields_is_flagged(django_isolated_apps):
    class Partial(CancellableModel):
        status = None  # removes the inherited field
        heartbeat_at = None

        class Meta:
            app_label = "testapp"

    (message,) = run_check(django_isolated_apps)
    assert message.id == "dbcancel.E001"
    assert message.obj is Partial
    assert "testapp.Partial" in message.msg
    assert "status, heartbeat_at" in message.msg
    assert "Subclass dbcancel.contrib.django.models.CancellableModel" in message.hint
    assert "makemigrations" in message.hint


@pytest.mark.django_isolate_apps(APP)
def test_model_listed_in_the_setting_is_checked(django_isolated_apps):
    class Legacy(models.Model):
        status = models.IntegerField()
        started_at = models.CharField(max_length=30, null=True)

        class Meta:
            app_label = "testapp"

    with override_settings(DBCANCEL_MODELS=["testapp.Legacy"]):
        found = {m.id: m for m in run_check(django_isolated_apps)}
    assert set(found) == {"dbcancel.E001", "dbcancel.E002", "dbcancel.E003"}
    assert (
        "cancel_requested_at, cancel_reason, cancel_observed_at, finished_at"
        in found["dbcancel.E001"].msg
    )
    assert "'status' must be a CharField" in found["dbcancel.E002"].msg
    assert "'started_at' must be a DateTimeField" in found["dbcancel.E002"].msg
    assert found["dbcancel.E002"].hint
    assert "status_check_constraint('ck_testapp_legacy_status')" in found["dbcancel.E003"].hint


@pytest.mark.django_isolate_apps(APP)
def test_meta_that_drops_the_constraint_is_flagged(django_isolated_apps):
    class Dropped(CancellableModel):
        class Meta:  # not Meta(CancellableModel.Meta): the constraint is gone
            app_label = "testapp"

    class Kept(CancellableModel):
        class Meta(CancellableModel.Meta):
            app_label = "testapp"
            constraints = (
                *CancellableModel.Meta.constraints,
                models.UniqueConstraint(fields=("started_at",), name="uq_kept_started_at"),
            )

    class Declared(CancellableModel):
        class Meta:
            app_label = "testapp"
            db_table = "declared_jobs"
            constraints = (status_check_constraint("ck_declared_jobs_status"),)

    (message,) = run_check(django_isolated_apps)
    assert (message.id, message.obj) == ("dbcancel.E003", Dropped)
    assert "class Meta(CancellableModel.Meta)" in message.hint
    assert [c.name for c in Kept._meta.constraints] == [
        "ck_testapp_kept_status",
        "uq_kept_started_at",
    ]


@pytest.mark.django_isolate_apps(APP)
def test_unmanaged_models_and_proxies_need_no_constraint(django_isolated_apps):
    class External(CancellableModel):
        class Meta:
            app_label = "testapp"
            managed = False

    class Proxy(Analysis):
        class Meta:
            app_label = "testapp"
            proxy = True

    assert run_check(django_isolated_apps) == []


def test_bad_setting_is_flagged():
    with override_settings(DBCANCEL_MODELS=["testapp.Nope", "nonsense"]):
        messages = check_job_models()
    assert [m.id for m in messages] == ["dbcancel.E004", "dbcancel.E004"]
    assert "'testapp.Nope'" in messages[0].msg
    assert "app_label.ModelName" in messages[0].hint
    with override_settings(DBCANCEL_MODELS="testapp.Analysis"):
        (message,) = check_job_models()
    assert message.id == "dbcancel.E004"
    assert "must be a list" in message.msg


def test_check_is_registered_by_the_app():
    config = apps.get_app_config("dbcancel")
    assert (config.name, type(config).__name__) == ("dbcancel.contrib.django", "DbcancelConfig")
    assert check_job_models in checks.registry.registry.get_checks()
    with override_settings(DBCANCEL_MODELS=["testapp.Nope"]):
        ids = [m.id for m in checks.run_checks(tags=[checks.Tags.models])]
    assert "dbcancel.E004" in ids


def test_check_of_unrelated_models_is_silent():
    with isolate_apps(APP) as isolated:

        class Plain(models.Model):
            class Meta:
                app_label = "testapp"

        assert run_check(isolated) == []
