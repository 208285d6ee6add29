"""Spool shards: the only thing workers write besides checkpoint and artifact files.

A shard is a directory ``spool/<name>.<unique>/`` holding ``meta.json`` and one Parquet file per
result table. It is built under a temporary name, every file fsynced, then renamed in one step, so
the ingester sees a whole shard or none. Every shard name is unique (a retried job writes a new
shard beside the failed one), and ingested shards move to ``spool/ingested/``, which is never
pruned: it is the log the database is rebuilt from (``lsdb rebuild``). Shards are untrusted input
(workers on other machines write them): ``lsdb.ingest.ingest`` validates each before use.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from pathlib import Path

from lsdb import faults
from lsdb.atomic import abandoned, fsync, is_temp, temp_path

META = "meta.json"
_SEQUENCE = itertools.count()


def arrow_schema(table_name: str):
    """The Arrow schema of a result table, from its SQLAlchemy definition (types stay exact)."""
    import pyarrow as pa
    import sqlalchemy as sa

    from lsdb.schema import Base

    table = Base.metadata.tables[table_name]
    fields = []
    for col in table.columns:
        t = col.type
        if isinstance(t, sa.Boolean):
            at = pa.bool_()
        elif isinstance(t, sa.Integer):
            at = pa.int64()
        elif isinstance(t, (sa.Float, sa.Double, sa.Numeric)):
            at = pa.float64()
        elif isinstance(t, sa.DateTime):
            at = pa.timestamp("us")
        else:
            at = pa.string()
        fields.append(pa.field(col.name, at))
    return pa.schema(fields)


def write_shard(spool: Path, name: str, meta: dict, tables: dict[str, list[dict]] | None = None) -> Path:
    """Write shard ``<name>.<unique suffix>`` atomically; returns its final path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    spool = Path(spool)
    final = spool / f"{name}.{time.time_ns():016x}-{os.getpid()}-{next(_SEQUENCE)}"
    tmp = temp_path(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for table_name, rows in (tables or {}).items():
        if not rows:
            continue
        schema = arrow_schema(table_name)
        unknown = set().union(*rows) - set(schema.names)
        if unknown:
            raise ValueError(f"table {table_name} has no columns {sorted(unknown)}")
        columns = {f.name: [r.get(f.name) for r in rows] for f in schema}
        pq.write_table(pa.table(columns, schema=schema), tmp / f"{table_name}.parquet")
        fsync(tmp / f"{table_name}.parquet")
    (tmp / META).write_text(json.dumps(meta, default=str))
    fsync(tmp / META)
    fsync(tmp)
    faults.point("shard_before_rename")
    os.rename(tmp, final)
    fsync(spool)
    return final


def shard_key(shard: Path) -> str:
    """The part of a shard's name before its unique suffix (``job-<id>``, ``ckpt-<id>`` …)."""
    return Path(shard).name.split(".", 1)[0]


def write_experiment_shard(spool: Path, experiment: dict, runs: list[dict], links: list[str]) -> Path:
    """The shard that records an experiment, the runs the store lacks (parents before children)
    and the ids of every run the experiment declares (``links``)."""
    return write_shard(spool, f"exp-{experiment['id'][:16]}", {"kind": "experiment", "experiment": experiment,
                                                               "runs": runs, "links": links})


def write_checkpoint_shard(spool: Path, row: dict) -> Path:
    """The shard that records one checkpoint row (written by the trainer and by ``Recorder``)."""
    return write_shard(spool, f"ckpt-{row['id']}", {"kind": "checkpoint", "row": row})


def write_status_shard(spool: Path, run_id: str, status: str, diverged_step: int | None = None,
                       reason: str | None = None) -> Path:
    """The shard that ends a run: finished, or diverged at a step for a reason."""
    return write_shard(spool, f"status-{run_id}",
                       {"kind": "run_status", "run_id": run_id, "status": status,
                        "diverged_step": diverged_step, "diverged_reason": reason})


def pending_shards(spool: Path) -> list[Path]:
    spool = Path(spool)
    if not spool.exists():
        return []
    return sorted(p for p in spool.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and p.name not in ("ingested", "rejected") and (p / META).exists())


def read_meta(shard: Path) -> dict:
    return json.loads((Path(shard) / META).read_text())


def retire(shard: Path, ingested: Path) -> None:
    """Move an ingested shard into the log. Names are unique per write, so a shard of the same
    name in the log is this very shard (copied back, or ingested twice): the copy goes, the log
    keeps its own."""
    ingested.mkdir(parents=True, exist_ok=True)
    if (ingested / shard.name).exists():
        shutil.rmtree(shard)
    else:
        os.rename(shard, ingested / shard.name)


def log_shards(spool: Path) -> list[Path]:
    """Every shard of the ingested log."""
    log = Path(spool) / "ingested"
    return sorted(p for p in log.iterdir() if p.is_dir() and (p / META).exists()) if log.exists() else []


def clean_temporaries(store) -> list[Path]:
    """Remove what killed writers left half-written: temporary shards, checkpoint and artifact
    files never renamed into place (``lsdb.atomic.abandoned``). Returns what was removed."""
    removed = []
    for folder in (store.spool, store.checkpoints, store.artifacts_dir):
        if not Path(folder).exists():
            continue
        for p in Path(folder).iterdir():
            if not is_temp(p) or not abandoned(p):
                continue
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            removed.append(p)
    return removed
