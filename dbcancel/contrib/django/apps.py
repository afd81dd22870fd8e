"""The Django app of dbcancel: `INSTALLED_APPS = [..., "dbcancel.contrib.django"]`."""

from __future__ import annotations

from django.apps import AppConfig


class DbcancelConfig(AppConfig):  # type: ignore[misc]
    """Registers dbcancel's system checks, and owns the worker table
    ([`Worker`][dbcancel.contrib.django.models.Worker]) and its migration."""

    name = "dbcancel.contrib.django"
    label = "dbcancel"
    verbose_name = "dbcancel"

    def ready(self) -> None:
        """Register `dbcancel.contrib.django.checks.check_job_models`."""
        from django.core import checks

        from .checks import check_job_models

        checks.register(check_job_models, checks.Tags.models)
