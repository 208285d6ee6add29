"""Declarative base, the probe-result mixin, and how a table feeds ``metric_series``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Integer, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


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
    meaning: str | None = None  # for names that look alike (``lsdb metrics`` prints it)


class ProbeRow:
    """Key columns every probe result table has; the worker fills them in.

    ``idx`` numbers the rows one job writes to one table (curves, spectra have many).

    Result rows reference ``probe_job.id`` (and, through it, checkpoints) logically, but the
    constraint is not declared: DuckDB checks a foreign key row by row, which made bulk ingest
    3–4× slower (benchmarks/ingest.py). The single writer inserts a job and its rows in one
    transaction, ``probe_job`` keeps its own foreign keys to ``checkpoint``, and
    ``lsdb.integrity.orphan_rows`` (run by ``lsdb check`` and the tests) finds any orphan row.
    """

    job_id: Mapped[str] = mapped_column(String, primary_key=True, info={"references": "probe_job.id"})
    idx: Mapped[int] = mapped_column(Integer, primary_key=True)
    checkpoint_id: Mapped[str] = mapped_column(String, info={"references": "checkpoint.id"})
    other_checkpoint_id: Mapped[str | None] = mapped_column(String, nullable=True, info={"references": "checkpoint.id"})
    anchor_checkpoint_id: Mapped[str] = mapped_column(String, info={"references": "checkpoint.id"})


KEY_COLUMNS = ("job_id", "idx", "checkpoint_id", "other_checkpoint_id", "anchor_checkpoint_id")


def metrics_of(table) -> list[Metric]:
    return list(table.info.get("metrics", ()))
