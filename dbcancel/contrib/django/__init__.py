"""dbcancel for Django: add `"dbcancel.contrib.django"` to `INSTALLED_APPS`.

```python
# models.py
from dbcancel.contrib.django.models import CancellableModel

class Analysis(CancellableModel):
    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE)

# anywhere
from dbcancel.contrib.django import DjangoJobs

jobs = DjangoJobs(Analysis, interval=0.5)
with jobs.run(analysis.pk) as cp:          # in the worker thread or process
    for path in files:
        cp()
        process(path)
jobs.cancel(analysis.pk, where={"user_id": request.user.pk})
```

The app (label `dbcancel`) registers the system checks for job models and ships the
`dbcancel` management command and the admin action
[`cancel_selected_jobs`][dbcancel.contrib.django.admin.cancel_selected_jobs]. `DjangoJobs`
is imported lazily, so importing this package does not import the ORM before the app
registry is ready.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .jobs import DjangoJobs

__all__ = ["DjangoJobs"]


def __getattr__(name: str) -> Any:
    # Django imports this module while it loads INSTALLED_APPS; the ORM-backed names
    # must wait until they are asked for.
    if name == "DjangoJobs":
        from .jobs import DjangoJobs

        return DjangoJobs
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
