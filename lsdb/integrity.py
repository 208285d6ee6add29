"""``lsdb check`` and ``lsdb rebuild``: is everything a store says it holds really there, and
getting the database back from the checkpoints and the ingested log when it will not open.

``check`` reads only: every checkpoint file (weights and optimiser state) present and matching
its hash, no orphan rows, every job's identity and state consistent with its rows, every shard of
the log recorded in the database. ``damaged_checkpoints`` is the part ``lsdb run`` uses to retrain
lost or altered checkpoint files before it probes them.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lsdb.errors import StoreError
from lsdb.ids import job_checkpoint_ids, job_id, utcnow
from lsdb.ingest.ingest import IngestReport, ingest, replay_log
from lsdb.spool import log_shards, pending_shards, read_meta
from lsdb.schema import result_tables
from lsdb.store import Store


@dataclass
class CheckReport:
    problems: list[str] = field(default_factory=list)  # each one line: what is wrong and where
    notes: list[str] = field(default_factory=list)  # worth knowing, not wrong (shards waiting …)
    checkpoints: int = 0
    jobs: int = 0
    log_shards: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def damaged_checkpoints(store: Store, run_ids: list[str] | None = None, progress=None) -> dict[str, str]:
    """Checkpoint id → what is wrong with its files (weights or optimiser state missing, unreadable
    or not matching the stored hash), for the given runs (default: all)."""
    from lsdb.train.checkpoints import checkpoint_problem

    with store.read() as con:
        if run_ids is None:
            rows = con.execute("SELECT id, sha256, optimizer_sha256 FROM checkpoint").fetchall()
        else:
            rows = con.execute("SELECT id, sha256, optimizer_sha256 FROM checkpoint "
                               "WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [run_ids]).fetchall()
    out = {}
    for cid, sha, opt_sha in rows:
        why = checkpoint_problem(store.checkpoints, cid, sha, opt_sha)
        if why:
            out[cid] = why
        if progress:
            progress()
    return out


def check(store: Store) -> CheckReport:
    """Everything ``lsdb check`` verifies; the store is only read."""
    report = CheckReport()
    for cid, why in sorted(damaged_checkpoints(store).items()):
        report.problems.append(f"checkpoint {cid}: {why} (lsdb run retrains it)")
    with store.read() as con:
        report.checkpoints = con.execute("SELECT count(*) FROM checkpoint").fetchone()[0]
        report.jobs = con.execute("SELECT count(*) FROM probe_job").fetchone()[0]
        report.problems += orphan_rows(con)
        report.problems += _job_problems(con)
        report.problems += _log_problems(store, con, report)
    waiting = pending_shards(store.spool)
    if waiting:
        report.notes.append(f"{len(waiting)} shards wait in {store.spool} (lsdb ingest, or lsdb run, ingests them)")
    rejected = store.spool / "rejected"
    if rejected.exists() and any(rejected.iterdir()):
        report.notes.append(f"{sum(1 for _ in rejected.iterdir())} shards were rejected; reasons in "
                            f"{rejected}/*/REJECTED.txt")
    return report


def orphan_rows(con) -> list[str]:
    """Rows whose logical foreign keys point nowhere (result tables do not declare theirs, see
    ``lsdb.schema.base.ProbeRow``)."""
    problems = []
    pairs = [("run", "experiment_id", "experiment"), ("run", "parent_run_id", "run"),
             ("checkpoint", "run_id", "run"), ("probe_job", "checkpoint_id", "checkpoint"),
             ("probe_job", "other_checkpoint_id", "checkpoint"), ("probe_job", "anchor_checkpoint_id", "checkpoint"),
             ("experiment_run", "experiment_id", "experiment"), ("experiment_run", "run_id", "run")]
    for name in result_tables():
        pairs += [(name, "job_id", "probe_job"), (name, "checkpoint_id", "checkpoint"),
                  (name, "anchor_checkpoint_id", "checkpoint"), (name, "other_checkpoint_id", "checkpoint")]
    for table, col, ref in pairs:  # names from the schema, never input
        n = con.execute(f'SELECT count(*) FROM "{table}" t WHERE t."{col}" IS NOT NULL AND NOT EXISTS '
                        f'(SELECT 1 FROM "{ref}" r WHERE r.id = t."{col}")').fetchone()[0]
        if n:
            problems.append(f"{table}.{col}: {n} rows without a matching {ref}")
    return problems


def _job_problems(con) -> list[str]:
    from lsdb.probes import PROBES, tables_of

    problems = []
    jobs = con.execute("SELECT id, probe, version, params_hash, checkpoint_id, other_checkpoint_id, more_checkpoint_ids, "
                       "role, state, attempts, error FROM probe_job").fetchall()
    for jid, probe, version, phash, c1, c2, more, role, state, attempts, error in jobs:
        try:
            ids = job_checkpoint_ids(c1, c2, more)
        except ValueError as e:
            problems.append(f"probe_job {jid}: {e}")
            continue
        if job_id(probe, version, phash, ids, role) != jid:
            problems.append(f"probe_job {jid}: id does not match its probe, version, params, checkpoints and role")
        if state not in ("done", "skipped", "failed"):
            problems.append(f"probe_job {jid}: unknown state {state!r}")
        elif state == "failed" and (not error or attempts < 1):
            problems.append(f"probe_job {jid}: failed without an error or an attempt")
        if probe not in PROBES:
            problems.append(f"probe_job {jid}: unknown probe {probe!r}")
    tables = result_tables()
    for probe in sorted({j[1] for j in jobs} & set(PROBES)):
        for table in tables_of(probe):
            if table not in tables:
                continue
            n = con.execute(f'SELECT count(*) FROM "{table}" t JOIN probe_job j ON j.id = t.job_id '
                            f"WHERE j.state <> 'done'").fetchone()[0]
            if n:
                problems.append(f"{table}: {n} rows of jobs that are not done")
    for table in tables:
        n = con.execute(f'SELECT count(*) FROM "{table}" t JOIN probe_job j ON j.id = t.job_id '
                        f"WHERE NOT list_contains(?::VARCHAR[], j.probe)",
                        [[p for p in PROBES if table in tables_of(p)]]).fetchone()[0]
        if n:
            problems.append(f"{table}: {n} rows written by a probe that does not declare the table")
    return problems


def _log_problems(store: Store, con, report: CheckReport) -> list[str]:
    """Every shard of the log is in the database (its rows, or a later attempt of its job)."""
    problems = []
    shards = log_shards(store.spool)
    report.log_shards = len(shards)
    want: dict[str, set[str]] = {"experiment": set(), "run": set(), "checkpoint": set(), "probe_job": set()}
    for s in shards:
        try:
            meta = read_meta(s)
        except (OSError, ValueError) as e:
            problems.append(f"log shard {s.name}: unreadable ({e})")
            continue
        kind = meta.get("kind")
        if kind == "experiment":
            want["experiment"].add(meta["experiment"]["id"])
            want["run"] |= {r["id"] for r in meta["runs"]}
        elif kind == "checkpoint":
            want["checkpoint"].add(meta["row"]["id"])
        elif kind == "run_status":
            want["run"].add(meta["run_id"])
        elif kind == "probe":
            want["probe_job"].add(meta["job"]["id"])
    for table, ids in want.items():
        if not ids:
            continue
        have = {r[0] for r in con.execute(f'SELECT id FROM "{table}" WHERE id IN (SELECT unnest(?::VARCHAR[]))',
                                          [sorted(ids)]).fetchall()}
        missing = sorted(ids - have)
        if missing:
            problems.append(f"{table}: {len(missing)} rows of the ingested log are not in the database "
                            f"(first: {missing[0]}); rebuild: lsdb rebuild")
    return problems


# ------------------------------------------------------------------------------- rebuild

@dataclass
class RebuildReport:
    moved_to: Path | None
    ingest: IngestReport


def rebuild(store: Store) -> RebuildReport:
    """Recreate the database from the ingested log (and any shards waiting in the spool); the
    old file, if any, is kept beside it as ``lsdb.duckdb.broken-<time>``. Hold the store's lock."""
    if not store.root.is_dir():
        raise StoreError(f"no store at {store.root}")
    if not log_shards(store.spool) and not pending_shards(store.spool):
        raise StoreError(f"store {store.root} has no ingested log ({store.ingested}) to rebuild from")
    moved = None
    stamp = utcnow().strftime("%Y%m%dT%H%M%S")
    for path in (store.db_path, store.db_path.with_name(store.db_path.name + ".wal")):
        if path.exists():
            target = path.with_name(f"{path.name}.broken-{stamp}")
            shutil.move(str(path), target)
            moved = moved or target
    store.create()
    report = replay_log(store)
    extra = ingest(store)
    report.shards += extra.shards
    report.rejected += extra.rejected
    return RebuildReport(moved, report)
