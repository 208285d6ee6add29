"""End to end on a tiny real study: spec → training → checkpoints → probes → DuckDB → SQL."""

from __future__ import annotations

import shutil

import pytest

import lsdb
from lsdb import runner
from lsdb.errors import CheckpointCorrupt, StoreLocked
from lsdb.ingest.ingest import ingest
from lsdb.plan import expand_runs
from lsdb.plan import load_spec

TABLES = ("run", "checkpoint", "probe_job", "eval", "weights")


def counts(store) -> dict[str, int]:
    db = lsdb.open(store.root)
    out = {t: db.sql(f"SELECT count(*) AS n FROM {t}")["n"][0] for t in TABLES}
    out["metric_series"] = db.sql("SELECT count(*) AS n FROM metric_series")["n"][0]
    return out


def snapshot(store):
    """Every stored number that must be identical between an interrupted and a clean run."""
    db = lsdb.open(store.root)
    return (
        db.sql("SELECT id, run_id, step, sha256, train_loss, test_error FROM checkpoint ORDER BY id").rows(),
        db.sql("SELECT id, status FROM run ORDER BY id").rows(),
        db.sql("SELECT job_id, train_loss, test_error FROM eval ORDER BY job_id").rows(),
        db.sql("SELECT job_id, norm, distance FROM weights ORDER BY job_id").rows(),
    )


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    root = tmp_path_factory.mktemp("finished")
    (root / "tiny.toml").write_text(TINY_SPEC)
    spec = load_spec(root / "tiny.toml")
    store = Store.init(root / "store")
    summary = runner.run(spec, store)
    return spec, store, summary


def test_run_fills_the_expected_counts(finished):
    spec, store, summary = finished
    runs = expand_runs(spec, 1437)
    assert len(runs) == 2 * (1 + 2)  # 2 seeds × (parent + 2 children)
    expected_ckpts = sum(len(r.save_steps) for r in runs)
    c = counts(store)
    assert c["run"] == 6 and c["checkpoint"] == expected_ckpts == summary.checkpoints
    assert c["eval"] == expected_ckpts
    parents_ckpts = sum(len(r.save_steps) for r in runs if r.kind == "parent")
    child_ckpts = expected_ckpts - parents_ckpts
    # weights: norm for each checkpoint + to-init for every checkpoint but the 2 inits
    # + to-parent for children + 1 sibling pair per parent
    assert c["weights"] == expected_ckpts + (expected_ckpts - 2) + child_ckpts + 2
    assert summary.jobs_failed == 0
    db = lsdb.open(store.root)
    per_metric = dict(db.sql("SELECT metric, count(*) FROM metric_series GROUP BY metric").rows())
    assert per_metric["test_error"] == expected_ckpts
    assert per_metric["distance_to_init"] == expected_ckpts - 2  # children measure from their trajectory's init
    assert per_metric["sibling_distance"] == 2


def test_no_orphan_result_rows(finished):
    from lsdb.integrity import orphan_rows

    _, store, _ = finished
    with store.read() as con:
        assert orphan_rows(con) == []


def test_sibling_metrics_sit_at_the_spawn_time(finished):
    _, store, _ = finished
    db = lsdb.open(store.root)
    rows = db.sql("SELECT m.epoch, r.kind FROM metric_series m JOIN run r ON r.id = m.run_id "
                  "WHERE metric = 'sibling_distance'").rows()
    assert rows == [(1.0, "parent")] * 2


def test_children_start_from_the_parent_and_differ(finished):
    _, store, _ = finished
    db = lsdb.open(store.root)
    d = db.sql("SELECT value FROM metric_series WHERE metric = 'sibling_distance'")["value"]
    assert (d > 0).all()
    kids = db.sql("SELECT parent_checkpoint_id, spawn_step, data_seed FROM run WHERE kind = 'child'")
    assert kids["data_seed"].n_unique() == 4 and kids["parent_checkpoint_id"].null_count() == 0


def test_eval_probe_agrees_with_training_records(finished):
    _, store, _ = finished
    db = lsdb.open(store.root)
    df = db.sql("SELECT c.test_loss, e.test_loss AS probe_loss FROM eval e JOIN checkpoint c ON c.id = e.checkpoint_id")
    assert ((df["test_loss"] - df["probe_loss"]).abs() < 1e-5).all()


def test_rerun_does_nothing(finished):
    spec, store, _ = finished
    before = snapshot(store)
    assert runner.plan(spec, store).nothing_to_do
    summary = runner.run(spec, store)
    assert summary.trained == 0 and summary.jobs_done == 0
    assert snapshot(store) == before


def test_training_is_deterministic(finished, tmp_path):
    from lsdb.store import Store

    spec, store, _ = finished
    other = Store.init(tmp_path / "again")
    runner.run(spec, other)
    assert snapshot(other) == snapshot(store)


def test_reingesting_shards_changes_nothing(finished):
    spec, store, _ = finished
    before = counts(store)
    # a crash after the commit but before shards were moved leaves them in spool/: replay them all
    for shard in list(store.ingested.iterdir())[:50]:
        shutil.copytree(shard, store.spool / shard.name)
    report = ingest(store)
    assert report.checkpoints == 0 and report.jobs == 0 and report.result_rows == 0
    assert counts(store) == before


def test_second_run_on_a_busy_store_is_refused(finished):
    spec, store, _ = finished
    with store.lock("test"):
        with pytest.raises(StoreLocked, match="busy"):
            runner.run(spec, store)


def test_altered_checkpoint_is_caught(finished, tmp_path):
    from lsdb.train.checkpoints import load_weights

    _, store, _ = finished
    sha = lsdb.open(store.root).sql("SELECT sha256 FROM checkpoint LIMIT 1")["sha256"][0]
    copy = tmp_path / "ck"
    copy.mkdir()
    data = bytearray(store.checkpoint_path(sha).read_bytes())
    data[-1] ^= 0xFF
    (copy / f"{sha}.safetensors").write_bytes(bytes(data))
    with pytest.raises(CheckpointCorrupt, match="does not match its hash"):
        load_weights(copy, sha)


def test_altered_checkpoint_is_retrained_before_its_jobs_run(tiny_spec_path, tmp_path):
    """A checkpoint file altered on disk (or lost) is retrained from the nearest intact checkpoint
    before anything reads it: bit for bit the file it was, and none of its jobs fail."""
    from lsdb.store import Store

    spec = load_spec(tiny_spec_path)
    no_probes = spec.__class__(**{**spec.__dict__, "probes": ()})
    store = Store.init(tmp_path / "s")
    runner.run(no_probes, store)
    rows = lsdb.open(store.root).sql("SELECT id, sha256 FROM checkpoint ORDER BY step DESC LIMIT 2").rows()
    (cid, sha), (lost_cid, lost_sha) = rows
    path = store.checkpoint_path(sha)
    original = path.read_bytes()
    data = bytearray(original)
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    store.checkpoint_path(lost_sha).unlink()
    assert runner.plan(spec, store).checkpoints_damaged == 2
    summary = runner.run(spec, store)
    assert summary.repaired == 2 and summary.ok and summary.jobs_failed == 0 and summary.jobs_done > 0
    assert path.read_bytes() == original and store.checkpoint_path(lost_sha).exists()
    assert runner.plan(spec, store).nothing_to_do


def test_altered_optimizer_state_is_caught_and_retrained(tiny_spec_path, tmp_path):
    """The momentum beside a spawn checkpoint is verified like the weights: one flipped bit would
    otherwise silently change every child trained from it."""
    from lsdb.store import Store
    from lsdb.train.checkpoints import optimizer_path

    spec = load_spec(tiny_spec_path)
    no_probes = spec.__class__(**{**spec.__dict__, "probes": ()})
    clean = Store.init(tmp_path / "clean")
    runner.run(no_probes, clean)
    store = Store.init(tmp_path / "s")
    parents_only = spec.__class__(**{**no_probes.__dict__, "spawn": spec.spawn.__class__()})
    runner.run(parents_only, store)
    spawn = lsdb.open(store.root).sql(
        "SELECT c.id FROM checkpoint c JOIN run r ON r.id = c.run_id WHERE r.kind = 'parent' AND c.epoch = 1.0")
    opt = optimizer_path(store.checkpoints, spawn["id"][0])
    data = bytearray(opt.read_bytes())
    data[-1] ^= 0x01
    opt.write_bytes(bytes(data))
    summary = runner.run(no_probes, store)  # children spawn from the repaired state
    assert summary.repaired == 1 and summary.ok
    q = "SELECT id, sha256, optimizer_sha256 FROM checkpoint ORDER BY id"
    assert lsdb.open(store.root).sql(q).rows() == lsdb.open(clean.root).sql(q).rows()


def test_failing_jobs_are_retried_then_given_up_and_named(tmp_path):
    """A job that fails (here: ntk_distance reading a kernel altered on disk) is retried once per
    `lsdb run`; after MAX_ATTEMPTS it is given up, and every run says so (summary.ok is False)."""
    from lsdb.plan import MAX_ATTEMPTS, parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    base = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]") + "\n[probes.ntk]\n"
    store = Store.init(tmp_path / "s")
    runner.run(parse_spec(base), store)
    sha = lsdb.open(store.root).sql("SELECT artifact FROM ntk LIMIT 1")["artifact"][0]
    path = store.artifacts().path(sha)
    path.write_bytes(path.read_bytes()[:-8] + b"\x00" * 8)
    grown = parse_spec(base + "\n[probes.ntk_distance]\n")
    first = runner.run(grown, store)
    assert first.jobs_failed >= 1 and not first.ok and "ArtifactCorrupt" in first.failures[0]
    for _ in range(MAX_ATTEMPTS - 1):
        assert not runner.plan(grown, store).nothing_to_do
        runner.run(grown, store)
    p = runner.plan(grown, store)
    assert p.jobs_given_up == first.jobs_failed and p.nothing_to_do
    again = runner.run(grown, store)
    assert again.nothing_to_do and not again.ok and len(again.given_up) == first.jobs_failed
    assert "ntk_distance job" in again.given_up[0] and "ArtifactCorrupt" in again.given_up[0]


@pytest.mark.parametrize("lr, reason", [(1e8, "non-finite"), (3.0, "collapsed to chance accuracy")])
def test_divergence_is_recorded_and_final(tmp_path, lr, reason):
    from lsdb.plan import parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    text = TINY_SPEC.replace("lr = 0.05", f"lr = {lr}").replace("seeds = [0, 1]", "seeds = [0]")
    spec = parse_spec(text)
    store = Store.init(tmp_path / "s")
    summary = runner.run(spec, store)
    assert summary.diverged and reason in summary.diverged[0]
    db = lsdb.open(store.root)
    parent = db.sql("SELECT status, diverged_step, diverged_reason FROM run WHERE kind = 'parent'").row(0)
    assert parent[0] == "diverged" and reason in parent[2]
    # checkpoints before the divergence stay stored and probed
    n = db.sql("SELECT count(*) AS n FROM checkpoint c JOIN run r ON r.id = c.run_id WHERE r.kind = 'parent'")["n"][0]
    assert n >= 1
    assert db.sql("SELECT count(*) AS n FROM eval")["n"][0] >= n
    assert runner.plan(spec, store).nothing_to_do


def test_adding_a_dependent_probe_later_plans_and_runs_it(tmp_path):
    """A probe that reads another probe's stored results (kernel distance reads stored kernels)
    is planned from what the store holds, so adding it to a finished spec does the missing work."""
    from lsdb.plan import parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    base = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]") + "\n[probes.ntk]\n"
    store = Store.init(tmp_path / "s")
    runner.run(parse_spec(base), store)
    grown = parse_spec(base + "\n[probes.ntk_distance]\n")
    p = runner.plan(grown, store)
    assert p.jobs_by_probe.get("ntk_distance", 0) > 0 and not p.runs_to_train
    summary = runner.run(grown, store)
    assert summary.trained == 0 and summary.jobs_done == p.jobs_by_probe["ntk_distance"]
    assert runner.plan(grown, store).nothing_to_do
    db = lsdb.open(store.root)
    assert db.sql("SELECT count(*) AS n FROM metric_series WHERE metric = 'kernel_velocity'")["n"][0] > 0


def test_progress_bars_show_runs_and_jobs(tmp_path, capsys):
    from lsdb.plan import parse_spec
    from lsdb.store import Store
    from tests.conftest import TINY_SPEC

    spec = parse_spec(TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]"))
    summary = runner.run(spec, Store.init(tmp_path / "s"), progress=True)
    err = capsys.readouterr()
    text = err.out + err.err
    assert summary.trained == 3 and "training runs" in text and "probe jobs" in text


def test_a_damaged_shard_is_set_aside_not_blocking(finished, tmp_path):
    from lsdb.spool import write_shard

    _, store, _ = finished
    bad = write_shard(store.spool, "job-damaged", {"kind": "probe", "job": {}})
    (bad / "meta.json").write_text("{not json")
    report = ingest(store)
    assert report.rejected and report.rejected[0].startswith("job-damaged")
    assert (store.spool / "rejected" / bad.name / "REJECTED.txt").exists() and not bad.exists()
    assert ingest(store).rejected == []  # set aside once, not retried forever
