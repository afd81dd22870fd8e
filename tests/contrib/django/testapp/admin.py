"""The admin of the test app: the job model with dbcancel's action."""

from typing import Any

from django.contrib import admin

from dbcancel.contrib.django.admin import cancel_selected_jobs

from .models import Analysis


@admin.register(Analysis)
class AnalysisAdmin(admin.ModelAdmin):
    """Reads through ``using`` (Django's multi-database admin pattern), so that a test
    can point it at any alias."""

    list_display = ("id", "status", "user_id", "started_at", "finished_at")
    actions = (cancel_selected_jobs,)
    using = "default"

    def get_queryset(self, request: Any) -> Any:
        return super().get_queryset(request).using(self.using)
