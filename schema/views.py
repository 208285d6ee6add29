"""``metric_series``: every scalar metric on the time axis of the run it belongs to.

Each table lists its metrics in ``__table_args__["info"]["metrics"]``. A result row lands at its
``anchor_checkpoint_id`` (the planner's time rule: pointwise → itself; velocity → the earlier
checkpoint; sibling children → the parent's checkpoint at the spawn time).
"""

from __future__ import annotations

from .base import Base, metrics_of


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def metric_series_sql() -> str:
    parts = []
    for table in Base.metadata.sorted_tables:
        for m in metrics_of(table):
            if table.name == "checkpoint":
                parts.append(
                    f"SELECT t.run_id, t.id AS checkpoint_id, t.step, t.epoch, t.frac, "
                    f"{_quote(m.name)} AS metric, CAST(t.{m.column} AS DOUBLE) AS value FROM checkpoint t"
                )
                continue
            cond = ["t.{0} IS NOT NULL".format(m.column)]
            if m.role:
                cond.append(f"j.role = {_quote(m.role)}")
            if m.where:
                cond.append(f"({m.where})")
            parts.append(
                f"SELECT c.run_id, c.id AS checkpoint_id, c.step, c.epoch, c.frac, {_quote(m.name)} AS metric, "
                f"CAST(t.{m.column} AS DOUBLE) AS value FROM {table.name} t "
                f"JOIN probe_job j ON j.id = t.job_id JOIN checkpoint c ON c.id = t.anchor_checkpoint_id "
                f"WHERE j.state = 'done' AND " + " AND ".join(cond)
            )
    return "CREATE OR REPLACE VIEW metric_series AS\n" + "\nUNION ALL\n".join(parts)


def metric_names() -> list[str]:
    return sorted({m.name for t in Base.metadata.sorted_tables for m in metrics_of(t)})
