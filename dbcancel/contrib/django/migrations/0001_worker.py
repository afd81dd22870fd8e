"""The worker table: one row per process that runs jobs, beaten while they run."""

from typing import Any, ClassVar

from django.db import migrations, models


class Migration(migrations.Migration):  # type: ignore[misc]
    """Create `dbcancel_worker`, the table the SQLAlchemy side shares."""

    initial = True
    dependencies: ClassVar[list[tuple[str, str]]] = []

    operations: ClassVar[list[Any]] = [
        migrations.CreateModel(
            name="Worker",
            fields=[
                ("id", models.CharField(max_length=255, primary_key=True, serialize=False)),
                ("started_at", models.DateTimeField()),
                ("heartbeat_at", models.DateTimeField()),
            ],
            options={"db_table": "dbcancel_worker"},
        ),
    ]
