"""The views: ``experiment_current`` and ``metric_series``.

``experiment_current`` holds the most recently recorded version of each experiment name (editing
a spec records a new experiment id under the same name). ``metric_series`` is every scalar metric
on the time axis of the run it belongs to, with the name of each current experiment that declares
the run (``experiment``): a run two experiments share appears once per experiment, so filter on
``experiment`` before aggregating.

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
    return ("CREATE OR REPLACE VIEW metric_series AS\nSELECT s.*, e.name AS experiment FROM (\n"
            + "\nUNION ALL\n".join(parts)
            + "\n) s JOIN experiment_run l ON l.run_id = s.run_id JOIN experiment_current e ON e.id = l.experiment_id")


EXPERIMENT_CURRENT_SQL = """CREATE OR REPLACE VIEW experiment_current AS
SELECT * FROM experiment QUALIFY row_number() OVER (PARTITION BY name ORDER BY created_at DESC, id DESC) = 1"""


def views_sql() -> list[str]:
    """Statements that (re)create every view, in dependency order."""
    return [EXPERIMENT_CURRENT_SQL, metric_series_sql()]


def metric_names() -> list[str]:
    return sorted({m.name for t in Base.metadata.sorted_tables for m in metrics_of(t)})


def metric_sources() -> list[tuple[str, str, str | None]]:
    """(metric, table it is read from, meaning) for every metric ``metric_series`` can hold."""
    out = {}
    for table in Base.metadata.sorted_tables:
        for m in metrics_of(table):
            out.setdefault(m.name, (m.name, table.name, m.meaning))
    return sorted(out.values())
