"""Views of the test app: cancel an Analysis, as a project's own views would."""

from __future__ import annotations

import asyncio
import time

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


@csrf_exempt
@require_POST
async def cancel_and_wait(request: HttpRequest, pk: int) -> JsonResponse:
    """``POST /testapp/<pk>/cancel-and-wait/`` (``reason=``), an async view: awaits
    ``acancel()``, then ``await_()`` until the worker has stopped, then ``astatus()``.

    Also says how long the server's event loop was kept from other tasks meanwhile: the
    largest gap of a 10 ms ticker task while the calls ran, and while the loop was left
    alone for as long (``loaded_ms``, ``control_ms``).
    """
    jobs = DjangoJobs(Analysis, interval=0.05, using=router.db_for_write(Analysis) or "default")
    gaps: list[float] = []
    stop = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.03)
    started = time.perf_counter()
    cancelled = await jobs.acancel(pk, reason=request.POST.get("reason") or None)
    final = await jobs.await_(pk, timeout=30)
    status = await jobs.astatus(pk)
    took = time.perf_counter() - started
    loaded = max(gaps[2:], default=0.0)
    gaps.clear()
    await asyncio.sleep(max(took, 0.3))
    stop.set()
    await ticker
    control = max(gaps, default=0.0)
    return JsonResponse(
        {
            "id": pk,
            "cancelled": cancelled,
            "final": final.value,
            "status": status.value,
            "loaded_ms": loaded * 1000,
            "control_ms": control * 1000,
        }
    )
