"""The admin action "Cancel selected jobs"."""

from __future__ import annotations

from typing import Any

import pytest
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.messages import get_messages
from django.contrib.messages.storage.cookie import CookieStorage
from django.test import Client, RequestFactory
from django.urls import reverse

from dbcancel import Status
from dbcancel.contrib.django.admin import cancel_selected_jobs

from .testapp.models import Analysis


def test_action_is_described_for_the_admin():
    assert cancel_selected_jobs.short_description == "Cancel selected jobs"
    assert cancel_selected_jobs.allowed_permissions == ("change",)
    assert cancel_selected_jobs.__doc__


@pytest.fixture
def model_admin(alias: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """The registered AnalysisAdmin, reading through the test's alias."""
    ma = admin.site._registry[Analysis]
    monkeypatch.setattr(ma, "using", alias)
    return ma


def post_action(model_admin: Any, ids: list[int]) -> tuple[Any, list[tuple[int, str]]]:
    """POST the changelist's action form, as the admin page does; return the messages."""
    request = RequestFactory().post(
        "/admin/testapp/analysis/",
        {"action": "cancel_selected_jobs", "_selected_action": [str(i) for i in ids], "index": 0},
    )
    # An unsaved superuser: permissions are granted without a query, so that the test
    # touches no database but the alias under test.
    request.user = get_user_model()(username="ops", is_staff=True, is_superuser=True)
    request._messages = CookieStorage(request)
    request._dont_enforce_csrf_checks = True
    response = model_admin.changelist_view(request)
    return response, [(m.level, m.message) for m in get_messages(request)]


def test_action_cancels_the_selected_jobs(alias, model_admin, jobs, add, row):
    pending, running, done, cancelled, not_selected = (add() for _ in range(5))
    with jobs.run(done):
        pass
    jobs.cancel(cancelled, reason="earlier")
    with jobs.run(running) as cp:
        response, messages = post_action(model_admin, [pending, running, done, cancelled])
        assert cp.cancelled  # the running worker heard it at once
    assert response.status_code == 302
    assert messages == [
        (25, "Cancelled 2 analyses."),
        (20, "1 was already cancelled."),
        (30, "1 had already completed or failed and was left as it is."),
    ]
    assert row(pending).status == Status.CANCELLED
    assert row(pending).cancel_reason == "cancelled in the admin by ops"
    assert row(running).status == Status.CANCELLED
    assert row(done).status == Status.COMPLETED
    assert row(cancelled).cancel_reason == "earlier"
    assert row(not_selected).status == Status.PENDING


def test_action_reports_jobs_deleted_meanwhile(alias, model_admin, add):
    job = add()
    request = RequestFactory().post("/")
    request.user = get_user_model()(username="ops", is_staff=True, is_superuser=True)
    request._messages = CookieStorage(request)
    queryset = Analysis.objects.using(alias).filter(pk=job)
    read = queryset.values_list

    def read_then_lose_the_row(*args: Any, **kwargs: Any) -> list[Any]:
        rows = list(read(*args, **kwargs))
        Analysis.objects.using(alias).filter(pk=job).delete()  # deleted by someone else
        return rows

    queryset.values_list = read_then_lose_the_row
    cancel_selected_jobs(model_admin, request, queryset)
    assert [m.message for m in get_messages(request)] == ["1 no longer exists."]


@pytest.mark.sqlite
@pytest.mark.django_db(transaction=True)
def test_action_through_the_admin_site():
    """The whole page: a logged-in staff user picks the action on the change list."""
    staff = get_user_model().objects.create_superuser("boss", "boss@example.com", "pw")
    client = Client()
    client.force_login(staff)
    job = Analysis.objects.create().pk
    url = reverse("admin:testapp_analysis_changelist")
    page = client.get(url)
    assert b"Cancel selected jobs" in page.content
    response = client.post(
        url,
        {"action": "cancel_selected_jobs", "_selected_action": [str(job)], "index": 0},
        follow=True,
    )
    assert b"Cancelled 1 analysis." in response.content
    cancelled = Analysis.objects.get(pk=job)
    assert cancelled.status == Status.CANCELLED
    assert cancelled.cancel_reason == "cancelled in the admin by boss"
