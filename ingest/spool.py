"""Spool shards: the only thing workers write besides checkpoint and artifact files.

A shard is a directory ``spool/<name>/`` holding ``meta.json`` and one Parquet file per result
table. It is built under a temporary name, every file fsynced, then renamed in one step, so the
ingester sees a whole shard or none. Ingested shards move to ``spool/ingested/``: they are the log
the database can be rebuilt from.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

META = "meta.json"


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
    import pyarrow as pa
    import pyarrow.parquet as pq

    spool = Path(spool)
    final = spool / name
    tmp = spool / f".tmp-{name}-{os.getpid()}"
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
        _fsync(tmp / f"{table_name}.parquet")
    (tmp / META).write_text(json.dumps(meta, default=str))
    _fsync(tmp / META)
    _fsync(tmp)
    if final.exists():  # the same job done twice (e.g. a retried worker): keep the first
        shutil.rmtree(tmp)
        return final
    os.rename(tmp, final)
    _fsync(spool)
    return final


def write_checkpoint_shard(spool: Path, row: dict) -> Path:
    """The shard that records one checkpoint row (written by the trainer and by ``Recorder``)."""
    return write_shard(spool, f"ckpt-{row['id']}", {"kind": "checkpoint", "row": row})


def write_status_shard(spool: Path, run_id: str, status: str, diverged_step: int | None = None,
                       reason: str | None = None) -> Path:
    """The shard that ends a run: finished, or diverged at a step for a reason."""
    import time

    return write_shard(spool, f"status-{run_id}-{int(time.time() * 1e6)}",
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
    ingested.mkdir(parents=True, exist_ok=True)
    target = ingested / shard.name
    if target.exists():
        shutil.rmtree(shard)
    else:
        os.rename(shard, target)


def clean_temporaries(spool: Path) -> None:
    """Remove half-written shards left by killed workers (never renamed). A temporary whose
    writer (the PID at the end of its name) is still alive on this machine is left alone."""
    for p in Path(spool).glob(".tmp-*"):
        pid = p.name.rsplit("-", 1)[-1]
        if pid.isdigit() and _alive(int(pid)):
            continue
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
