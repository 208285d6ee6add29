"""Hand-built stores for the query tests: real DuckDB files, rows whose answer we know.

``StoreBuilder`` writes experiments, runs, checkpoints and metric rows through the typed tables.
``metric(...)`` finds the table that declares a metric (its ``info["metrics"]``), so a test can
write e.g. ``error_barrier_test`` without knowing the geometry schema; when no table declares
the metric yet, ``has_metric`` is False and the test skips.
"""

from __future__ import annotations

import re
from datetime import datetime

import sqlalchemy as sa

from lsdb.schema import Base, metrics_of
from lsdb.store import Store

_WHERE_EQ = re.compile(r"t\.(\w+)\s*=\s*('([^']*)'|-?[0-9.]+)")


def metric_table(name: str):
    for table in Base.metadata.sorted_tables:
        for m in metrics_of(table):
            if m.name == name and table.name != "checkpoint":
                return table, m
    return None, None


def has_metric(name: str) -> bool:
    return metric_table(name)[0] is not None


def _default(col):
    t = col.type.python_type if hasattr(col.type, "python_type") else str
    try:
        t = col.type.python_type
    except NotImplementedError:
        t = str
    return {int: 0, float: 0.0, bool: False, str: "", datetime: datetime(2024, 1, 1)}.get(t, None)


class StoreBuilder:
    """Accumulates rows and writes them in one transaction with ``flush()``."""

    def __init__(self, root):
        self.store = Store.init(root)
        self.rows: dict[str, list[dict]] = {}
        self._jobs = 0
        self.add("experiment", id="exp", name="test", spec_toml="", dataset="mnist1d", probe_set_size=0,
                 probe_set_seed=0, probe_set_sha256="", created_at=datetime(2024, 1, 1))

    def add(self, table: str, **values) -> dict:
        self.rows.setdefault(table, []).append(values)
        return values

    def run(self, id: str, *, seed=0, variant="base", kind="parent", epochs=40.0, lr=0.1, batch_size=64,
            model="cnn1d", width=32, patches=1, num_params=8000, adversarial="none", parent_run_id=None,
            parent_checkpoint_id=None, spawn_epoch=None, child_index=None, status="finished", steps_per_epoch=100):
        return self.add(
            "run", id=id, experiment_id="exp", variant=variant, kind=kind, seed=seed, data_seed=seed,
            dataset="mnist1d", train_subset=0, model=model, width=width, depth=3, kernels="5,3,3",
            patches=patches, num_params=num_params, lr=lr, momentum=0.9, weight_decay=0.0,
            batch_size=batch_size, epochs=epochs, lr_drops="", lr_drop_factor=0.1, adversarial=adversarial,
            adv_epsilon=0.0, adv_steps=0, adv_mix=0.0, steps_per_epoch=steps_per_epoch,
            total_steps=int(epochs * steps_per_epoch), parent_run_id=parent_run_id,
            parent_checkpoint_id=parent_checkpoint_id, spawn_step=None, spawn_epoch=spawn_epoch,
            child_index=child_index, status=status, diverged_step=None, diverged_reason=None, config_json="{}")

    def checkpoint(self, run_id: str, epoch: float, *, epochs=40.0, steps_per_epoch=100, lr=0.1,
                   train_loss=1.0, train_error=0.5, test_loss=1.0, test_error=0.5, id=None) -> str:
        step = int(round(epoch * steps_per_epoch))
        cid = id or f"{run_id}@{step}"
        self.add("checkpoint", id=cid, run_id=run_id, step=step, epoch=float(epoch), frac=epoch / epochs,
                 sha256=cid, has_optimizer=False, lr=lr, train_loss=train_loss, train_error=train_error,
                 test_loss=test_loss, test_error=test_error, created_at=datetime(2024, 1, 1))
        return cid

    def metric(self, name: str, anchor: str, value: float, checkpoint_id: str | None = None, **extra) -> None:
        """One row of metric ``name`` landing at checkpoint ``anchor``."""
        table, m = metric_table(name)
        if table is None:
            raise KeyError(f"no table declares metric {name!r}")
        self._jobs += 1
        job = f"job{self._jobs}"
        self.add("probe_job", id=job, probe=table.name, version=1, params_hash="h", params_json="{}",
                 role=m.role or "self", checkpoint_id=checkpoint_id or anchor, other_checkpoint_id=None,
                 anchor_checkpoint_id=anchor, inputs_json="{}", state="done", attempts=1, error=None,
                 worker="test", device="cpu", started_at=datetime(2024, 1, 1), seconds=0.0)
        row = {c.name: _default(c) for c in table.columns if not c.nullable}
        row.update(job_id=job, idx=0, checkpoint_id=checkpoint_id or anchor, other_checkpoint_id=None,
                   anchor_checkpoint_id=anchor)
        for col, raw, text in _WHERE_EQ.findall(m.where or ""):
            row[col] = text if raw.startswith("'") else float(raw)
        row[m.column] = value
        row.update(extra)
        self.add(table.name, **row)

    def flush(self) -> Store:
        with self.store.write() as conn:
            for table in Base.metadata.sorted_tables:  # parents before children (foreign keys)
                rows = self.rows.pop(table.name, [])
                if rows:
                    conn.execute(sa.insert(table), rows)
        return self.store
