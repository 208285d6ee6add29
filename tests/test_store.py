"""The store: layout, schema versions, and DuckDB's one-writer lock seen from another process."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time

import pytest

from lsdb.errors import StoreError, StoreLocked
from lsdb.store import SUBDIRS, Store


def test_init_makes_the_layout_and_is_idempotent(tmp_path):
    s = Store.init(tmp_path / "st")
    for sub in SUBDIRS:
        assert (s.root / sub).is_dir()
    assert s.db_path.exists()
    Store.init(tmp_path / "st")  # again: no error, no duplicate version rows
    with s.read() as con:
        assert con.execute("SELECT count(*) FROM schema_version").fetchone()[0] == 1


def test_typed_tables_keys_and_indexes(tmp_path):
    s = Store.init(tmp_path / "st")
    with s.read() as con:
        cols = dict(con.execute("SELECT column_name, data_type FROM information_schema.columns "
                                "WHERE table_name = 'run'").fetchall())
        assert cols["lr"] == "DOUBLE" and cols["batch_size"] == "INTEGER" and cols["spawn_epoch"] == "DOUBLE"
        fks = con.execute("SELECT constraint_text FROM duckdb_constraints() WHERE table_name = 'checkpoint' "
                          "AND constraint_type = 'FOREIGN KEY'").fetchall()
        assert fks
        idx = [r[0] for r in con.execute("SELECT index_name FROM duckdb_indexes() WHERE table_name = 'checkpoint'").fetchall()]
        assert "ix_checkpoint_run_step" in idx


def test_newer_schema_is_refused(tmp_path):
    s = Store.init(tmp_path / "st")
    with s.write() as conn:
        conn.connection.driver_connection.execute("INSERT INTO schema_version VALUES (999, now(), 'future')")
    with pytest.raises(StoreError, match="newer lsdb"):
        Store.open(s.root)


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="lsdb init"):
        Store.open(tmp_path / "nothing")


@contextlib.contextmanager
def database_held(store):
    """Another process holding the store's database file open read-write (for 30 s at most)."""
    holder = subprocess.Popen([sys.executable, "-c",
                               f"import duckdb, time; c = duckdb.connect({str(store.db_path)!r}); "
                               f"print('ok', flush=True); time.sleep(30)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ok"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def test_reader_names_the_process_holding_the_file(tmp_path):
    s = Store.init(tmp_path / "st")
    with database_held(s) as holder:
        t0 = time.monotonic()
        with pytest.raises(StoreLocked) as e:
            with s.read(timeout=1.0):
                pass
        assert time.monotonic() - t0 >= 1.0  # it retried before giving up
        assert str(holder.pid) in str(e.value)
    with s.read() as con:  # and once released, reads work again
        assert con.execute("SELECT 1").fetchone() == (1,)


def test_a_store_of_lsdb_0_1_is_refused_in_one_line(tmp_path):
    """Schema 1 run ids hashed the checkpoint schedule; its children's data order derives from
    them, so the store cannot be upgraded: refused, naming what to do."""
    import duckdb

    root = tmp_path / "old"
    root.mkdir()
    con = duckdb.connect(str(root / "lsdb.duckdb"))
    con.execute("CREATE TABLE schema_version (version INTEGER PRIMARY KEY, applied_at TIMESTAMP, lsdb_version VARCHAR)")
    con.execute("INSERT INTO schema_version VALUES (1, now(), '0.1.0')")
    con.close()
    for opener in (Store.open, Store.init):
        with pytest.raises(StoreError, match=r"schema 1, from lsdb 0\.1.*start a new store") as e:
            opener(root)
        assert "\n" not in str(e.value)


def test_a_second_run_is_refused_before_the_database_is_opened(tmp_path):
    """`lsdb run` takes the store's lock before it opens lsdb.duckdb for writing, so a second
    one is refused at once even while the first holds the database file."""
    from lsdb import runner
    from lsdb.plan import parse_spec

    s = Store.init(tmp_path / "st")
    with database_held(s), s.lock("the first lsdb run"):
        t0 = time.monotonic()
        with pytest.raises(StoreLocked, match="the first lsdb run"):
            runner.run(parse_spec(""), s)
        assert time.monotonic() - t0 < 5  # not after the 30 s write retry


def test_temporaries_of_dead_writers_are_cleaned(tmp_path):
    from lsdb.atomic import temp_path
    from lsdb.spool import clean_temporaries

    s = Store.init(tmp_path / "st")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    mine = temp_path(s.checkpoints / "abc.safetensors")  # this live process is writing it
    mine.write_bytes(b"partial")
    left = [s.checkpoints / f".abc.safetensors.tmp@{mine.name.split('@')[1]}@{pid}",
            s.artifacts_dir / f".def.npy.tmp@{mine.name.split('@')[1]}@{pid}",
            s.spool / f".job-x.1-1-0.tmp@{mine.name.split('@')[1]}@{pid}"]
    for p in left[:2]:
        p.write_bytes(b"partial")
    left[2].mkdir()
    removed = clean_temporaries(s)
    assert sorted(removed) == sorted(left) and not any(p.exists() for p in left)
    assert mine.exists()  # a live writer's file stays


def test_a_store_before_the_hessian_sharpness_columns_gains_them_null_for_old_rows(tmp_path):
    """Schema 5 adds batch sharpness and the gradient's top-subspace fraction to ``hessian``: a store of
    schema 3 (``create_all`` never adds columns to a table that exists) gets them from UPGRADES[5], with
    nulls on the rows written before, and ``metric_series`` still reads."""
    import sqlalchemy as sa

    from lsdb.schema import SCHEMA_VERSION, UPGRADES, Base

    new = [s.split("EXISTS ")[1].split()[0] for v in (5, 6) for s in UPGRADES[v]]  # 6: the hvp method
    assert "batch_sharpness" in new and "top_subspace_grad_fraction" in new and "hvp" in new
    store = Store.init(tmp_path / "store")
    with store.write() as conn:  # make it look like a store written before the columns existed
        for view in [r[0] for r in conn.execute(sa.text("SELECT view_name FROM duckdb_views() WHERE NOT internal"))]:
            conn.execute(sa.text(f'DROP VIEW "{view}"'))
        # DuckDB drops no column an index's later column depends on: recreate the table without them
        old_table = sa.Table("hessian", sa.MetaData(), *[
            sa.Column(c.name, c.type, primary_key=c.primary_key, nullable=c.nullable)
            for c in Base.metadata.tables["hessian"].columns if c.name not in new])
        conn.execute(sa.text("DROP TABLE hessian"))
        old_table.create(conn)
        conn.execute(sa.text(
            "INSERT INTO hessian (job_id, idx, checkpoint_id, anchor_checkpoint_id, batch_size, batch_loss, "
            "top_eigenvalue, k, lanczos_iters, hvps, converged, max_residual, tol, outliers, trace, trace_stderr, "
            "trace_method, trace_hvps, density_hvps, warm_started) VALUES ('old', 0, 'c', 'c', 512, 1.0, 5.0, 12, "
            "30, 90, true, 0.001, 0.001, 3, 50.0, 1.0, 'deflated', 30, 30, false)"))
        conn.execute(sa.text("UPDATE schema_version SET version = 3"))
    store.migrate()
    with store.read() as con:
        columns = {r[0]: r[1] for r in con.execute(
            "SELECT column_name, data_type FROM duckdb_columns() WHERE table_name = 'hessian'").fetchall()}
        old = con.execute(f"SELECT top_eigenvalue, {', '.join(new)} FROM hessian WHERE job_id = 'old'").fetchone()
        version = con.execute("SELECT max(version) FROM schema_version").fetchone()[0]
        con.execute("SELECT count(*) FROM metric_series WHERE metric = 'batch_sharpness'").fetchone()
    assert columns["batch_sharpness"] == "DOUBLE" and columns["sharpness_seed"] == "BIGINT"
    assert columns["top_subspace_dim"] == "INTEGER" and columns["hvp"] == "VARCHAR" and set(new) <= set(columns)
    assert old[0] == 5.0 and all(v is None for v in old[1:])
    assert version == SCHEMA_VERSION >= 5
