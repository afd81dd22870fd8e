"""The admin action "Cancel selected jobs", for the ModelAdmin of any job model.

```python
from django.contrib import admin
from dbcancel.contrib.django.admin import cancel_selected_jobs

@admin.register(Analysis)
class AnalysisAdmin(admin.ModelAdmin):
    list_display = ["id", "status", "started_at", "finished_at"]
    actions = [cancel_selected_jobs]
```

Nothing is registered with the admin site by this module.
"""

from __future__ import annotations

from typing import Any

from django.contrib import messages
from django.utils.translation import ngettext

from dbcancel.errors import JobNotFound
from dbcancel.models import Status

from .jobs import DjangoJobs

__all__ = ["cancel_selected_jobs"]


def cancel_selected_jobs(modeladmin: Any, request: Any, queryset: Any) -> None:
    """Cancel every selected job with
    [`DjangoJobs.cancel`][dbcancel.contrib.django.jobs.DjangoJobs.cancel], one conditional
    update each.

    Pending and running jobs become cancelled (a running worker stops at its next
    checkpoint); completed and failed ones are left as they are. The reason recorded is
    `"cancelled in the admin by <username>"`. Needs the change permission; reports the
    counts with `message_user`.
    """
    jobs = DjangoJobs(queryset.model, using=queryset.db)
    user = getattr(request, "user", None)
    who = user.get_username() if user is not None and user.is_authenticated else "someone"
    reason = f"cancelled in the admin by {who}"
    # Read once, only to word the answer; each cancel() decides atomically on its own.
    before = dict(queryset.values_list("pk", "status"))
    cancelled = already = finished = gone = 0
    for pk, status in before.items():
        try:
            accepted = jobs.cancel(pk, reason=reason)
        except JobNotFound:
            gone += 1
            continue
        if not accepted:
            finished += 1
        elif status == Status.CANCELLED:
            already += 1
        else:
            cancelled += 1
    name = queryset.model._meta
    if cancelled:
        modeladmin.message_user(
            request,
            ngettext(
                "Cancelled %(count)d %(name)s.",
                "Cancelled %(count)d %(plural)s.",
                cancelled,
            )
            % {"count": cancelled, "name": name.verbose_name, "plural": name.verbose_name_plural},
            messages.SUCCESS,
        )
    if already:
        modeladmin.message_user(
            request,
            ngettext(
                "%(count)d was already cancelled.", "%(count)d were already cancelled.", already
            )
            % {"count": already},
            messages.INFO,
        )
    if finished:
        modeladmin.message_user(
            request,
            ngettext(
                "%(count)d had already completed or failed and was left as it is.",
                "%(count)d had already completed or failed and were left as they are.",
                finished,
            )
            % {"count": finished},
            messages.WARNING,
        )
    if gone:
        modeladmin.message_user(
            request,
            ngettext("%(count)d no longer exists.", "%(count)d no longer exist.", gone)
            % {"count": gone},
            messages.WARNING,
        )


# What @admin.action(description=..., permissions=...) sets, without importing the admin
# (this module must import cleanly in projects that do not install it).
cancel_selected_jobs.short_description = "Cancel selected jobs"  # type: ignore[attr-defined]
cancel_selected_jobs.allowed_permissions = ("change",)  # type: ignore[attr-defined]
