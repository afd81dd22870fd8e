"""Job models as a host project declares them (no migrations: pytest-django syncs them)."""

from django.db import models

from dbcancel.contrib.django.models import CancellableModel


class Analysis(CancellableModel):
    """The Django twin of ``tests.models.Analysis``: same columns, same defaults."""

    user_id = models.CharField(max_length=64, default="alice", db_index=True)
    session_id = models.CharField(max_length=64, default="s1", db_index=True)

    class Meta(CancellableModel.Meta):
        verbose_name_plural = "analyses"


class Result(models.Model):
    """Rows a worker writes in the same transaction as its completion."""

    analysis_id = models.BigIntegerField(db_index=True)
    value = models.CharField(max_length=64)


class Renamed(CancellableModel):
    """A job model whose table is not named after the model."""

    class Meta(CancellableModel.Meta):
        db_table = "dbcancel_renamed_jobs"


class Tracked(CancellableModel):
    """A job model whose table records the worker running each job (``host:pid:token``)."""

    worker_id = models.CharField(max_length=255, null=True, default=None)
