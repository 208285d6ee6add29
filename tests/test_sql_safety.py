"""`lsdb sql` and `Session.sql` only read: every bypass of the read-only guard named in the issue,
and the forms that must keep working.

Each refused query must raise a `QueryError` naming the statement type (or the refused function,
PRAGMA or file access), leave the database opening with the same row counts, and write no file.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lsdb.cli import app
from lsdb.errors import QueryError
from lsdb.query.session import Session
from lsdb.store import Store
from tests.conftest import lsdb_cmd
from tests.timeouts import hang_timeout

runner = CliRunner()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def db(tmp_path):
    """A store with two experiments inserted by hand (no training)."""
    import sqlalchemy as sa

    store = Store.init(tmp_path / "s")
    with store.write() as conn:
        for i in (1, 2):
            conn.execute(sa.text(
                "INSERT INTO experiment (id, name, spec_toml, dataset, probe_set_size, probe_set_seed, "
                "probe_set_sha256, created_at) VALUES (:id, :name, '', 'digits', 32, 0, 'x', now())"),
                {"id": f"e{i}", "name": f"exp{i}"})
    return Session.open(store)


def counts(store: Store) -> dict[str, int]:
    """Row count of every table, read through the ordinary (trusted) connection."""
    with store.read() as con:
        tables = [r[0] for r in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE NOT temporary ORDER BY 1").fetchall()]
        return {t: con.execute(f'SELECT count(*) FROM "{t}"').fetchone()[0] for t in tables}


def snapshot(root: Path) -> dict[str, str]:
    """Every file (with its hash) and folder under root."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def extensions_dir() -> dict[str, str]:
    d = Path.home() / ".duckdb"
    return {str(p): "" for p in d.rglob("*")} if d.exists() else {}


def assert_untouched(db, tmp_path, before_counts, before_files, before_ext=None):
    store = Store.open(db.store.root)  # the database still opens (and passes the version check)
    assert counts(store) == before_counts
    assert snapshot(tmp_path) == before_files
    if before_ext is not None:
        assert extensions_dir() == before_ext


# --------------------------------------------------------------------- refused statements
# (query, what the refusal must name); {db} is the store's database file, {tmp} a scratch folder
BYPASSES = [
    # the four of the issue
    ("SET log_query_path='{db}'; SELECT 42", "SET statements are refused"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{db}'", "EXPLAIN ANALYZE is refused"),
    ("SET profiling_output='{tmp}/written.txt'; SET enable_profiling='json'; SELECT 1", "SET statements are refused"),
    ("EXPLAIN ANALYZE INSTALL json", "EXPLAIN ANALYZE is refused"),
    # other spellings of the same
    ("select 1; set log_query_path = '{db}'", "SET statements are refused"),
    ("RESET log_query_path", "SET statements are refused"),
    ("SET VARIABLE x = 1", "SET statements are refused"),
    ("USE memory", "SET statements are refused"),
    ("EXPLAIN /* note */ analyse COPY (SELECT 1) TO '{db}'", "EXPLAIN ANALYZE is refused"),
    ("EXPLAIN (ANALYZE) COPY (SELECT 1) TO '{db}'", "EXPLAIN (ANALYZE) is refused"),
    ("EXPLAIN (ANALYZE, FORMAT json) SELECT 1", "EXPLAIN (ANALYZE) is refused"),
    ("EXPLAIN COPY (SELECT 1) TO '{db}'", "EXPLAIN of a COPY statement is refused"),
    ("EXPLAIN INSTALL json", "EXPLAIN of a LOAD statement is refused"),
    ("EXPLAIN INSERT INTO experiment SELECT * FROM experiment", "EXPLAIN of an INSERT statement is refused"),
    ("EXPLAIN PIVOT experiment ON name USING count(*)", "refused"),
    ("PRAGMA enable_profiling", "PRAGMA enable_profiling is refused"),
    ("PRAGMA enable_profiling='json'", "PRAGMA enable_profiling is refused"),
    ("PRAGMA profiling_output='{tmp}/written.txt'", "PRAGMA profiling_output is refused"),
    ("PRAGMA log_query_path='{db}'", "PRAGMA log_query_path is refused"),
    ("PRAGMA force_checkpoint", "PRAGMA force_checkpoint is refused"),
    ("PRAGMA disable_checkpoint_on_shutdown", "PRAGMA disable_checkpoint_on_shutdown is refused"),
    # writing statements
    ("COPY (SELECT 1) TO '{tmp}/written.csv'", "COPY statements are refused"),
    ("COPY experiment TO '{db}'", "COPY statements are refused"),
    ("COPY experiment FROM '{tmp}/input.csv'", "COPY statements are refused"),
    ("ATTACH '{tmp}/written.duckdb' AS w", "ATTACH statements are refused"),
    ("DETACH lsdb", "DETACH statements are refused"),
    ("INSTALL json", "LOAD statements are refused"),
    ("FORCE INSTALL json", "LOAD statements are refused"),
    ("LOAD json", "LOAD statements are refused"),
    ("EXPORT DATABASE '{tmp}/written'", "EXPORT statements are refused"),
    ("CREATE TABLE t (a INTEGER)", "CREATE statements are refused"),
    ("CREATE TEMP TABLE t AS SELECT 1", "CREATE statements are refused"),
    ("CREATE VIEW v AS SELECT 1", "CREATE statements are refused"),
    ("CREATE MACRO m(x) AS x", "CREATE statements are refused"),
    ("CREATE PERSISTENT SECRET s (TYPE s3, KEY_ID 'k', SECRET 'v')", "CREATE statements are refused"),
    ("INSERT INTO experiment SELECT * FROM experiment", "INSERT statements are refused"),
    ("WITH x AS (SELECT 1) INSERT INTO experiment SELECT * FROM experiment", "INSERT statements are refused"),
    ("UPDATE experiment SET name = 'changed'", "UPDATE statements are refused"),
    ("DELETE FROM experiment", "DELETE statements are refused"),
    ("TRUNCATE experiment", "DELETE statements are refused"),
    ("DROP TABLE experiment", "DROP statements are refused"),
    ("SELECT 1; DROP TABLE experiment", "DROP statements are refused"),
    ("ALTER TABLE experiment ADD COLUMN z INTEGER", "ALTER statements are refused"),
    ("BEGIN", "TRANSACTION statements are refused"),
    ("VACUUM", "VACUUM statements are refused"),
    ("PREPARE p AS SELECT 1", "PREPARE statements are refused"),
    ("CHECKPOINT", "CALL statements are refused"),
    ("FORCE CHECKPOINT", "CALL statements are refused"),
    ("CALL pragma_table_info('experiment')", "CALL statements are refused"),
    # functions a SELECT can call that change settings, write, or run SQL text
    ("CALL checkpoint()", "checkpoint() is refused"),
    ("SELECT * FROM force_checkpoint()", "force_checkpoint() is refused"),
    ("SELECT * FROM enable_profiling(save_location='{tmp}/written.txt')", "enable_profiling() is refused"),
    ("SELECT 1 FROM (SELECT 1), main.\"Enable_Logging\" (storage_path='{tmp}/logs')", "enable_logging() is refused"),
    ("SELECT * FROM truncate_duckdb_logs()", "truncate_duckdb_logs() is refused"),
    ("SELECT write_log('x')", "write_log() is refused"),
    ("SELECT * FROM query('SELECT 1')", "query() is refused"),
]


def _fill(q: str, db, tmp_path) -> str:
    return q.format(db=db.store.db_path, tmp=tmp_path)


@pytest.mark.parametrize("allow_files", [False, True], ids=["store-only", "allow-files"])
@pytest.mark.parametrize("query, named", BYPASSES, ids=[q for q, _ in BYPASSES])
def test_bypass_is_refused_and_writes_nothing(db, tmp_path, query, named, allow_files):
    (tmp_path / "input.csv").write_text("id\nx\n")
    before = counts(db.store), snapshot(tmp_path), extensions_dir()
    q = _fill(query, db, tmp_path)
    with pytest.raises(QueryError, match="read-only") as e:
        db.sql(q, allow_files=allow_files)
    assert named in str(e.value)
    assert "\n" not in str(e.value)
    with pytest.raises(QueryError, match="read-only"):  # the streaming path has the same guard
        list(db.sql_batches(q, allow_files=allow_files))
    assert_untouched(db, tmp_path, *before)


def test_the_issue_bypasses_through_lsdb_open(db, tmp_path):
    import lsdb as lsdb_pkg

    before = counts(db.store), snapshot(tmp_path), extensions_dir()
    session = lsdb_pkg.open(db.store.root)
    for query, named in BYPASSES[:4]:
        with pytest.raises(QueryError, match=named):
            session.sql(_fill(query, db, tmp_path))
    assert_untouched(db, tmp_path, *before)
    assert session.sql("SELECT count(*) AS n FROM experiment")["n"][0] == 2


# Reading outside the store: refused by the connection unless allow_files
FILE_READS = [
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_csv_auto('/etc/passwd')",
    "SELECT * FROM '{tmp}/x.csv'",
    "SELECT * FROM read_text('/etc/passwd')",
    "SELECT * FROM read_blob('/etc/passwd')",
    "SELECT * FROM glob('/etc/*')",
    "SELECT * FROM read_parquet('{tmp}/x.parquet')",
    "SELECT * FROM read_json('{tmp}/x.json')",
    "IMPORT DATABASE '{tmp}'",
]


@pytest.mark.parametrize("query", FILE_READS)
def test_local_files_are_refused_without_allow_files(db, tmp_path, query):
    (tmp_path / "x.csv").write_text("a\n1\n")
    before = counts(db.store), snapshot(tmp_path)
    with pytest.raises(QueryError, match="--allow-files") as e:
        db.sql(_fill(query, db, tmp_path))
    assert "\n" not in str(e.value)
    assert_untouched(db, tmp_path, *before)


def test_allow_files_reads_a_csv_but_still_refuses_writes(db, tmp_path):
    csv = tmp_path / "extra.csv"
    csv.write_text("a,b\n1,x\n2,y\n")
    q = f"SELECT a, b FROM read_csv('{csv}') ORDER BY a"
    with pytest.raises(QueryError, match="--allow-files"):
        db.sql(q)
    assert db.sql(q, allow_files=True).rows() == [(1, "x"), (2, "y")]
    assert db.sql(f"SELECT count(*) AS n FROM '{csv}'", allow_files=True)["n"][0] == 2
    joined = db.sql(f"SELECT e.name, c.b FROM experiment e JOIN read_csv('{csv}') c ON c.a = "
                    f"CAST(substr(e.id, 2) AS INTEGER) ORDER BY e.name", allow_files=True)
    assert joined.rows() == [("exp1", "x"), ("exp2", "y")]
    before = counts(db.store), snapshot(tmp_path)
    with pytest.raises(QueryError, match="COPY statements are refused"):
        db.sql(f"COPY (SELECT 1) TO '{tmp_path}/out.csv'", allow_files=True)
    assert_untouched(db, tmp_path, *before)


# ------------------------------------------------------------------------- allowed forms
ALLOWED = [
    ("SELECT count(*) AS n FROM experiment", [(2,)]),
    ("select name from experiment order by name", [("exp1",), ("exp2",)]),
    ("WITH x AS (SELECT name FROM experiment) SELECT count(*) FROM x", [(2,)]),
    ("FROM experiment SELECT name ORDER BY name", [("exp1",), ("exp2",)]),
    ("FROM experiment", None),
    ("VALUES (1, 'a')", [(1, "a")]),
    ("SELECT 1 AS a; SELECT 2 AS b", [(2,)]),
    ("PIVOT experiment ON name USING count(*)", None),
    ("PIVOT (SELECT name FROM experiment) ON name IN ('exp1', 'exp2') USING count(*)", [(1, 1)]),
    ("SELECT * FROM (PIVOT experiment ON name USING count(*) GROUP BY dataset)", None),
    ("UNPIVOT (SELECT 1 AS a, 2 AS b) ON a, b INTO NAME k VALUE v", [("a", 1), ("b", 2)]),
    ("DESCRIBE experiment", None),
    ("DESCRIBE SELECT 1 AS a", None),
    ("SHOW TABLES", None),
    ("SHOW experiment", None),
    ("SUMMARIZE experiment", None),
    ("EXPLAIN SELECT * FROM experiment", None),
    ("EXPLAIN (FORMAT json) SELECT * FROM experiment", None),
    ("PRAGMA table_info('experiment')", None),
    ("PRAGMA show_tables", None),
    ("PRAGMA version", None),
    ("PRAGMA database_size", None),
    ("SELECT count(*) FROM checkpoint", [(0,)]),  # a table named like a refused function
    ("SELECT 1 AS query, 'enable_logging()' AS s", [(1, "enable_logging()")]),
    ("SELECT count(*) FROM query_table('experiment')", [(2,)]),
    ("SELECT count(*) FROM duckdb_tables()", None),
    ("-- a comment first\nSELECT 1", [(1,)]),
]


@pytest.mark.parametrize("query, rows", ALLOWED, ids=[q for q, _ in ALLOWED])
def test_reads_are_allowed(db, tmp_path, query, rows):
    before = counts(db.store), snapshot(tmp_path)
    df = db.sql(query)
    if rows is not None:
        assert df.rows() == rows
    else:
        assert df.height >= 1
    assert_untouched(db, tmp_path, *before)


def test_pivot_names_its_columns(db):
    df = db.sql("PIVOT experiment ON name USING count(*) GROUP BY dataset")
    assert set(df.columns) == {"dataset", "exp1", "exp2"} and df.rows() == [("digits", 1, 1)]


def test_parameters_and_lsdb_own_queries_still_work(db):
    assert db.sql("SELECT name FROM experiment WHERE id = ?", ["e2"]).rows() == [("exp2",)]
    assert db.sql("SELECT name FROM experiment WHERE id = $1 OR id = $2 ORDER BY 1", ["e1", "e2"]).height == 2
    assert db.runs().height == 0 and db.metrics().height == 0
    batches = list(db.sql_batches("SELECT range AS i FROM range(250)", batch_rows=100))
    assert sum(b.num_rows for b in batches) == 250


@pytest.mark.parametrize("query", ["", "   ", "\n\t", "-- only a comment", "/* nothing */", ";", " ; ;"])
def test_empty_query_is_one_line(db, query):
    with pytest.raises(QueryError, match="^empty query") as e:
        db.sql(query)
    assert "\n" not in str(e.value)


def test_syntax_error_is_a_query_error(db):
    with pytest.raises(QueryError, match="syntax error"):
        db.sql("SELEC 1")


# ------------------------------------------------------------- the connection on its own
# Under the statement guard: the untrusted connection alone refuses these (defense in depth).
RAW = [
    "SET log_query_path='{db}'",
    "SET profiling_output='{tmp}/written.txt'",
    "COPY (SELECT 1) TO '{db}'",
    "EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/written.csv'",
    "ATTACH '{tmp}/written.duckdb' AS w",
    "EXPORT DATABASE '{tmp}/written'",
    "INSTALL json",
    "INSERT INTO experiment SELECT * FROM experiment",
    "SELECT * FROM read_csv('/etc/passwd')",
]


@pytest.mark.parametrize("query", RAW)
def test_untrusted_connection_refuses_by_itself(db, tmp_path, query):
    import duckdb

    before = counts(db.store), snapshot(tmp_path), extensions_dir()
    with db.store.read(untrusted=True) as con:
        with pytest.raises(duckdb.Error):
            con.execute(_fill(query, db, tmp_path)).fetchall()
    assert_untouched(db, tmp_path, *before)


def test_default_connection_is_unchanged(db):
    with db.store.read() as con:
        assert con.execute("SELECT current_setting('enable_external_access'), "
                           "current_setting('lock_configuration')").fetchone() == (True, False)
    with db.store.read(untrusted=True) as con:
        assert con.execute("SELECT current_setting('enable_external_access'), "
                           "current_setting('lock_configuration')").fetchone() == (False, True)
    with db.store.read(untrusted=True, allow_files=True) as con:
        assert con.execute("SELECT current_setting('enable_external_access'), "
                           "current_setting('lock_configuration')").fetchone() == (True, True)


# ----------------------------------------------------------------------------------- CLI
def lsdb(*args):
    return subprocess.run(lsdb_cmd() + list(args), capture_output=True, text=True, timeout=hang_timeout(300))


def test_cli_empty_query_is_one_line(db):
    r = lsdb("sql", "", "--store", str(db.store.root))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: empty query")


@pytest.mark.parametrize("query, named", BYPASSES[:4], ids=["log_query_path", "explain-analyze-copy",
                                                            "profiling_output", "explain-analyze-install"])
def test_cli_refuses_the_issue_bypasses(db, tmp_path, query, named):
    before = counts(db.store), snapshot(tmp_path), extensions_dir()
    r = lsdb("sql", _fill(query, db, tmp_path), "--store", str(db.store.root))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and named in r.stderr
    assert_untouched(db, tmp_path, *before)


def test_cli_allow_files(db, tmp_path):
    csv = tmp_path / "extra.csv"
    csv.write_text("a,b\n1,x\n")
    s = str(db.store.root)
    q = f"SELECT * FROM read_csv('{csv}')"
    r = runner.invoke(app, ["sql", q, "--store", s, "--format", "csv"])
    assert r.exit_code != 0 and isinstance(r.exception, QueryError) and "--allow-files" in str(r.exception)
    r = runner.invoke(app, ["sql", q, "--store", s, "--format", "csv", "--allow-files"])
    assert r.exit_code == 0 and r.stdout == "a,b\n1,x\n"
    out = tmp_path / "out.csv"  # the streaming export path takes the flag too
    r = runner.invoke(app, ["sql", q, "--store", s, "--format", "csv", "--out", str(out), "--allow-files"])
    assert r.exit_code == 0 and out.read_text().replace('"', "").splitlines() == ["a,b", "1,x"]
    r = runner.invoke(app, ["sql", f"COPY (SELECT 1) TO '{tmp_path}/w.csv'", "--store", s, "--allow-files"])
    assert isinstance(r.exception, QueryError) and "COPY statements are refused" in str(r.exception)
    assert not (tmp_path / "w.csv").exists()
