"""Start, look at and delete analyses (JSON views for a logged-in user)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from django.conf import settings
from django.contrib.auth.decorators import login_required
from django.db import router, transaction
from django.http import Http404, HttpRequest, JsonResponse
from django.shortcuts import get_object_or_404
from django.views.decorators.http import require_GET, require_POST

from dbcancel import JobNotFound

from . import work
from .models import Analysis

log = logging.getLogger("analyses")


def _as_json(analysis: Analysis) -> dict[str, object]:
    return {
        "id": analysis.pk,
        "folder": analysis.folder,
        "status": analysis.status,
        "files_done": analysis.files_done,
        "started_at": analysis.started_at,
        "finished_at": analysis.finished_at,
        "cancel_reason": analysis.cancel_reason,
        "error": analysis.error,
    }


@require_GET
@login_required
def index(request: HttpRequest) -> JsonResponse:
    """The user's analyses, newest first."""
    mine = Analysis.objects.filter(user=request.user).order_by("-created_at", "-id")
    return JsonResponse({"analyses": [_as_json(a) for a in mine]})


@require_POST
@login_required
def start(request: HttpRequest) -> JsonResponse:
    """Create an analysis of ``folder`` (a folder inside ANALYSIS_INPUTS) and start it."""
    inputs = Path(settings.ANALYSIS_INPUTS).resolve()
    folder = (inputs / request.POST.get("folder", "")).resolve()
    if not folder.is_dir() or not folder.is_relative_to(inputs):
        return JsonResponse({"error": f"no folder {request.POST.get('folder')!r}"}, status=400)
    if not request.session.session_key:
        request.session.save()
    analysis = Analysis.objects.create(
        user=request.user, session_key=request.session.session_key, folder=str(folder)
    )
    # The worker's first query must find the row: start it once the row is committed.
    transaction.on_commit(lambda: work.start(analysis.pk), using=router.db_for_write(Analysis))
    log.info("analysis %s created by %s: %s", analysis.pk, request.user, folder)
    return JsonResponse(_as_json(analysis), status=201)


@require_GET
@login_required
def detail(request: HttpRequest, pk: int) -> JsonResponse:
    """One analysis of the user."""
    return JsonResponse(_as_json(get_object_or_404(Analysis, pk=pk, user=request.user)))


@require_POST
@login_required
def delete(request: HttpRequest, pk: int) -> JsonResponse:
    """Cancel the analysis, wait (bounded) until its worker has stopped, then delete it.

    Deleting first would pull the files out from under a worker that is still writing
    them. A worker that does not stop in ANALYSIS_STOP_TIMEOUT seconds gets a 409: the
    analysis stays cancelled, and deleting again later succeeds.
    """
    jobs = work.analysis_jobs()
    try:
        # Ownership is part of the one conditional UPDATE: another user's id is a 404.
        jobs.cancel(pk, reason="deleted by its owner", where={"user_id": request.user.pk})
    except JobNotFound:
        raise Http404("no such analysis") from None
    log.info("analysis %s cancel requested by %s; waiting for it to stop", pk, request.user)
    try:
        final = jobs.wait(pk, timeout=settings.ANALYSIS_STOP_TIMEOUT)
    except TimeoutError:
        log.warning("analysis %s has not stopped yet: not deleted", pk)
        return JsonResponse({"error": "the analysis is still stopping; try again"}, status=409)
    shutil.rmtree(work.output_dir(pk), ignore_errors=True)
    analysis = Analysis.objects.get(pk=pk)
    files_done = analysis.files_done
    analysis.delete()
    log.info("analysis %s stopped (%s) after %d files; deleted", pk, final.value, files_done)
    return JsonResponse({"deleted": pk, "status": final.value, "files_done": files_done})
