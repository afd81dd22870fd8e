"""The analyses as Django Tasks: ``manage.py db_worker`` runs them.

``cancellable.task()`` registers a Django Task whose first argument is the analysis id
and whose body runs inside ``jobs.run(analysis_id)``: a cancel from the delete view (or
the admin, or a logout) stops it at its next ``cp()``, and an analysis cancelled before a
worker took it never starts. Its task result is FAILED with ``JobCancelled`` then, never
SUCCESSFUL.
"""

from __future__ import annotations

from django.conf import settings

from dbcancel import Checkpoint
from dbcancel.contrib.django.tasks import DjangoTaskJobs

from . import work

cancellable = DjangoTaskJobs("analyses.Analysis", interval=settings.ANALYSIS_INTERVAL)


@cancellable.task()
def analyse(cp: Checkpoint, analysis_id: int) -> int:
    """Analyse the folder of one analysis: completed, failed or cancelled."""
    return work.analyse_files(cp, analysis_id)
