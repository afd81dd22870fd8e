"""The job model: one analysis of a folder, owned by a user and a session."""

from django.conf import settings
from django.db import models

from dbcancel.contrib.django.models import CancellableModel


class Analysis(CancellableModel):
    """An analysis of the files in ``folder``; its status and timestamps are dbcancel's."""

    user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="analyses"
    )
    session_key = models.CharField(max_length=40, db_index=True)
    folder = models.CharField(max_length=255)
    files_done = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta(CancellableModel.Meta):
        verbose_name_plural = "analyses"

    def __str__(self) -> str:
        return f"analysis {self.pk} of {self.folder} ({self.status})"
