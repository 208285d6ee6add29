"""Shard ingest vs four ways of inserting the same rows, measured in the same process.

    python benchmarks/ingest.py [--shards 200] [--rows 5000] [--repeats 3]

Workers write ``shards`` spool shards of ``rows`` rows each to the ``eval`` table (4 metric
columns per row) with ``lsdb.spool.write_shard``. Every round then inserts the same rows into a
fresh store (same schema, indexes and file-backed DuckDB database, one transaction, commit
included) by each path, in an order rotated from round to round:

1. ``lsdb ingest``: shards on disk → read with pyarrow → validated (meta, job id, schema, types,
   keys, idx) → ``INSERT … BY NAME`` from Arrow → shards moved to ``spool/ingested/``;
2. row-by-row SQLAlchemy ``insert()`` (a sample of the rows);
3. DuckDB ``executemany`` of one prepared ``INSERT`` over parameter tuples (a sample);
4. DuckDB's Arrow insert: the rows already in memory as one pyarrow Table, ``register`` +
   ``INSERT … BY NAME SELECT``;
5. DuckDB ``read_parquet([...])`` over the shards' files: the pre-validation ingest path.

Paths 2–5 validate nothing and move no files; 2 and 3 are timed on a sample and scaled. Rows/s
and metric values/s (rows × metric columns) are printed separately, with the median and range over
rounds, and lsdb's rate over each baseline's as per-round ratios (median, range). Also printed:
how long reading and validating the shards takes without the database, and what declaring
foreign keys on a result table would cost (why lsdb's result tables do not).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from lsdb.ids import job_id, utcnow
from lsdb.ingest.ingest import ingest
from lsdb.schema.base import metrics_of
from lsdb.schema.probes import EvalResult
from lsdb.spool import arrow_schema, pending_shards, write_shard
from lsdb.store import Store

TABLE = EvalResult.__tablename__
METRICS_PER_ROW = len(metrics_of(EvalResult.__table__))  # train/test loss/error
PARAMS_HASH = "bench"


# ------------------------------------------------------------------------------ data

def seed_store(store: Store, n_checkpoints: int) -> list[str]:
    """Minimal experiment/run/checkpoint rows so the probe shards' checkpoints are stored."""
    with store.write() as conn:
        con = conn.connection.driver_connection
        con.execute("INSERT INTO experiment (id, name, spec_toml, dataset, probe_set_size, probe_set_seed, "
                    "probe_set_sha256, created_at) VALUES ('e', 'bench', '', 'digits', 1, 0, '', now())")
        con.execute("INSERT INTO run (id, experiment_id, variant, kind, seed, data_seed, dataset, train_subset, model, "
                    "width, depth, kernels, patches, num_params, lr, momentum, weight_decay, batch_size, epochs, "
                    "lr_drops, lr_drop_factor, adversarial, adv_epsilon, adv_steps, adv_mix, steps_per_epoch, "
                    "total_steps, status, config_json) VALUES ('r', 'e', 'base', 'parent', 0, 0, 'digits', 0, 'mlp', "
                    "1, 1, '', 1, 1, 0.1, 0.9, 0, 64, 1, '', 0.1, 'none', 0, 1, 0, 1, 1, 'finished', '{}')")
        con.execute("INSERT INTO checkpoint (id, run_id, step, epoch, frac, sha256, has_optimizer, optimizer_sha256, "
                    "lr, train_loss, train_error, test_loss, test_error, created_at) "
                    "SELECT 'ck' || lpad(i::VARCHAR, 6, '0'), 'r', i, i, 0, repeat('0', 64), false, repeat('0', 64), "
                    "0.1, 0, 0, 0, 0, now() FROM range(?) t(i)", [n_checkpoints])
    return [f"ck{i:06d}" for i in range(n_checkpoints)]


def job_meta(ckpt: str) -> dict:
    jid = job_id("eval", 1, PARAMS_HASH, (ckpt,), "self")
    return {"kind": "probe", "job": dict(
        id=jid, probe="eval", version=1, params_hash=PARAMS_HASH, params_json="{}", role="self",
        checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=ckpt, inputs_json="{}", state="done",
        attempts=1, error=None, worker="bench", device="cpu", started_at=utcnow().isoformat(), seconds=0.0)}


def rows_for(job: str, ckpt: str, n: int, rng) -> list[dict]:
    v = rng.random((n, 4))
    return [dict(job_id=job, idx=k, checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=ckpt,
                 n_train=1, n_test=1, train_loss=v[k, 0], train_error=v[k, 1], test_loss=v[k, 2], test_error=v[k, 3])
            for k in range(n)]


def fresh_store(root: Path, n_checkpoints: int) -> Store:
    store = Store.init(root)
    seed_store(store, n_checkpoints)
    return store


def count(store: Store) -> int:
    with store.read() as con:
        return con.execute(f'SELECT count(*) FROM "{TABLE}"').fetchone()[0]


# ------------------------------------------------------------------------------ paths

def run_lsdb(store: Store, template: Path, n_rows: int) -> tuple[int, float]:
    for shard in template.iterdir():  # untimed: what workers would have written to this spool
        shutil.copytree(shard, store.spool / shard.name)
    gc.collect()
    t0 = time.perf_counter()
    report = ingest(store)
    dt = time.perf_counter() - t0
    assert not report.rejected, report.rejected[:3]
    assert report.rows.get(TABLE) == n_rows and not pending_shards(store.spool)
    return n_rows, dt


def run_sqlalchemy(store: Store, dicts: list[dict]) -> tuple[int, float]:
    gc.collect()
    t0 = time.perf_counter()
    with store.write() as conn:
        for r in dicts:
            conn.execute(sa.insert(EvalResult).values(**r))
    return len(dicts), time.perf_counter() - t0


def run_executemany(store: Store, columns: list[str], tuples: list[tuple]) -> tuple[int, float]:
    sql = (f'INSERT INTO "{TABLE}" ({", ".join(columns)}) VALUES ({", ".join("?" for _ in columns)})')
    gc.collect()
    t0 = time.perf_counter()
    with store.write() as conn:
        conn.connection.driver_connection.executemany(sql, tuples)
    return len(tuples), time.perf_counter() - t0


def run_arrow(store: Store, table) -> tuple[int, float]:
    gc.collect()
    t0 = time.perf_counter()
    with store.write() as conn:
        con = conn.connection.driver_connection
        con.register("bench_rows", table)
        con.execute(f'INSERT INTO "{TABLE}" BY NAME SELECT * FROM bench_rows')
        con.unregister("bench_rows")
    return table.num_rows, time.perf_counter() - t0


def run_read_parquet(store: Store, files: list[str], n_rows: int) -> tuple[int, float]:
    gc.collect()
    t0 = time.perf_counter()
    with store.write() as conn:
        conn.connection.driver_connection.execute(
            f'INSERT INTO "{TABLE}" BY NAME SELECT * FROM read_parquet(?)', [files])
    return n_rows, time.perf_counter() - t0


def run_path(name, store, template, files, n_rows, table, dicts, columns, tuples) -> tuple[int, float]:
    """Insert the rows into ``store`` by path ``name``; (rows inserted, seconds)."""
    if name == "lsdb":
        res = run_lsdb(store, template, n_rows)
    elif name == "sqlalchemy":
        res = run_sqlalchemy(store, dicts)
    elif name == "executemany":
        res = run_executemany(store, columns, tuples)
    elif name == "arrow":
        res = run_arrow(store, table)
    else:
        res = run_read_parquet(store, files, n_rows)
    stored = count(store)
    assert stored == res[0], (name, stored, res[0])
    return res


def validate_only(template: Path) -> float:
    """Seconds to read and validate every shard of ``template`` without the database (the part
    of ``ingest`` the unvalidated paths skip); NaN if ingest's internals have moved."""
    try:
        from lsdb.ingest.ingest import _read_shard
    except ImportError:
        return float("nan")
    paths = pending_shards(template)
    gc.collect()
    t0 = time.perf_counter()
    for p in paths:
        _read_shard(p)
    return time.perf_counter() - t0


def foreign_key_cost(rows: int = 500_000) -> tuple[float, float]:
    """Seconds to insert ``rows`` result rows into a table with only its primary key vs one that
    also declares foreign keys to its job and checkpoints (why lsdb's result tables do not)."""
    import duckdb
    import pyarrow as pa

    jobs = 100
    per = rows // jobs
    rows_tbl = pa.table({
        "job_id": np.repeat(np.array([f"job{i:08d}" for i in range(jobs)]), per),
        "idx": np.tile(np.arange(per), jobs),
        "ck": np.repeat(np.array([f"ck{i:06d}" for i in range(jobs)]), per),
        "v": np.random.default_rng(0).random(jobs * per),
    })
    out = []
    for fk in (False, True):
        con = duckdb.connect()
        con.execute("CREATE TABLE j(id VARCHAR PRIMARY KEY); CREATE TABLE c(id VARCHAR PRIMARY KEY)")
        con.execute("INSERT INTO j SELECT 'job' || lpad(i::VARCHAR, 8, '0') FROM range(?) t(i)", [jobs])
        con.execute("INSERT INTO c SELECT 'ck' || lpad(i::VARCHAR, 6, '0') FROM range(?) t(i)", [jobs])
        refs = (" REFERENCES j(id)", " REFERENCES c(id)") if fk else ("", "")
        con.execute(f"CREATE TABLE r(job_id VARCHAR{refs[0]}, idx INTEGER, ck VARCHAR{refs[1]}, v DOUBLE, "
                    "PRIMARY KEY (job_id, idx))")
        con.register("rows_tbl", rows_tbl)
        t0 = time.perf_counter()
        con.execute("INSERT INTO r SELECT * FROM rows_tbl")
        out.append(time.perf_counter() - t0)
        con.close()
    return out[0], out[1]


# ------------------------------------------------------------------------------ report

PATHS = {  # key: (label, validates, moves files)
    "lsdb": ("lsdb ingest(): shards → pyarrow → validated → INSERT BY NAME from Arrow", "yes", "yes"),
    "read_parquet": ("DuckDB INSERT … SELECT FROM read_parquet([...]) (pre-validation ingest)", "no", "no"),
    "arrow": ("DuckDB Arrow insert, rows in memory as one pyarrow Table", "no", "no"),
    "executemany": ("DuckDB executemany, one prepared INSERT (sample)", "no", "no"),
    "sqlalchemy": ("SQLAlchemy insert() row by row, one transaction (sample)", "no", "no"),
}


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}–{format(max(values), fmt)})"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rows", type=int, default=5000, help="rows per shard")
    ap.add_argument("--repeats", type=int, default=3, help="rounds; every path runs once per round")
    ap.add_argument("--baseline-rows", type=int, default=1500,
                    help="rows inserted by the two one-statement-per-row baselines (sqlalchemy, executemany)")
    ap.add_argument("--fk-rows", type=int, default=500_000)
    args = ap.parse_args(argv)
    import pyarrow as pa
    import pyarrow.parquet as pq

    n_rows = args.shards * args.rows
    load_start = os.getloadavg()
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    results: dict[str, list[tuple[int, float]]] = {k: [] for k in PATHS}
    validation: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        template = tmp / "template"  # the shards, written once by the workers' own writer
        template.mkdir()
        ckpts = [f"ck{i:06d}" for i in range(args.shards)]
        for ck in ckpts:
            meta = job_meta(ck)
            jid = meta["job"]["id"]
            write_shard(template, f"job-{jid}", meta, {TABLE: rows_for(jid, ck, args.rows, rng)})
        files = sorted(str(p) for p in template.glob(f"*/{TABLE}.parquet"))
        # the same rows in memory: one Arrow table (in the table's own schema) and samples as Python rows
        table = pa.concat_tables([pq.read_table(f) for f in files])
        assert table.num_rows == n_rows and table.schema.equals(arrow_schema(TABLE))
        sample = table.slice(0, min(args.baseline_rows, n_rows))
        dicts = sample.to_pylist()
        columns = sample.column_names
        tuples = [tuple(r[c] for c in columns) for r in dicts]

        # warm-up, untimed: first imports (ingest loads the probe registry) and first statements
        one = tmp / "warm-up"
        one.mkdir()
        first = next(template.iterdir())
        shutil.copytree(first, one / first.name)
        n_one = pq.read_metadata(first / f"{TABLE}.parquet").num_rows
        for name in PATHS:
            store = fresh_store(tmp / f"store-warm-{name}", args.shards)
            run_path(name, store, one, [str(first / f"{TABLE}.parquet")], n_one, table.slice(0, n_one),
                     dicts[:10], columns, tuples[:10])
            shutil.rmtree(store.root)

        order = list(PATHS)
        for rnd in range(args.repeats):
            k = rnd % len(order)
            for name in order[k:] + order[:k]:  # interleaved: each round starts with another path
                store = fresh_store(tmp / f"store-{rnd}-{name}", args.shards)
                results[name].append(run_path(name, store, template, files, n_rows, table, dicts, columns, tuples))
                shutil.rmtree(store.root)
            validation.append(validate_only(template))

    fks = [foreign_key_cost(args.fk_rows) for _ in range(args.repeats)]
    load_end = os.getloadavg()

    rate = {k: [n / dt for n, dt in v] for k, v in results.items()}
    print(f"{args.shards} shards × {args.rows:,} rows = {n_rows:,} eval rows "
          f"({n_rows * METRICS_PER_ROW:,} metric values, {METRICS_PER_ROW} per row); {args.repeats} rounds, "
          f"paths interleaved; load average {load_start[0]:.1f} at start, {load_end[0]:.1f} at end, "
          f"{os.cpu_count()} CPUs; median (min–max) over rounds")
    print()
    print("| path | validates | moves shards | rows timed | rows/s | metric values/s | lsdb ÷ this |")
    print("|---|---|---|---|---|---|---|")
    for name, (label, validates, moves) in PATHS.items():
        n = results[name][0][0]
        ratios = [a / b for a, b in zip(rate["lsdb"], rate[name])]
        ratio = "—" if name == "lsdb" else spread(ratios, ",.2f" if statistics.median(ratios) < 10 else ",.0f") + "×"
        print(f"| {label} | {validates} | {moves} | {n:,} | {spread(rate[name], ',.0f')} | "
              f"{spread([r * METRICS_PER_ROW for r in rate[name]], ',.0f')} | {ratio} |")
    print()
    t_lsdb = [dt for _, dt in results["lsdb"]]
    print(f"lsdb ingest: {spread(t_lsdb, '.2f')} s for {n_rows:,} rows, of which reading and validating the "
          f"shards alone (no database) takes {spread(validation, '.2f')} s")
    pk, fk = [a for a, _ in fks], [b for _, b in fks]
    print(f"declared foreign keys: {args.fk_rows:,} rows in {spread(fk, '.2f')} s vs {spread(pk, '.2f')} s with "
          f"the primary key only ({spread([b / a for a, b in fks], '.1f')}× slower)")
    fast = statistics.median(rate["lsdb"]) * METRICS_PER_ROW
    slow = statistics.median([a / b for a, b in zip(rate["lsdb"], rate["sqlalchemy"])])
    print(f"targets: ≥ 1,000,000 metric values/s [{'met' if fast >= 1e6 else 'MISSED'}], ≥ 100× row-by-row "
          f"SQLAlchemy [{'met' if slow >= 100 else 'MISSED'}]; wall time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
