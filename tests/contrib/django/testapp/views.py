"""A view of the test app: cancel an Analysis, as a project's own view would."""

from __future__ import annotations

from django.db import router
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_POST

from dbcancel.contrib.django import DjangoJobs

from .models import Analysis


@csrf_exempt
@require_POST
def cancel(request: HttpRequest, pk: int) -> JsonResponse:
    """``POST /testapp/<pk>/cancel/`` (``reason=``): cancel the job; says what cancel() returned."""
    jobs = DjangoJobs(Analysis, interval=0.05, using=router.db_for_write(Analysis) or "default")
    cancelled = jobs.cancel(pk, reason=request.POST.get("reason") or None)
    return JsonResponse({"id": pk, "cancelled": cancelled})
