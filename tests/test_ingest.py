"""Ingest treats every shard as untrusted input: each check, one bad shard at a time, with the
good shards beside it still ingested (docs/reliability.md)."""

from __future__ import annotations

import itertools
import json
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import lsdb
from lsdb import runner
from lsdb.ids import job_id
from lsdb.ingest.ingest import ingest
from lsdb.integrity import check
from lsdb.plan import parse_spec
from lsdb.spool import write_shard
from lsdb.store import Store
from tests.conftest import TINY_SPEC

SPEC = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")
_FRESH = itertools.count()


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    store = Store.init(tmp_path_factory.mktemp("ingest") / "store")
    assert runner.run(parse_spec(SPEC), store).ok
    return store.root


@pytest.fixture
def store(finished, tmp_path):
    root = tmp_path / "store"
    shutil.copytree(finished, root)
    return Store.open(root)


def counts(store) -> dict[str, int]:
    db = lsdb.open(store.root)
    return {t: db.sql(f"SELECT count(*) AS n FROM {t}")["n"][0]
            for t in ("experiment", "run", "checkpoint", "probe_job", "eval", "weights")}


def logged(store, prefix: str, with_file: str | None = None):
    return sorted(p for p in store.ingested.iterdir() if p.name.startswith(prefix)
                  and (with_file is None or (p / with_file).exists()))


def replant(store, shard, edit=None):
    """A copy of a logged shard back in the spool under a fresh name, ``edit``ed (meta, folder)."""
    target = store.spool / (shard.name.split(".", 1)[0] + f".ffffffffffffffff-1-{next(_FRESH)}")
    shutil.copytree(shard, target)
    if edit:
        meta = json.loads((target / "meta.json").read_text())
        edit(meta, target)
        (target / "meta.json").write_text(json.dumps(meta))
    return target


def rejected_for(store, shard) -> str:
    report = ingest(store)
    assert [r.split(":")[0] for r in report.rejected] == [shard.name], report.rejected
    reason = (store.spool / "rejected" / shard.name / "REJECTED.txt").read_text()
    assert not shard.exists() and reason.strip()
    return reason


def eval_job(store):
    return logged(store, "job-", "eval.parquet")[0]


def test_a_core_table_named_in_a_probe_shard_is_refused(store):
    before = counts(store)
    bad = replant(store, eval_job(store), lambda m, d: (d / "eval.parquet").rename(d / "experiment.parquet"))
    assert "writes only eval.parquet" in rejected_for(store, bad)
    assert counts(store) == before


def test_a_crafted_file_name_reaches_no_sql(store):
    def edit(meta, folder):
        (folder / "eval.parquet").rename(folder / 'weights"; DROP TABLE weights; --.parquet')

    before = counts(store)
    bad = replant(store, eval_job(store), edit)
    assert "unexpected file" in rejected_for(store, bad)
    assert counts(store) == before  # the weights table is still there, with its rows


@pytest.mark.parametrize("change, message", [
    (lambda t: t.append_column("evil", pa.array([1] * t.num_rows)), "has no column 'evil'"),
    (lambda t: t.set_column(t.schema.get_field_index("train_loss"), "train_loss",
                            pa.array(["x"] * t.num_rows)), "wrong column types"),
    (lambda t: t.drop_columns(["test_error"]), "column test_error is missing"),
    (lambda t: t.set_column(t.schema.get_field_index("idx"), "idx", pa.array([0] * t.num_rows, pa.int64()))
     if t.num_rows > 1 else t.append_column("evil", pa.array([1])), "idx repeats|has no column"),
])
def test_result_files_must_have_the_tables_columns_and_types(store, change, message):
    def edit(meta, folder):
        table = pq.read_table(folder / "eval.parquet")
        pq.write_table(change(table), folder / "eval.parquet")

    bad = replant(store, eval_job(store), edit)
    import re

    assert re.search(message, rejected_for(store, bad))


def test_rows_of_another_job_are_refused(store):
    jobs = logged(store, "job-", "eval.parquet")
    other = jobs[1] / "eval.parquet"
    bad = replant(store, jobs[0], lambda m, d: shutil.copy(other, d / "eval.parquet"))
    assert "other than the shard's job" in rejected_for(store, bad)


def test_a_job_id_must_recompute_from_the_job(store):
    bad = replant(store, eval_job(store), lambda m, d: m["job"].update(role="init"))
    assert "does not match" in rejected_for(store, bad)


def test_a_job_must_name_stored_checkpoints(store):
    def edit(meta, folder):
        job = meta["job"]
        job.update(checkpoint_id="e" * 16, anchor_checkpoint_id="e" * 16, state="failed", error="boom")
        job["id"] = job_id(job["probe"], job["version"], job["params_hash"], ("e" * 16,), job["role"])
        (folder / "eval.parquet").unlink()

    bad = replant(store, eval_job(store), edit)
    assert "which is not stored" in rejected_for(store, bad)


def test_a_failed_job_carries_no_rows(store):
    bad = replant(store, eval_job(store), lambda m, d: m["job"].update(state="failed", error="x"))
    assert "carries result file" in rejected_for(store, bad)


@pytest.mark.parametrize("field, value, message", [
    ("id", "0" * 16, "is not the id of run"),
    ("sha256", "../../../../etc/passwd", "is not a sha256"),
    ("optimizer_sha256", "x" * 64, "is not a sha256"),
    ("step", "seven", "wrong type"),
    ("train_loss", None, "lacks train_loss"),
])
def test_checkpoint_rows_are_checked(store, field, value, message):
    bad = replant(store, logged(store, "ckpt-")[0], lambda m, d: m["row"].update({field: value}))
    assert message in rejected_for(store, bad)


def test_a_checkpoint_of_an_unknown_run_is_refused(store):
    from lsdb.ids import checkpoint_id

    def edit(meta, folder):
        meta["row"].update(run_id="f" * 16, id=checkpoint_id("f" * 16, meta["row"]["step"]))

    bad = replant(store, logged(store, "ckpt-")[0], edit)
    assert "which is not stored" in rejected_for(store, bad)


@pytest.mark.parametrize("edit, message", [
    (lambda m, d: m.update(status="hacked"), "is not a run state"),
    (lambda m, d: m.update(run_id="f" * 16), "which is not stored"),
    (lambda m, d: m.update(diverged_step="soon"), "not an integer"),
    (lambda m, d: (d / "extra.txt").write_text("x"), "unexpected file extra.txt"),
])
def test_status_shards_are_checked(store, edit, message):
    bad = replant(store, logged(store, "status-")[0], edit)
    assert message in rejected_for(store, bad)


@pytest.mark.parametrize("content, message", [
    ("{not json", "unreadable meta.json"),
    ('{"kind": "sql"}', "unknown kind 'sql'"),
    ("[1, 2]", "unknown kind None"),
    ('{"kind": "checkpoint"}', "malformed checkpoint shard"),
])
def test_meta_must_be_a_known_shard(store, content, message):
    bad = write_shard(store.spool, "job-x", {"kind": "probe"})
    (bad / "meta.json").write_text(content)
    assert message in rejected_for(store, bad)


def test_an_experiment_shard_is_checked(store):
    bad = replant(store, logged(store, "exp-")[0], lambda m, d: m["runs"][0].update(status="running; --"))
    assert "unknown status" in rejected_for(store, bad)


def test_good_shards_beside_a_bad_one_are_ingested(store):
    """One bad shard in a batch costs only itself."""
    db = lsdb.open(store.root)
    job = eval_job(store)
    jid = json.loads((job / "meta.json").read_text())["job"]["id"]
    # forget one job's rows, so that its shard is new again
    with store.write() as conn:
        con = conn.connection.driver_connection
        con.execute("DELETE FROM eval WHERE job_id = ?", [jid])
        con.execute("DELETE FROM probe_job WHERE id = ?", [jid])
    good = replant(store, job)
    other = logged(store, "job-", "eval.parquet")[1]
    bad = replant(store, other, lambda m, d: (d / "eval.parquet").write_bytes(b"garbage"))
    report = ingest(store)
    assert [r.split(":")[0] for r in report.rejected] == [bad.name]
    assert report.jobs == 1 and report.rows == {"eval": 1} and not good.exists()
    assert db.sql(f"SELECT count(*) AS n FROM eval WHERE job_id = '{jid}'")["n"][0] == 1
    assert check(store).ok


def test_a_refusal_by_the_database_isolates_the_shard(store):
    """A row no check foresaw that the database refuses (a run that is its own parent) is found
    by retrying the batch one shard at a time; the others go in."""
    exp = logged(store, "exp-")[0]

    def edit(meta, folder):
        run = dict(meta["runs"][0])
        run.update(id="a" * 16, parent_run_id="a" * 16)
        meta["runs"] = [run]

    bad = replant(store, exp, edit)
    good = replant(store, logged(store, "ckpt-")[0])
    report = ingest(store)
    assert [r.split(":")[0] for r in report.rejected] == [bad.name]
    assert "the database refused it" in report.rejected[0]
    assert not good.exists() and report.shards == 1
    assert check(store).ok


def test_every_probe_declares_real_result_tables():
    """Ingest accepts from a probe's shard only the tables its TABLES declare: each must be a
    result table of the schema, and no table may belong to two probes."""
    from lsdb.probes import PROBES, tables_of
    from lsdb.schema import result_tables

    owners: dict[str, str] = {}
    for name in PROBES:
        tables = tables_of(name)
        assert tables and set(tables) <= set(result_tables()), (name, tables)
        for t in tables:
            assert owners.setdefault(t, name) == name, f"{t} declared by {owners[t]} and {name}"


def test_a_retried_job_keeps_both_attempts_in_the_log_and_replays_to_done(store):
    """The log never loses the good shard of a job that failed first: both attempts are kept
    (names are unique per write) and a rebuild ends with the job done, two attempts counted."""
    from lsdb.integrity import rebuild

    done = eval_job(store)
    meta = json.loads((done / "meta.json").read_text())
    jid = meta["job"]["id"]
    failed = store.ingested / (done.name.split(".", 1)[0] + ".0000000000000001-1-0")  # sorts first
    failed.mkdir()
    meta["job"].update(state="failed", error="RuntimeError: out of memory")
    (failed / "meta.json").write_text(json.dumps(meta))
    report = rebuild(store)
    assert not report.ingest.rejected
    assert failed.exists() and done.exists()
    state = lsdb.open(store.root).sql(f"SELECT state, attempts FROM probe_job WHERE id = '{jid}'").row(0)
    assert state == ("done", 2)
    assert check(store).ok


def test_lsdb_run_names_a_rejected_shard_and_fails(store):
    bad = replant(store, eval_job(store), lambda m, d: (d / "eval.parquet").write_bytes(b"garbage"))
    summary = runner.run(parse_spec(SPEC), store)
    assert summary.nothing_to_do and not summary.ok
    assert len(summary.rejected) == 1 and summary.rejected[0].startswith(bad.name)
    assert runner.run(parse_spec(SPEC), store).ok  # said once: the next run has nothing new to say
