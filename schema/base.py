"""Declarative base, the probe-result mixin, and how a table feeds ``metric_series``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import ForeignKey, Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, declared_attr, mapped_column


class Base(DeclarativeBase):
    pass


@dataclass(frozen=True)
class Metric:
    """One scalar series in ``metric_series``: ``column`` of the table, for jobs with ``role``
    (None = any role), placed on the time axis at the row's ``anchor_checkpoint_id``.
    ``where`` is an extra SQL condition on the table alias ``t``."""

    name: str
    column: str
    role: str | None = None
    where: str | None = None


class ProbeRow:
    """Key columns every probe result table has; the worker fills them in.

    ``idx`` numbers the rows one job writes to one table (curves, spectra have many).
    """

    @declared_attr
    def job_id(cls) -> Mapped[str]:
        return mapped_column(String, ForeignKey("probe_job.id"), primary_key=True)

    idx: Mapped[int] = mapped_column(Integer, primary_key=True)

    @declared_attr
    def checkpoint_id(cls) -> Mapped[str]:
        return mapped_column(String, ForeignKey("checkpoint.id"), index=True)

    @declared_attr
    def other_checkpoint_id(cls) -> Mapped[str | None]:
        return mapped_column(String, ForeignKey("checkpoint.id"), nullable=True)

    @declared_attr
    def anchor_checkpoint_id(cls) -> Mapped[str]:
        return mapped_column(String, ForeignKey("checkpoint.id"), index=True)


KEY_COLUMNS = ("job_id", "idx", "checkpoint_id", "other_checkpoint_id", "anchor_checkpoint_id")


def metrics_of(table) -> list[Metric]:
    return list(table.info.get("metrics", ()))
