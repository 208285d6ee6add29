"""Shard ingest rate vs row-by-row SQLAlchemy inserts, measured in the same run.

    python benchmarks/ingest.py [--shards 200] [--rows 5000]

Writes ``shards`` spool shards of ``rows`` rows each to the ``eval`` table (4 metric columns per
row), ingests them with lsdb's single writer, then inserts a sample of the same rows one
``INSERT`` at a time through SQLAlchemy. Prints metric rows/s for both and the ratio.
Targets (issue 2): ≥ 1,000,000 metric rows/s and ≥ 100× the row-by-row path.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import sqlalchemy as sa

from lsdb.ingest.ingest import ingest
from lsdb.spool import write_shard
from lsdb.schema.probes import EvalResult
from lsdb.ids import utcnow
from lsdb.store import Store

METRICS_PER_ROW = 4  # train/test loss/error


def seed_store(store: Store, n_checkpoints: int) -> list[str]:
    """Minimal experiment/run/checkpoint rows so result rows satisfy their foreign keys."""
    ids = [f"ck{i:06d}" for i in range(n_checkpoints)]
    with store.write() as conn:
        con = conn.connection.driver_connection
        con.execute("INSERT INTO experiment VALUES ('e', 'bench', '', 'digits', 1, 0, '', now())")
        con.execute("INSERT INTO run (id, experiment_id, variant, kind, seed, data_seed, dataset, train_subset, model, "
                    "width, depth, kernels, patches, num_params, lr, momentum, weight_decay, batch_size, epochs, "
                    "lr_drops, lr_drop_factor, adversarial, adv_epsilon, adv_steps, adv_mix, steps_per_epoch, "
                    "total_steps, status, config_json) VALUES ('r', 'e', 'base', 'parent', 0, 0, 'digits', 0, 'mlp', "
                    "1, 1, '', 1, 1, 0.1, 0.9, 0, 64, 1, '', 0.1, 'none', 0, 1, 0, 1, 1, 'finished', '{}')")
        con.execute("INSERT INTO checkpoint SELECT 'ck' || lpad(i::VARCHAR, 6, '0'), 'r', i, i, 0, 'x', false, 0.1, "
                    "0, 0, 0, 0, now() FROM range(?) t(i)", [n_checkpoints])
    return ids


def job_meta(i: int, ckpt: str) -> dict:
    return {"kind": "probe", "job": dict(
        id=f"job{i:08d}", probe="eval", version=1, params_hash="p", params_json="{}", role="self",
        checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=ckpt, inputs_json="{}", state="done",
        attempts=1, error=None, worker="bench", device="cpu", started_at=utcnow().isoformat(), seconds=0.0)}


def rows_for(job: str, ckpt: str, n: int, rng) -> list[dict]:
    v = rng.random((n, 4))
    return [dict(job_id=job, idx=k, checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=ckpt,
                 n_train=1, n_test=1, train_loss=v[k, 0], train_error=v[k, 1], test_loss=v[k, 2], test_error=v[k, 3])
            for k in range(n)]


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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=200)
    ap.add_argument("--rows", type=int, default=5000)
    ap.add_argument("--baseline-rows", type=int, default=3000)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.init(Path(tmp) / "store")
        ckpts = seed_store(store, args.shards + 1)
        for i in range(args.shards):
            write_shard(store.spool, f"job-{i}", job_meta(i, ckpts[i]), {"eval": rows_for(f"job{i:08d}", ckpts[i], args.rows, rng)})
        t0 = time.perf_counter()
        report = ingest(store)
        t_ingest = time.perf_counter() - t0
        assert report.rows["eval"] == args.shards * args.rows
        fast = report.rows["eval"] * METRICS_PER_ROW / t_ingest

        # baseline: the same kind of rows, one INSERT per row through SQLAlchemy, one transaction
        base_job = "jobbaseline"
        with store.write() as conn:
            conn.connection.driver_connection.execute(
                "INSERT INTO probe_job VALUES (?, 'eval', 1, 'p', '{}', 'self', ?, NULL, ?, '{}', 'done', 1, NULL, "
                "'bench', 'cpu', now(), 0)", [base_job, ckpts[-1], ckpts[-1]])
        rows = rows_for(base_job, ckpts[-1], args.baseline_rows, rng)
        t0 = time.perf_counter()
        with store.write() as conn:
            for r in rows:
                conn.execute(sa.insert(EvalResult).values(**r))
        t_slow = time.perf_counter() - t0
        slow = len(rows) * METRICS_PER_ROW / t_slow

    print(f"shard ingest: {args.shards} shards x {args.rows} rows = {report.rows['eval']:,} rows "
          f"({report.rows['eval'] * METRICS_PER_ROW:,} metric values) in {t_ingest:.2f} s -> {fast:,.0f} metric rows/s")
    print(f"row-by-row SQLAlchemy: {len(rows):,} rows in {t_slow:.2f} s -> {slow:,.0f} metric rows/s")
    pk_only, with_fk = foreign_key_cost()
    print(f"declared foreign keys: 500,000 rows in {with_fk:.2f} s vs {pk_only:.2f} s with the primary key only "
          f"({with_fk / pk_only:.1f}x slower)")
    print(f"ratio: {fast / slow:,.0f}x   targets: >= 1,000,000 metric rows/s "
          f"[{'met' if fast >= 1e6 else 'MISSED'}], >= 100x [{'met' if fast / slow >= 100 else 'MISSED'}]")


if __name__ == "__main__":
    main()
