"""The contract tests run on both backends, so Django is configured here too.

``tests/contrib/django/settings.py`` holds the one configuration; whichever of the two
test folders pytest imports first configures Django, the other finds it done.
"""

from collections.abc import Iterator
from typing import Any

import pytest

from tests.contrib.django import settings as django_settings

django_settings.configure()


@pytest.hookimpl(wrapper=True)
def pytest_collection_modifyitems() -> Iterator[None]:
    """See :func:`tests.contrib.django.settings.suite_order_kept`."""
    with django_settings.suite_order_kept():
        return (yield)


@pytest.fixture(scope="session", autouse=True)
def _watchers_closed(django_db_setup: Any) -> Iterator[None]:
    """Watcher threads keep their connections open for a while after their last job;
    pytest-django drops the test databases right after the last test, which PostgreSQL
    refuses while a connection is open. Torn down before ``django_db_setup``."""
    yield
    import dbcancel.testing

    dbcancel.testing.close_watchers()
