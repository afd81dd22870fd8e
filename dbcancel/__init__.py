"""dbcancel: stop long-running background work through the database.

A job's row holds its status; cancelling it is one conditional UPDATE that every worker on
every machine can see. Workers call a cheap checkpoint per item, which re-reads the row at
most once per interval and is flipped at once by a cancel issued in the same process.

```python
from dbcancel import Jobs

jobs = Jobs(engine, Analysis, interval=0.5)

with jobs.run(analysis_id) as cp:        # worker: pending -> in_progress
    for path in files:
        cp()                             # raises Cancelled once cancelled
        process(path)
                                         # exit: completed, or stays cancelled
jobs.cancel(analysis_id)                 # from any thread or process
jobs.wait(analysis_id, timeout=10)       # until the worker has really stopped
```
"""

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

from .checkpoint import CallbackHandle, Checkpoint, bind_checkpoint, checkpoint, current
from .errors import (
    Cancelled,
    DbcancelError,
    InvalidTransition,
    JobCancelled,
    JobNotFound,
    JobNotRunnable,
    UsageError,
)
from .jobs import JobRun, Jobs, JobsStats
from .models import TERMINAL, TRANSITIONS, JobId, Status
from .registry import ActiveJob
from .runtime import SHUTDOWN_REASON, shutdown

if TYPE_CHECKING:
    from ._async import AsyncJobRun, AsyncJobs
    from ._mixin import CancellableMixin

__all__ = [
    "SHUTDOWN_REASON",
    "TERMINAL",
    "TRANSITIONS",
    "ActiveJob",
    "AsyncJobRun",
    "AsyncJobs",
    "CallbackHandle",
    "CancellableMixin",
    "Cancelled",
    "Checkpoint",
    "DbcancelError",
    "InvalidTransition",
    "JobCancelled",
    "JobId",
    "JobNotFound",
    "JobNotRunnable",
    "JobRun",
    "Jobs",
    "JobsStats",
    "Status",
    "UsageError",
    "bind_checkpoint",
    "checkpoint",
    "current",
    "shutdown",
]

try:
    __version__: str = version("dbcancel")
    """The installed distribution's version; `setup.cfg` is its one source."""
except PackageNotFoundError:  # pragma: no cover - imported from a source tree, not installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> Any:
    # The SQLAlchemy mixin is imported when it is asked for: `import dbcancel` imports
    # no ORM, so a Django project needs no SQLAlchemy.
    if name == "CancellableMixin":
        from ._mixin import CancellableMixin

        return CancellableMixin
    if name in ("AsyncJobs", "AsyncJobRun"):  # SQLAlchemy's asyncio extension, on demand
        from . import _async

        return getattr(_async, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# A library's loggers stay silent until the application configures logging.
logging.getLogger("dbcancel").addHandler(logging.NullHandler())
