"""The test app's configuration."""

from django.apps import AppConfig


class TestAppConfig(AppConfig):
    """Label ``testapp``; its models have no migrations (pytest-django creates the tables)."""

    name = "tests.contrib.django.testapp"
    label = "testapp"
    default_auto_field = "django.db.models.BigAutoField"
