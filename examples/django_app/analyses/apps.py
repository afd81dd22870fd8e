"""The analyses app."""

from django.apps import AppConfig


class AnalysesConfig(AppConfig):
    """Connects the logout receiver that cancels a session's analyses."""

    name = "analyses"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from . import signals  # noqa: F401 - connects the receivers
