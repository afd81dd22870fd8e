"""The worker row says until when its last beat keeps it alive: `expires_at`."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]
    """Add `dbcancel_worker.expires_at` (nullable: rows beaten before it keep null, and
    `jobs.reap()` judges those by `stale_after` alone).

    Processes running an older dbcancel keep working beside it: they never name the
    column. Its reverse drops the column again.
    """

    dependencies: ClassVar[list[tuple[str, str]]] = [("dbcancel", "0001_worker")]

    operations: ClassVar[list[Any]] = [
        migrations.AddField(
            model_name="worker",
            name="expires_at",
            field=models.DateTimeField(blank=True, null=True),
        ),
    ]
