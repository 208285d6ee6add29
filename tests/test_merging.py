"""Merging through a real store: soups of k > 2 checkpoints go through the worker, the shard, ingest
and `lsdb check`; the determinism comparison (children of one spawn vs parents of different seeds)
is one query."""

from __future__ import annotations

import json
import shutil

import pytest

import lsdb
from lsdb import runner
from lsdb.ids import job_checkpoint_ids, job_id
from lsdb.integrity import check
from lsdb.plan import parse_spec
from lsdb.store import Store
from tests.conftest import TINY_SPEC
from tests.test_ingest import logged, rejected_for, replant

pytestmark = pytest.mark.slow

SPEC = (TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0, 1, 2]").replace("children = 2", "children = 3")
        + """
[probes.soup]
train_subset = 200

[probes.barrier]
points = 5
train_subset = 200
cross_init = true

[probes.ntk]
on_checkpoints = "final"

[probes.ntk_distance]
roles = ["siblings", "cross_init"]
""")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    st = Store.init(tmp_path_factory.mktemp("merging") / "store")
    summary = runner.run(parse_spec(SPEC), st)
    assert summary.ok, summary
    return st


def test_soups_of_many_checkpoints_are_stored_and_check_clean(store):
    db = lsdb.open(store)
    jobs = db.sql("SELECT role, checkpoint_id, other_checkpoint_id, more_checkpoint_ids, state FROM probe_job "
                  "WHERE probe = 'soup'")
    assert set(jobs["state"].to_list()) == {"done"}
    by_role = {r: jobs.filter(jobs["role"] == r) for r in ("spawn_children", "cross_init")}
    assert by_role["spawn_children"].height == 3 and by_role["cross_init"].height == 1  # 3 parents × 1 spawn
    for row in jobs.iter_rows(named=True):
        ids = job_checkpoint_ids(row["checkpoint_id"], row["other_checkpoint_id"], row["more_checkpoint_ids"])
        assert len(ids) == 3 and len(set(ids)) == 3  # three children / three seeds
    soups = db.sql("SELECT * FROM soup")
    assert soups.height == 4 and (soups["k"] == 3).all()
    members = db.sql("SELECT * FROM soup_member")
    assert members.height == 12
    report = check(store)
    assert report.ok, report.problems


def test_determinism_is_one_query(store):
    got = lsdb.open(store).determinism()
    assert set(got["source"].to_list()) == {"data order", "initialisation"}
    for col in ("disagreement", "weight_distance", "kernel_distance", "loss_barrier_test"):
        assert got[col].null_count() == 0, col
    init = got.filter(got["source"] == "initialisation")
    assert init.height == 3  # pairs of 3 seeds
    order = got.filter(got["source"] == "data order")
    assert order.height == 9  # 3 parents × 3 pairs of children
    assert order["spawn_frac"].null_count() == 0 and init["spawn_frac"].null_count() == init.height


def test_more_checkpoint_ids_are_validated_on_ingest():
    assert job_checkpoint_ids("a", None, None) == ("a",)
    assert job_checkpoint_ids("a", "b", json.dumps(["c", "d"])) == ("a", "b", "c", "d")
    for bad in ("not json", json.dumps([]), json.dumps([1]), json.dumps({"c": 1}), json.dumps([""])):
        with pytest.raises(ValueError):
            job_checkpoint_ids("a", "b", bad)
    with pytest.raises(ValueError, match="after a second"):
        job_checkpoint_ids("a", None, json.dumps(["c"]))


def _soup_shard(st):
    return next(p for p in logged(st, "job-", "soup.parquet")
                if json.loads((p / "meta.json").read_text())["job"]["more_checkpoint_ids"])


def _made_up_member(job, folder):
    """A member that is not stored, the job id recomputed to match and its rows dropped (a failed
    job), so only the checkpoint check can catch it."""
    job.update(more_checkpoint_ids=json.dumps(["e" * 16]), state="failed", error="boom")
    job["id"] = job_id(job["probe"], job["version"], job["params_hash"],
                       (job["checkpoint_id"], job["other_checkpoint_id"], "e" * 16), job["role"])
    for f in folder.glob("*.parquet"):
        f.unlink()


@pytest.mark.parametrize("edit, message", [
    # a member dropped from the list: the id no longer recomputes
    (lambda job, _: job.update(more_checkpoint_ids=None), "does not match"),
    (lambda job, _: job.update(more_checkpoint_ids="[1, 2]"), "must be a non-empty JSON list"),
    (lambda job, _: job.update(more_checkpoint_ids="{{"), "is not JSON"),
    (_made_up_member, "which is not stored"),
])
def test_a_soup_shard_with_altered_members_is_refused(store, tmp_path, edit, message):
    root = tmp_path / "copy"
    shutil.copytree(store.root, root)
    st = Store.open(root)
    before = lsdb.open(st).sql("SELECT count(*) AS n FROM soup")["n"][0]
    bad = replant(st, _soup_shard(st), lambda meta, folder: edit(meta["job"], folder))
    assert message in rejected_for(st, bad)
    assert lsdb.open(st).sql("SELECT count(*) AS n FROM soup")["n"][0] == before


def test_determinism_command(store):
    from typer.testing import CliRunner

    from lsdb.cli import app

    got = CliRunner().invoke(app, ["determinism", "--store", str(store.root), "--pooled", "--format", "csv"])
    assert got.exit_code == 0, got.output
    header, *rows = got.stdout.strip().splitlines()
    assert header.startswith("source,variant,spawn_epoch,spawn_frac,pairs,disagreement")
    assert len(rows) == 2 and rows[0].startswith("data order,base,1.0") and rows[1].startswith("initialisation,base,,")
