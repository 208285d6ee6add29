"""The single writer: spool shards → typed DuckDB tables, one transaction per batch.

Idempotent by identity: an experiment, run or checkpoint row is keyed by its id, a probe result by
its job id (a hash of probe, version, params, checkpoint ids and role). A shard whose job is
already stored is only moved to ``spool/ingested/``; a shard ingested twice changes nothing.

Shards are untrusted input (workers on other machines write them), so each is validated before
its rows are used: its meta has the known shape and types, its ids recompute from their contents,
the checkpoints and runs it names are stored (or come in the same batch), and a probe shard holds
only Parquet files of the result tables its probe declares (``TABLES``), each with the table's
columns and types and keyed to the shard's own job. SQL is never built from a file or field name:
table names come from the schema. A shard that fails is set aside in ``spool/rejected/`` with the
reason in ``REJECTED.txt``, and the rest are ingested. Should the database still refuse a batch
(a constraint no check foresaw), its shards are retried one transaction each, so one bad shard
can never wedge the store.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from lsdb import faults
from lsdb.ids import checkpoint_id, job_checkpoint_ids, job_id, utcnow
from lsdb.spool import META, arrow_schema, log_shards, pending_shards, retire

BATCH = 2000
MAX_META_BYTES = 64 * 1024 * 1024
KIND_ORDER = {"experiment": 0, "checkpoint": 1, "run_status": 2, "probe": 3}  # rows a later kind refers to come first
RUN_STATES = ("planned", "finished", "diverged", "skipped")
JOB_STATES = ("done", "skipped", "failed")
JOB_COLUMNS = ("id", "probe", "version", "params_hash", "params_json", "role", "checkpoint_id",
               "other_checkpoint_id", "anchor_checkpoint_id", "inputs_json", "state", "attempts", "error",
               "worker", "device", "started_at", "seconds", "batchnorm", "peak_memory_mb", "threads", "more_checkpoint_ids")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_ID = re.compile(r"^[0-9a-f]{16,64}$")
REJECTED = "rejected"
REASON_FILE = "REJECTED.txt"


@dataclass
class IngestReport:
    shards: int = 0
    experiments: int = 0
    checkpoints: int = 0
    runs: int = 0
    jobs: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    skipped_known: int = 0
    rejected: list[str] = field(default_factory=list)  # "shard: reason", moved to spool/rejected/

    @property
    def result_rows(self) -> int:
        return sum(self.rows.values())


class ShardRejected(Exception):
    """A shard that must not be ingested; the message is the reason."""


@dataclass
class _Shard:
    path: Path
    meta: dict
    kind: str
    tables: dict = field(default_factory=dict)  # result table -> validated pyarrow Table


def ingest(store, batch: int = BATCH) -> IngestReport:
    """Ingest every pending shard of ``store``; returns what was added and what was rejected."""
    return _ingest_all(store, pending_shards(store.spool), batch, retire_to=store.ingested)


def replay_log(store, batch: int = BATCH) -> IngestReport:
    """Ingest every shard of the log (``spool/ingested/``) in place, for ``lsdb rebuild``; shards
    stay where they are, a bad one is reported but never removed from the log."""
    return _ingest_all(store, log_shards(store.spool), batch, retire_to=None)


def _ingest_all(store, paths: list[Path], batch: int, retire_to: Path | None) -> IngestReport:
    """Ingest ``paths`` in batches; with ``retire_to``, ingested shards move there and bad ones to
    spool/rejected/, else (the log) every shard stays where it is."""
    report = IngestReport()
    shards = _load(store, paths, report, move_bad=retire_to is not None)
    for i in range(0, len(shards), batch):
        _ingest_batch(store, shards[i : i + batch], report, retire_to)
    return report


# ------------------------------------------------------------------------------ batches

def _load(store, paths: list[Path], report: IngestReport, move_bad: bool) -> list[_Shard]:
    """Read and check each shard on its own (meta, files, types); order them so that rows a
    shard refers to (experiments, runs, checkpoints) are ingested before it."""
    out = []
    for p in paths:
        try:
            out.append(_read_shard(p))
        except ShardRejected as e:
            _reject(store, p, str(e), report, move=move_bad)
    out.sort(key=lambda s: (KIND_ORDER[s.kind], s.path.name))
    return out


def _ingest_batch(store, shards: list[_Shard], report: IngestReport, retire_to: Path | None) -> None:
    try:
        part = IngestReport()
        with store.write() as conn:
            accepted, bad = _apply(conn.connection.driver_connection, shards, part)
            faults.point("ingest_before_commit")
    except Exception as e:
        if not _is_data_error(e):
            raise
        # a constraint no check foresaw: find the shard at fault, one transaction each
        if len(shards) == 1:
            _reject(store, shards[0].path, f"the database refused it: {_first_line(e)}", report,
                    move=retire_to is not None)
            return
        for s in shards:
            _ingest_batch(store, [s], report, retire_to)
        return
    faults.point("ingest_after_commit")
    _merge(report, part)
    for s, reason in bad:
        _reject(store, s.path, reason, report, move=retire_to is not None)
    for s in accepted:
        if retire_to is not None:
            retire(s.path, retire_to)
            faults.point("ingest_retired")
    report.shards += len(accepted)


def _is_data_error(e: BaseException) -> bool:
    """Errors that mean "this data does not fit", as opposed to a full disk or a lost
    connection, which must surface instead of rejecting good shards."""
    import duckdb

    orig = getattr(e, "orig", e)  # SQLAlchemy wraps the driver's error
    return isinstance(orig, (duckdb.ConstraintException, duckdb.ConversionException, duckdb.InvalidInputException,
                             duckdb.BinderException, duckdb.TypeMismatchException, duckdb.OutOfRangeException))


def _merge(into: IngestReport, part: IngestReport) -> None:
    into.experiments += part.experiments
    into.checkpoints += part.checkpoints
    into.runs += part.runs
    into.jobs += part.jobs
    into.skipped_known += part.skipped_known
    for k, v in part.rows.items():
        into.rows[k] = into.rows.get(k, 0) + v


def _apply(con, shards: list[_Shard], report: IngestReport):
    """Insert a batch inside one transaction; returns (accepted shards, [(shard, reason)])."""
    accepted: list[_Shard] = []
    bad: list[tuple[_Shard, str]] = []
    by_kind = {k: [s for s in shards if s.kind == k] for k in KIND_ORDER}

    experiments = _existing(con, "experiment", [s.meta["experiment"]["id"] for s in by_kind["experiment"]])
    runs_named = [r["id"] for s in by_kind["experiment"] for r in s.meta["runs"]]
    runs_named += [s.meta["row"]["run_id"] for s in by_kind["checkpoint"]]
    runs_named += [s.meta["run_id"] for s in by_kind["run_status"]]
    runs = _existing(con, "run", runs_named + [r["parent_run_id"] for s in by_kind["experiment"]
                                               for r in s.meta["runs"] if r.get("parent_run_id")])

    runs |= _existing(con, "run", [x for s in by_kind["experiment"] for x in _links(s.meta)])
    for s in by_kind["experiment"]:
        exp, rows, links = s.meta["experiment"], s.meta["runs"], _links(s.meta)
        problem = _experiment_problem(exp, rows, links, experiments, runs)
        if problem:
            bad.append((s, problem))
            continue
        report.experiments += _insert_rows(con, "experiment", [exp])
        for parents in (True, False):  # parents first: children reference them
            chunk = [r for r in rows if (r.get("parent_run_id") is None) == parents]
            report.runs += _insert_rows(con, "run", chunk)
        _insert_rows(con, "experiment_run", [dict(experiment_id=exp["id"], run_id=x) for x in links])
        experiments.add(exp["id"])
        runs |= {r["id"] for r in rows}
        accepted.append(s)

    ckpt_ok = []
    for s in by_kind["checkpoint"]:
        row = s.meta["row"]
        if row["run_id"] not in runs:
            bad.append((s, f"checkpoint {row['id']} names run {row['run_id']}, which is not stored"))
        else:
            ckpt_ok.append(s)
    rows = [dict(s.meta["row"]) for s in ckpt_ok]
    now = utcnow()
    for r in rows:
        r.setdefault("created_at", now)
    report.checkpoints += _insert_rows(con, "checkpoint", rows)
    accepted += ckpt_ok

    for s in by_kind["run_status"]:
        m = s.meta
        if m["run_id"] not in runs:
            bad.append((s, f"status of run {m['run_id']}, which is not stored"))
            continue
        con.execute("UPDATE run SET status = ?, diverged_step = ?, diverged_reason = ? WHERE id = ?",
                    [m["status"], m.get("diverged_step"), m.get("diverged_reason"), m["run_id"]])
        report.runs += 1
        accepted.append(s)

    probes = by_kind["probe"]
    if probes:
        named = {c for s in probes for c in _job_checkpoints(s.meta["job"])}
        stored = _existing(con, "checkpoint", sorted(named))
        ok = []
        for s in probes:
            missing = [c for c in _job_checkpoints(s.meta["job"]) if c not in stored]
            if missing:
                bad.append((s, f"job {s.meta['job']['id']} names checkpoint {missing[0]}, which is not stored"))
            else:
                ok.append(s)
        _insert_probe_results(con, ok, report)
        accepted += ok
    return accepted, bad


def _links(meta: dict) -> list[str]:
    """The ids of the runs an experiment shard declares (shards of schema 2 declare only the runs
    they record)."""
    return meta["links"] if "links" in meta else [r["id"] for r in meta["runs"]]


def _experiment_problem(exp: dict, rows: list[dict], links: list[dict], experiments: set, runs: set) -> str | None:
    known = experiments | {exp["id"]}
    here = runs | {r["id"] for r in rows}
    for r in rows:
        if r["experiment_id"] not in known:
            return f"run {r['id']} names experiment {r['experiment_id']}, which is not stored"
        if r.get("parent_run_id") and r["parent_run_id"] not in here:
            return f"run {r['id']} names parent run {r['parent_run_id']}, which is not stored"
    for x in links:
        if x not in here:
            return f"experiment {exp['id']} declares run {x}, which is not stored"
    return None


def _existing(con, table: str, ids: list[str]) -> set[str]:
    if not ids:
        return set()
    # the table name is one of our own literals, never input
    return {r[0] for r in con.execute(f'SELECT id FROM "{table}" WHERE id IN (SELECT unnest(?::VARCHAR[]))',
                                      [list(set(ids))]).fetchall()}


def _insert_rows(con, table: str, rows: list[dict]) -> int:
    """Insert typed rows into one of the core tables, keeping rows whose id is stored already."""
    if not rows:
        return 0
    data = _typed(table, rows)
    before = con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0]
    con.register("incoming_rows", data)
    try:
        con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM incoming_rows ON CONFLICT DO NOTHING')
    finally:
        con.unregister("incoming_rows")
    return con.execute(f'SELECT count(*) FROM "{table}"').fetchone()[0] - before


def _insert_probe_results(con, shards: list[_Shard], report: IngestReport) -> None:
    import pyarrow as pa

    ids = [s.meta["job"]["id"] for s in shards]
    known = {r[0]: r[1] for r in con.execute(
        "SELECT id, state FROM probe_job WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall()}
    # several attempts of one job may arrive together (a failure, then a retry): one row per job,
    # the outcome that ended it (done or skipped over failed), every attempt counted
    attempts: dict[str, list[_Shard]] = {}
    for s in shards:
        jid = s.meta["job"]["id"]
        if known.get(jid) in ("done", "skipped"):
            report.skipped_known += 1
            continue
        attempts.setdefault(jid, []).append(s)
    fresh: list[_Shard] = []
    rows = []
    for tries in attempts.values():
        final = [s for s in tries if s.meta["job"]["state"] != "failed"]
        chosen = final[0] if final else tries[-1]
        report.skipped_known += len(final) - 1 if final else 0
        fresh.append(chosen)
        rows.append({**{c: chosen.meta["job"].get(c) for c in JOB_COLUMNS},
                     "attempts": len(tries) - max(len(final) - 1, 0)})
    if not fresh:
        return
    con.register("job_rows", _typed("probe_job", rows))
    try:
        con.execute(
            "INSERT INTO probe_job BY NAME SELECT * FROM job_rows "
            "ON CONFLICT (id) DO UPDATE SET state = excluded.state, error = excluded.error, "
            "attempts = probe_job.attempts + excluded.attempts, worker = excluded.worker, device = excluded.device, "
            "started_at = excluded.started_at, seconds = excluded.seconds, batchnorm = excluded.batchnorm, "
            "peak_memory_mb = excluded.peak_memory_mb, threads = excluded.threads"
        )
    finally:
        con.unregister("job_rows")
    report.jobs += len(fresh)
    by_table: dict[str, list] = {}
    for s in fresh:
        for table, data in s.tables.items():
            by_table.setdefault(table, []).append(data)
    for table, parts in by_table.items():
        data = pa.concat_tables(parts, promote_options="default")
        con.register("result_rows", data)
        try:  # ``table`` is one of the probe's declared tables (checked in _check_probe), quoted
            con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM result_rows')
        finally:
            con.unregister("result_rows")
        report.rows[table] = report.rows.get(table, 0) + data.num_rows


# ----------------------------------------------------------------------------- validation

def _read_shard(path: Path) -> _Shard:
    """A shard whose meta and files passed every check that needs no database."""
    meta_path = path / META
    try:
        if meta_path.is_symlink() or meta_path.stat().st_size > MAX_META_BYTES:
            raise ShardRejected(f"{META} is a link or larger than {MAX_META_BYTES} bytes")
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ShardRejected(f"unreadable {META} ({_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("kind") not in KIND_ORDER:
        kind = meta.get("kind") if isinstance(meta, dict) else None
        raise ShardRejected(f"unknown kind {kind!r}")
    shard = _Shard(path, meta, meta["kind"])
    try:
        _CHECKS[shard.kind](shard)
    except ShardRejected:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise ShardRejected(f"malformed {shard.kind} shard ({type(e).__name__}: {_first_line(e)})") from None
    if shard.kind != "probe":
        extra = sorted(p.name for p in path.iterdir() if p.name != META)
        if extra:
            raise ShardRejected(f"unexpected file {extra[0]} in a {shard.kind} shard")
    return shard


def _check_experiment(shard: _Shard) -> None:
    exp, runs = shard.meta["experiment"], shard.meta["runs"]
    _typed("experiment", [exp])
    if not isinstance(runs, list) or not all(isinstance(r, dict) for r in runs):
        raise ShardRejected("runs must be a list of rows")
    _typed("run", runs)
    for r in runs:
        if not _ID.match(str(r["id"])):
            raise ShardRejected(f"run id {r['id']!r} is not a content id")
        if r["status"] not in RUN_STATES:
            raise ShardRejected(f"run {r['id']} has unknown status {r['status']!r}")
    links = shard.meta.get("links", [])
    if not isinstance(links, list) or not all(isinstance(x, str) and _ID.match(x) for x in links):
        raise ShardRejected("links must be a list of run ids")


def _check_checkpoint(shard: _Shard) -> None:
    row = shard.meta["row"]
    _typed("checkpoint", [row])
    if row["id"] != checkpoint_id(row["run_id"], row["step"]):
        raise ShardRejected(f"checkpoint id {row['id']!r} is not the id of run {row['run_id']} step {row['step']}")
    for key in ("sha256", "optimizer_sha256"):
        if not _SHA256.match(str(row[key])):
            raise ShardRejected(f"checkpoint {row['id']}: {key} {row[key]!r} is not a sha256")


def _check_status(shard: _Shard) -> None:
    m = shard.meta
    if not isinstance(m["run_id"], str) or m["status"] not in RUN_STATES:
        raise ShardRejected(f"status {m.get('status')!r} of run {m.get('run_id')!r} is not a run state")
    if m.get("diverged_step") is not None and (not isinstance(m["diverged_step"], int)
                                               or isinstance(m["diverged_step"], bool)):
        raise ShardRejected(f"diverged_step {m['diverged_step']!r} is not an integer")
    if m.get("diverged_reason") is not None and not isinstance(m["diverged_reason"], str):
        raise ShardRejected("diverged_reason is not text")


def _check_probe(shard: _Shard) -> None:
    from lsdb.probes import PROBES, tables_of
    from lsdb.probes.base import BATCHNORM_MODES

    job = shard.meta["job"]
    if not isinstance(job, dict):
        raise ShardRejected("job must be a table")
    _typed("probe_job", [{c: job.get(c) for c in JOB_COLUMNS}])
    if job["probe"] not in PROBES:
        raise ShardRejected(f"unknown probe {job['probe']!r}")
    if job["state"] not in JOB_STATES:
        raise ShardRejected(f"job state {job['state']!r} is not one of {', '.join(JOB_STATES)}")
    if job.get("batchnorm") is not None and job["batchnorm"] not in BATCHNORM_MODES:  # absent in older logs
        raise ShardRejected(f"job batchnorm {job['batchnorm']!r} is not one of {', '.join(BATCHNORM_MODES)}")
    # peak_memory_mb and threads are absent in older logs; when present they must make sense
    if job.get("peak_memory_mb") is not None and not job["peak_memory_mb"] >= 0:
        raise ShardRejected(f"job peak_memory_mb {job['peak_memory_mb']!r} is not a size in MiB")
    if job.get("threads") is not None and not job["threads"] >= 1:
        raise ShardRejected(f"job threads {job['threads']!r} is not a positive count")
    try:
        ids = _checkpoint_ids(job)
    except ValueError as e:
        raise ShardRejected(f"job {job['id']!r}: {e}") from None
    if job["id"] != job_id(job["probe"], job["version"], job["params_hash"], ids, job["role"]):
        raise ShardRejected(f"job id {job['id']!r} does not match its probe, version, params, checkpoints and role")
    allowed = set(tables_of(job["probe"]))
    for p in sorted(shard.path.iterdir()):
        if p.name == META:
            continue
        table = p.name[: -len(".parquet")] if p.name.endswith(".parquet") else None
        if table not in allowed or p.is_symlink() or not p.is_file():
            raise ShardRejected(f"unexpected file {p.name!r}: probe {job['probe']} writes only "
                                f"{', '.join(t + '.parquet' for t in sorted(allowed))}")
        if job["state"] != "done":
            raise ShardRejected(f"a {job['state']} job carries result file {p.name}")
        shard.tables[table] = _read_result(p, table, job)


def _read_result(path: Path, table: str, job: dict):
    """One result file: readable, the table's own columns and types, every row keyed to ``job``."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from lsdb.schema import Base

    try:
        data = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        raise ShardRejected(f"{path.name} is not a readable Parquet file ({_first_line(e)})") from None
    schema = arrow_schema(table)
    unknown = [c for c in data.column_names if c not in schema.names]
    if unknown:
        raise ShardRejected(f"{path.name}: table {table} has no column {unknown[0]!r}")
    try:
        data = data.cast(pa.schema([schema.field(c) for c in data.column_names]))
    except (pa.ArrowException, ValueError) as e:
        raise ShardRejected(f"{path.name}: wrong column types ({_first_line(e)})") from None
    for col in Base.metadata.tables[table].columns:
        if not col.nullable and (col.name not in data.column_names or data[col.name].null_count):
            raise ShardRejected(f"{path.name}: column {col.name} is missing or has nulls")
    keys = {"job_id": job["id"], "checkpoint_id": job["checkpoint_id"],
            "anchor_checkpoint_id": job["anchor_checkpoint_id"], "other_checkpoint_id": job.get("other_checkpoint_id")}
    for col, want in keys.items():
        values = data[col]
        same = values.null_count == len(values) if want is None else \
            values.null_count == 0 and pc.all(pc.equal(values, want)).as_py() in (True, None)
        if not same:
            raise ShardRejected(f"{path.name}: rows with {col} other than the shard's job ({want})")
    if len(pc.unique(data["idx"])) != data.num_rows:
        raise ShardRejected(f"{path.name}: idx repeats")
    return data


_CHECKS = {"experiment": _check_experiment, "checkpoint": _check_checkpoint, "run_status": _check_status,
           "probe": _check_probe}


def _checkpoint_ids(job: dict) -> tuple[str, ...]:
    return job_checkpoint_ids(job["checkpoint_id"], job.get("other_checkpoint_id"), job.get("more_checkpoint_ids"))


def _job_checkpoints(job: dict) -> list[str]:
    """Every checkpoint a job names (checked ids only: ``_check_probe`` ran first)."""
    return [*_checkpoint_ids(job), job["anchor_checkpoint_id"]]


def _typed(table: str, rows: list[dict]):
    """``rows`` as an Arrow table of ``table``'s columns and types; ShardRejected when a row has
    a column the table lacks, lacks a required one, or holds a value of the wrong type."""
    import pyarrow as pa

    from lsdb.schema import Base

    columns = Base.metadata.tables[table].columns
    schema = arrow_schema(table)
    clean = []
    for row in rows:
        if not isinstance(row, dict):
            raise ShardRejected(f"a {table} row is not a table")
        unknown = [k for k in row if k not in schema.names]
        if unknown:
            raise ShardRejected(f"table {table} has no column {unknown[0]!r}")
        r = dict(row)
        for col in columns:
            v = r.get(col.name)
            if v is None and not col.nullable and not (col.name == "created_at" and table == "checkpoint"):
                raise ShardRejected(f"{table} row lacks {col.name}")
            if isinstance(v, str) and schema.field(col.name).type == pa.timestamp("us"):
                try:
                    r[col.name] = datetime.fromisoformat(v)
                except ValueError:
                    raise ShardRejected(f"{table}.{col.name} = {v!r} is not a timestamp") from None
            if isinstance(v, bool) and not pa.types.is_boolean(schema.field(col.name).type):
                raise ShardRejected(f"{table}.{col.name} = {v!r} has the wrong type")
        clean.append(r)
    present = [f for f in schema if any(f.name in r for r in clean)]
    try:
        return pa.Table.from_pylist(clean, schema=pa.schema(present))
    except (pa.ArrowException, TypeError, ValueError, OverflowError) as e:
        raise ShardRejected(f"{table} row with a value of the wrong type ({_first_line(e)})") from None


def _reject(store, shard: Path, reason: str, report: IngestReport, move: bool = True) -> None:
    """Set ``shard`` aside in ``spool/rejected/`` with ``REJECTED.txt`` saying why (in the log,
    during a rebuild, it is only reported)."""
    report.rejected.append(f"{shard.name}: {reason}")
    if not move:
        return
    target = store.spool / REJECTED
    target.mkdir(exist_ok=True)
    dest = target / shard.name
    n = 1
    while dest.exists():
        dest = target / f"{shard.name}~{n}"
        n += 1
    os.replace(shard, dest)
    try:
        (dest / REASON_FILE).write_text(reason + "\n")
    except OSError:
        pass


def _first_line(e) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
