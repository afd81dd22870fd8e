"""The app's signal and receivers.

``file_analysed`` is sent by the worker after each file (progress bars, tests). On logout,
every analysis of the ending session is cancelled with one ``cancel_where``.
"""

from typing import Any

from django.contrib.auth.signals import user_logged_out
from django.dispatch import Signal, receiver

file_analysed = Signal()
"""Sent by the worker thread after each file: ``sender=Analysis, analysis_id=, count=, path=``."""


@receiver(user_logged_out)
def cancel_session_analyses(sender: Any, request: Any, user: Any, **kwargs: Any) -> None:
    """Stop the work of a session that ends: its results would have no one to see them."""
    from .work import analysis_jobs

    key = getattr(getattr(request, "session", None), "session_key", None)
    if user is not None and key:
        analysis_jobs().cancel_where(user_id=user.pk, session_key=key)
