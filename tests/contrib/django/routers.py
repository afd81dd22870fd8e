"""A router that sends every query without an explicit alias to one chosen database.

Code written for one database (the example project: ``Analysis.objects...``,
``request.user``, sessions) then runs unchanged on whichever alias a test picks. Unset, it
leaves every decision to Django (the "default" alias).
"""

from __future__ import annotations

from typing import Any


class OneDatabase:
    """Route reads and writes to :attr:`alias` while it is set (by a test)."""

    alias: str | None = None
    """The alias every model goes to; None: Django's default routing. Process-wide, so
    that the threads a view starts follow it too."""

    def db_for_read(self, model: Any, **hints: Any) -> str | None:
        return OneDatabase.alias

    def db_for_write(self, model: Any, **hints: Any) -> str | None:
        return OneDatabase.alias
