"""The admin: analyses with dbcancel's "Cancel selected jobs" action."""

from django.contrib import admin

from dbcancel.contrib.django.admin import cancel_selected_jobs

from .models import Analysis


@admin.register(Analysis)
class AnalysisAdmin(admin.ModelAdmin):
    """Lists analyses; cancel them with the action, see why they stopped on the page."""

    list_display = ("id", "user", "folder", "status", "files_done", "started_at", "finished_at")
    list_filter = ("status",)
    readonly_fields = (
        "status",
        "cancel_requested_at",
        "cancel_reason",
        "cancel_observed_at",
        "started_at",
        "finished_at",
        "heartbeat_at",
        "error",
    )
    actions = (cancel_selected_jobs,)
