"""One store, many experiments: the experiment is a scope every read command and twin honours.

Stores here hold real runs of tiny digits specs: ``tiny`` (then edited, a second version under the
same name), ``other`` (another model, with a variant) and ```alias`` (the same runs as ``tiny``
under another name, which trains nothing).
"""

from __future__ import annotations

import json
import subprocess

import duckdb
import pytest

import lsdb
from lsdb import runner
from lsdb.errors import QueryError
from lsdb.integrity import rebuild
from lsdb.plan import parse_spec
from lsdb.schema import SCHEMA_VERSION
from lsdb.store import Store
from tests.conftest import TINY_SPEC, lsdb_cmd

pytestmark = pytest.mark.slow

TINY = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")
TINY_EDITED = TINY.replace("times = [1.0]", "times = [1.0, 2.0]")
OTHER = (TINY.replace('name = "tiny"', 'name = "other"').replace("width = 32", "width = 16")
         .replace("[spawn]\ntimes = [1.0]", "[spawn]\ntimes = []")
         + "\n[variants.slow.optim]\nlr = 0.02\n")
ALIAS = TINY_EDITED.replace('name = "tiny"', 'name = "alias"')


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store.init(tmp_path_factory.mktemp("many") / "store")
    for text in (TINY, TINY_EDITED, OTHER):
        assert runner.run(parse_spec(text), st).ok
    return st


def test_runs_shows_experiment_data_set_and_model(store):
    runs = lsdb.open(store).runs()
    assert {"experiment", "dataset", "model", "variant"} <= set(runs.columns)
    assert set(runs["experiment"].to_list()) == {"tiny", "other"}
    other = runs.filter(runs["experiment"] == "other")
    assert set(other["variant"].to_list()) == {"base", "slow"} and set(other["model"].to_list()) == {"mlp"}
    # a run both versions of tiny declare is listed once, under its current version
    assert runs.filter(runs["experiment"] == "tiny")["id"].is_unique().all()


def test_aggregating_needs_the_choice_when_a_store_holds_several(store):
    db = lsdb.open(store)
    for call in (lambda: db.correlate(["train_loss", "test_loss"]), lambda: db.transition(["test_loss"]),
                 lambda: db.findings(["F1"])):
        with pytest.raises(QueryError, match=r"2 experiments \(other, tiny\).*--experiment NAME"):
            call()
    got = lsdb.open(store, experiment="other").correlate(["train_loss", "test_loss"])
    runs = lsdb.open(store, experiment="other").sql("SELECT id FROM run")["id"].to_list()
    groups = set(got.filter(got["scope"] == "run")["group"].to_list())
    assert groups and groups <= set(runs)


def test_scope_sees_only_the_experiment_rows(store):
    other = lsdb.open(store, experiment="other")
    tiny = lsdb.open(store, experiment="tiny")
    other_runs = set(other.sql("SELECT id FROM run")["id"].to_list())
    tiny_runs = set(tiny.sql("SELECT id FROM run")["id"].to_list())
    assert other_runs and tiny_runs and not other_runs & tiny_runs
    for table in ("checkpoint", "metric_series"):
        got = set(other.sql(f"SELECT DISTINCT run_id FROM {table}")["run_id"].to_list())
        assert got == other_runs, table
    jobs = other.sql("SELECT count(*) AS n FROM probe_job j JOIN lsdb.main.checkpoint c ON c.id = j.checkpoint_id "
                     "WHERE c.run_id NOT IN (SELECT id FROM run)")["n"][0]
    assert jobs == 0
    evals = other.sql("SELECT DISTINCT c.run_id FROM eval e JOIN checkpoint c ON c.id = e.checkpoint_id")
    assert set(evals["run_id"].to_list()) == other_runs
    assert other.metrics()["runs"].max() <= len(other_runs)
    # metric_series names the experiment, so SQL on the whole store can filter
    whole = lsdb.open(store).sql("SELECT experiment, count(DISTINCT run_id) AS n FROM metric_series GROUP BY ALL")
    assert dict(whole.iter_rows()) == {"other": len(other_runs), "tiny": len(tiny_runs)}


def test_variant_scope(store):
    slow = lsdb.open(store, experiment="other", variant="slow")
    assert set(slow.sql("SELECT variant FROM run")["variant"].to_list()) == {"slow"}
    assert slow.sql("SELECT count(*) AS n FROM run")["n"][0] == 1
    with pytest.raises(QueryError, match="no variant 'fast'; its variants: base, slow"):
        lsdb.open(store, experiment="other", variant="fast")
    with pytest.raises(QueryError, match="no experiment 'nope'.*experiments: other, tiny"):
        lsdb.open(store, experiment="nope")


def test_an_edited_spec_is_a_new_version_of_the_same_experiment(store):
    exps = lsdb.open(store).experiments()
    tiny = exps.filter(exps["name"] == "tiny")
    assert tiny.height == 2 and tiny["current"].sum() == 1
    new = tiny.filter(tiny["current"])["id"][0]
    old = tiny.filter(~tiny["current"])["id"][0]
    latest = set(lsdb.open(store, experiment="tiny").sql("SELECT id FROM run")["id"].to_list())
    earlier = set(lsdb.open(store, experiment=old[:10]).sql("SELECT id FROM run")["id"].to_list())
    assert earlier < latest  # the edit added children and kept every run it did not change
    assert lsdb.open(store, experiment=new[:10]).scope.run_ids == tuple(sorted(latest))


def test_a_spec_sharing_runs_under_another_name(tmp_path):
    st = Store.init(tmp_path / "alias")
    runner.run(parse_spec(TINY_EDITED), st)
    before = lsdb.open(st).sql("SELECT count(*) AS n FROM checkpoint")["n"][0]
    assert runner.run(parse_spec(ALIAS), st).ok
    db = lsdb.open(st)
    assert db.sql("SELECT count(*) AS n FROM checkpoint")["n"][0] == before  # nothing retrained
    tiny = lsdb.open(st, experiment="tiny").scope.run_ids
    assert lsdb.open(st, experiment="alias").scope.run_ids == tiny
    runs = db.runs()
    assert runs.height == 2 * len(tiny) and set(runs["experiment"].to_list()) == {"tiny", "alias"}
    by_name = db.sql("SELECT experiment, count(*) AS n FROM metric_series GROUP BY ALL")
    assert len(set(by_name["n"].to_list())) == 1  # each experiment sees every shared value once


def test_a_schema_2_store_links_each_run_to_its_experiment(tmp_path):
    st = Store.init(tmp_path / "old")
    runner.run(parse_spec(TINY), st)
    with st.write() as conn:
        raw = conn.connection.driver_connection
        raw.execute("DROP VIEW metric_series")
        raw.execute("DROP TABLE experiment_run")
        raw.execute("DELETE FROM schema_version")
        raw.execute("INSERT INTO schema_version VALUES (2, now(), '0.2.0')")
    db = lsdb.open(st.root)  # opening a path checks the version and upgrades
    assert db.sql("SELECT max(version) AS v FROM schema_version")["v"][0] == SCHEMA_VERSION
    links = db.sql("SELECT count(*) AS n FROM experiment_run")["n"][0]
    assert links == db.sql("SELECT count(*) AS n FROM run")["n"][0] > 0
    assert db.for_analysis().sql("SELECT count(*) AS n FROM metric_series")["n"][0] > 0


def test_rebuild_restores_membership(tmp_path):
    st = Store.init(tmp_path / "rb")
    for text in (TINY, OTHER):
        runner.run(parse_spec(text), st)
    q = "SELECT experiment_id, run_id FROM experiment_run ORDER BY ALL"
    before = lsdb.open(st).sql(q).rows()
    rebuild(st)
    assert lsdb.open(st).sql(q).rows() == before


def test_cli_experiment_option(store, cli_env):
    def cli(*args):
        return subprocess.run(lsdb_cmd() + list(args) + ["--store", str(store.root)], capture_output=True,
                              text=True, env=cli_env, timeout=600)

    r = cli("correlate", "train_loss", "test_loss")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "2 experiments (other, tiny)" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("correlate", "train_loss", "test_loss", "--experiment", "other", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)
    r = cli("runs", "--experiment", "other", "--variant", "slow", "--format", "csv")
    assert r.returncode == 0 and r.stdout.count("\n") == 2 and ",slow," in r.stdout
    r = cli("experiments", "--format", "csv")
    assert r.returncode == 0 and r.stdout.count("tiny") == 2
    for args in (("findings", "--only", "F1"), ("transition", "test_loss"), ("metrics",)):
        r = cli(*args, "--experiment", "tiny")
        assert r.returncode == 0, (args, r.stderr)
    r = cli("sql", "SELECT count(*) AS n FROM run", "--experiment", "other", "--format", "csv")
    assert r.returncode == 0 and r.stdout.split() == ["n", "2"]


def test_scope_views_do_not_leak_into_the_store(store):
    lsdb.open(store, experiment="other").sql("SELECT count(*) FROM run")
    con = duckdb.connect(str(store.db_path), read_only=True)
    try:
        names = {r[0] for r in con.execute("SELECT table_name FROM duckdb_tables() UNION ALL "
                                           "SELECT view_name FROM duckdb_views()").fetchall()}
    finally:
        con.close()
    assert not any(n.startswith("lsdb_scope") for n in names)
