"""What the integrations share: the latencies of a cancelled job's end event."""

from __future__ import annotations

from typing import Any

from dbcancel._events import seconds_between


def latencies(fields: dict[str, Any]) -> tuple[float | None, float | None]:
    """(requested -> observed, observed -> stopped) seconds of an `end` event's job,
    each None when the row lacks a timestamp (a job stopped by its worker's own
    `Cancelled`, say, was never requested)."""
    observed = fields.get("observed_at")
    return (
        seconds_between(fields.get("requested_at"), observed),
        seconds_between(observed, fields.get("finished_at")),
    )
