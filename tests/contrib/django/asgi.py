"""The test project as an ASGI application, for an ASGI server in a child process.

``uvicorn tests.contrib.django.asgi:application`` with the environment of
``settings.child_env(alias)``: the one database is the test database of that alias.
"""

from tests.contrib.django import settings as test_settings

test_settings.configure_child()

from django.core.asgi import get_asgi_application  # noqa: E402 - configured just above

application = get_asgi_application()
