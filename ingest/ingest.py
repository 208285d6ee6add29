"""The single writer: spool shards → typed DuckDB tables, one transaction per batch.

Idempotent by identity: a checkpoint row is keyed by its id, a probe result by its job id (a hash
of probe, version, params, checkpoint ids and role). A shard whose job is already stored is only
moved to ``spool/ingested/``; a shard ingested twice changes nothing. Result rows go in with
DuckDB's ``INSERT … BY NAME SELECT … FROM read_parquet([...])``, one statement per table per batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lsdb.ingest.spool import pending_shards, read_meta, retire

BATCH = 2000
JOB_COLUMNS = ("id", "probe", "version", "params_hash", "params_json", "role", "checkpoint_id",
               "other_checkpoint_id", "anchor_checkpoint_id", "inputs_json", "state", "attempts", "error",
               "worker", "device", "started_at", "seconds")


@dataclass
class IngestReport:
    shards: int = 0
    checkpoints: int = 0
    runs: int = 0
    jobs: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    skipped_known: int = 0
    rejected: list[str] = field(default_factory=list)  # "shard: reason", moved to spool/rejected/

    @property
    def result_rows(self) -> int:
        return sum(self.rows.values())


def ingest(store, batch: int = BATCH) -> IngestReport:
    """Ingest every pending shard of ``store``; returns what was added."""
    report = IngestReport()
    shards = pending_shards(store.spool)
    for i in range(0, len(shards), batch):
        _ingest_batch(store, shards[i : i + batch], report)
    return report


def _ingest_batch(store, shards: list[Path], report: IngestReport) -> None:
    metas = []
    for s in shards:
        try:
            meta = read_meta(s)
            if meta.get("kind") not in ("checkpoint", "run_status", "probe"):
                raise ValueError(f"unknown kind {meta.get('kind')!r}")
        except (OSError, ValueError) as e:  # a damaged shard must not block every other one
            _reject(store, s, str(e), report)
            continue
        metas.append((s, meta))
    shards = [s for s, _ in metas]
    with store.write() as conn:
        con = conn.connection.driver_connection
        ckpts = [m["row"] for _, m in metas if m["kind"] == "checkpoint"]
        if ckpts:
            report.checkpoints += _insert_checkpoints(con, ckpts)
        for _, m in metas:
            if m["kind"] == "run_status":
                con.execute("UPDATE run SET status = ?, diverged_step = ?, diverged_reason = ? WHERE id = ?",
                            [m["status"], m["diverged_step"], m["diverged_reason"], m["run_id"]])
                report.runs += 1
        probe = [(s, m["job"]) for s, m in metas if m["kind"] == "probe"]
        if probe:
            _insert_probe_results(con, probe, report)
    for s in shards:
        retire(s, store.ingested)
    report.shards += len(shards)


def _reject(store, shard: Path, reason: str, report: IngestReport) -> None:
    import os

    target = store.spool / "rejected"
    target.mkdir(exist_ok=True)
    if (target / shard.name).exists():
        import shutil

        shutil.rmtree(shard)
    else:
        os.replace(shard, target / shard.name)
    report.rejected.append(f"{shard.name}: {reason}")


def _insert_checkpoints(con, rows: list[dict]) -> int:
    import pyarrow as pa

    from lsdb.store import utcnow

    now = utcnow()
    for r in rows:
        r.setdefault("created_at", now)
    con.register("ckpt_rows", pa.Table.from_pylist(rows))
    try:
        before = con.execute("SELECT count(*) FROM checkpoint").fetchone()[0]
        con.execute("INSERT INTO checkpoint BY NAME SELECT * FROM ckpt_rows ON CONFLICT DO NOTHING")
        return con.execute("SELECT count(*) FROM checkpoint").fetchone()[0] - before
    finally:
        con.unregister("ckpt_rows")


def _insert_probe_results(con, shards: list[tuple[Path, dict]], report: IngestReport) -> None:
    import pyarrow as pa

    ids = [job["id"] for _, job in shards]
    known = {
        r[0]: r[1]
        for r in con.execute("SELECT id, state FROM probe_job WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()
    }
    fresh: list[tuple[Path, dict]] = []
    seen: set[str] = set()
    for shard, job in shards:
        if known.get(job["id"]) in ("done", "skipped") or job["id"] in seen:
            report.skipped_known += 1
            continue
        seen.add(job["id"])
        fresh.append((shard, job))
    if not fresh:
        return
    con.register("job_rows", pa.Table.from_pylist([{c: job.get(c) for c in JOB_COLUMNS} for _, job in fresh]))
    try:
        con.execute(
            "INSERT INTO probe_job BY NAME SELECT * REPLACE (started_at::TIMESTAMP AS started_at) FROM job_rows "
            "ON CONFLICT (id) DO UPDATE SET state = excluded.state, error = excluded.error, "
            "attempts = probe_job.attempts + 1, worker = excluded.worker, device = excluded.device, "
            "started_at = excluded.started_at, seconds = excluded.seconds"
        )
    finally:
        con.unregister("job_rows")
    report.jobs += len(fresh)
    files: dict[str, list[str]] = {}
    for shard, job in fresh:
        if job["state"] != "done":
            continue
        for f in sorted(shard.glob("*.parquet")):
            files.setdefault(f.stem, []).append(str(f))
    for table, paths in files.items():
        n = con.execute(
            f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?, union_by_name = true)", [paths]
        ).fetchone()[0]
        report.rows[table] = report.rows.get(table, 0) + n


def job_meta_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def check_integrity(con) -> list[str]:
    """Result rows whose job or checkpoints are missing (the logical foreign keys of result tables)."""
    from lsdb.schema import result_tables

    problems = []
    for name in result_tables():
        exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]).fetchone()[0]
        if not exists:
            continue
        for col, ref in (("job_id", "probe_job"), ("checkpoint_id", "checkpoint"),
                         ("anchor_checkpoint_id", "checkpoint"), ("other_checkpoint_id", "checkpoint")):
            n = con.execute(f"SELECT count(*) FROM {name} t WHERE t.{col} IS NOT NULL AND NOT EXISTS "
                            f"(SELECT 1 FROM {ref} r WHERE r.id = t.{col})").fetchone()[0]
            if n:
                problems.append(f"{name}.{col}: {n} rows without a matching {ref}")
    return problems
