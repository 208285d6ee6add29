"""Shared fixtures: tiny real specs and stores under tmp_path (real DuckDB files, real training)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lsdb picks torch threads from the cores free when work starts (probes.executors.free_cores), and
# results differ in the last digits between thread counts: tests that compare two runs' rows bit
# for bit pin the count, for this process and every subprocess it starts.
os.environ.setdefault("LSDB_THREADS", "2")

# A real but tiny study: sklearn digits, an MLP, 2 seeds, one spawn time with 2 children.
TINY_SPEC = """
[experiment]
name = "tiny"
seeds = [0, 1]

[data]
name = "digits"
probe_set_size = 32

[model]
name = "mlp"
width = 32
depth = 1

[optim]
lr = 0.05
batch_size = 128
epochs = 3
lr_drops = [2.0]

[checkpoints]
log_points = 3
log_until = 0.5
every_epochs = 1

[spawn]
times = [1.0]
children = 2

[probes.eval]
max_train = 256

[probes.weights]
"""


@pytest.fixture
def tiny_spec_path(tmp_path) -> Path:
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_SPEC)
    return p


@pytest.fixture
def store(tmp_path):
    from lsdb.store import Store

    return Store.init(tmp_path / "store")


def lsdb_cmd() -> list[str]:
    """The installed console script, run as a subprocess (what a user types)."""
    exe = Path(sys.executable).with_name("lsdb")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "lsdb.cli"]


@pytest.fixture
def cli_env(tmp_path):
    env = dict(os.environ)
    env.pop("LSDB_STORE", None)
    return env


# Columns that record when or where something ran, not what was measured.
VOLATILE = frozenset({"created_at", "started_at", "seconds", "worker", "device", "applied_at", "peak_memory_mb",
                      "threads"})


def stored_rows(root, tables, skip=()) -> dict[str, list]:
    """Every row of ``tables`` in the store at ``root``, without the volatile columns or ``skip``,
    in a stable order: what two runs of one study must agree on."""
    import lsdb

    db = lsdb.open(root)
    out = {}
    for table in tables:
        cols = [c for c in db.sql(f"SELECT * FROM {table} LIMIT 0").columns if c not in VOLATILE and c not in skip]
        quoted = ", ".join(f'"{c}"' for c in cols)  # some columns are keywords (lambda)
        out[table] = db.sql(f"SELECT {quoted} FROM {table} ORDER BY ALL").rows()
    return out


def row_differences(a: dict, b: dict, tolerance=lambda table: None) -> list[str]:
    """Where two ``stored_rows`` differ. Floats of a table compare with ``math.isclose(**tolerance(table))``
    when it gives keyword arguments, bit for bit when it gives None; everything else exactly."""
    import math

    out = []
    for table in a:
        if len(a[table]) != len(b.get(table, ())):
            out.append(f"{table}: {len(a[table])} rows vs {len(b.get(table, ()))}")
            continue
        tol = tolerance(table)
        for ra, rb in zip(a[table], b[table]):
            for x, y in zip(ra, rb):
                if isinstance(x, float) and isinstance(y, float) and (math.isnan(x) and math.isnan(y)):
                    continue
                if isinstance(x, float) and isinstance(y, float) and tol is not None:
                    ok = math.isclose(x, y, **tol)
                else:
                    ok = x == y
                if not ok:
                    out.append(f"{table}: {x!r} vs {y!r} in {ra[:2]}")
    return out


def module_on_path(folder: Path, name: str, source: str, monkeypatch):
    """Write ``source`` as module ``name`` in ``folder`` and put the folder on ``$LSDB_PATH`` (what
    ``lsdb run --path`` does), for specs naming a model or data factory. Yields the folder; the
    module is forgotten afterwards, so the next test imports its own copy."""
    from lsdb.train import factories

    folder.mkdir()
    (folder / f"{name}.py").write_text(source)
    monkeypatch.setenv(factories.PATH_VAR, str(folder))
    yield folder
    sys.modules.pop(name, None)
