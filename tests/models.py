"""The job model the test suite runs against, as a host app would declare it."""

from __future__ import annotations

from sqlalchemy import String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from dbcancel import CancellableMixin


class Base(DeclarativeBase):
    pass


class Analysis(CancellableMixin, Base):
    __tablename__ = "analysis"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[str] = mapped_column(String(64), index=True, default="alice")
    session_id: Mapped[str] = mapped_column(String(64), index=True, default="s1")


class Result(Base):
    """Rows a worker writes in the same transaction as its completion."""

    __tablename__ = "analysis_result"

    id: Mapped[int] = mapped_column(primary_key=True)
    analysis_id: Mapped[int] = mapped_column(index=True)
    value: Mapped[str] = mapped_column(String(64))
