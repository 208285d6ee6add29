"""The fault suite (docs/reliability.md lists every case): crash lsdb anywhere, damage what it
stored, fill its disk, and check that a rerun ends with `lsdb check` clean and result rows
identical to an uninterrupted run.

Crashes are real: ``LSDB_KILL_AT=POINT:N`` makes the process that reaches ``lsdb.faults.point(POINT)``
for the N-th time SIGKILL itself (no cleanup, no ``finally``), in the coordinator or, for points
that only workers reach, in a worker of the process pool.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess

import pytest

import lsdb
from lsdb import runner
from lsdb.ids import job_id
from lsdb.integrity import check
from lsdb.plan import load_spec, parse_spec
from lsdb.store import Store
from tests.conftest import lsdb_cmd, row_differences, stored_rows

pytestmark = pytest.mark.slow

SPEC = """
[experiment]
name = "faults"
seeds = [0]

[data]
name = "digits"
probe_set_size = 16

[model]
name = "mlp"
width = 16
depth = 1

[optim]
lr = 0.05
batch_size = 128
epochs = 3
lr_drops = [2.0]

[checkpoints]
log_points = 2
log_until = 0.5
every_epochs = 1

[spawn]
times = [1.0]
children = 2

[probes.eval]
max_train = 128
[probes.weights]
[probes.ntk]
[probes.ntk_distance]
[probes.barrier]
points = 5
train_subset = 64
init_final = false
"""

TABLES = ("experiment", "run", "checkpoint", "probe_job", "eval", "weights", "ntk", "ntk_distance", "barrier",
          "barrier_curve")


def snapshot(root) -> dict[str, list]:
    """Every stored row but when and where it ran; not attempts: a job killed mid-flight may be
    attempted again."""
    return stored_rows(root, TABLES, skip={"attempts"})


def same_rows(got: dict, want: dict) -> bool:
    """Equal row for row; probe floats to 1e-6 relative, since a probe run in a pool worker (one
    thread) and inline (two) may round differently. Training, hashes and keys compare exactly."""
    def tolerance(table):
        return None if table in ("experiment", "run", "checkpoint") else dict(rel_tol=1e-6, abs_tol=1e-9)

    return got.keys() == want.keys() and not row_differences(got, want, tolerance)


@pytest.fixture(scope="module")
def spec_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("faults") / "faults.toml"
    path.write_text(SPEC)
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, spec_file):
    """An uninterrupted run, as a user types it."""
    root = tmp_path_factory.mktemp("baseline") / "store"
    done = lsdb_run(spec_file, root)
    assert done.returncode == 0, done.stderr
    return root


@pytest.fixture(scope="module")
def baseline(finished):
    """The rows every faulted run must end with."""
    return snapshot(finished)


def lsdb_run(spec_file, store_root, workers=1, kill_at=None, timeout=900):
    env = {**os.environ, "LSDB_KILL_AT": kill_at or ""}
    return subprocess.run([*lsdb_cmd(), "run", str(spec_file), "--store", str(store_root), "--workers",
                           str(workers), "--no-progress"], capture_output=True, text=True, env=env,
                          timeout=timeout)


def finish_and_compare(spec_file, root, baseline):
    """Rerun without faults (in this process: the same call `lsdb run` makes, without another
    interpreter start); the store must be whole, consistent, and equal to the baseline."""
    again = runner.run(load_spec(spec_file), Store(root))
    assert again.ok, (again.failures, again.given_up, again.problems, again.rejected)
    store = Store.open(root)
    report = check(store)
    assert report.ok, report.problems
    rejected = root / "spool" / "rejected"
    assert not rejected.exists() or not any(rejected.iterdir())
    assert same_rows(snapshot(root), baseline)
    assert runner.plan(parse_spec(SPEC), store).nothing_to_do


# (point, N, workers): the coordinator is killed at every point it passes (recording, each stage of
# training, of probing and of ingest); with a pool, the points only workers reach kill a worker.
COORDINATOR = [
    ("recorded", 1, 1),
    ("shard_before_rename", 1, 1),  # the first checkpoint shard, half-written
    ("checkpoint_shard", 1, 1),
    ("checkpoint_shard", 6, 1),  # mid-parent
    ("task_done", 1, 1),  # the parent trained, its shards not yet ingested
    ("checkpoint_shard", 9, 1),  # mid-child
    ("ingest_before_commit", 2, 1),
    ("ingest_after_commit", 2, 1),  # committed, shards not yet moved to the log
    ("ingest_retired", 3, 1),  # some shards moved, some not
    ("probe_compute", 1, 1),  # mid first probe job
    ("probe_shard", 5, 1),  # a result written, not ingested
    ("shard_before_rename", 30, 1),  # a result shard half-written
    ("task_done", 20, 1),
    ("probe_compute", 40, 1),  # the dependent pass (kernel distances)
    ("ingest_before_commit", 4, 1),  # ingest commits at least 4 times: experiment, training, 2 probe passes
    ("ingest_after_commit", 4, 1),
    ("ingest_retired", 60, 1),  # of 78 shards
    ("recorded", 1, 2),
    ("task_done", 2, 2),  # training in the pool
    ("ingest_after_commit", 3, 2),
    ("task_done", 15, 2),  # probing in the pool
    ("ingest_before_commit", 4, 2),
]
WORKER = [
    ("checkpoint_shard", 2, 2),  # a training worker dies
    ("probe_compute", 3, 2),  # a probe worker dies mid-job
]


@pytest.mark.parametrize("point, n, workers", COORDINATOR, ids=[f"{p}:{n}-w{w}" for p, n, w in COORDINATOR])
def test_coordinator_killed_then_rerun(spec_file, baseline, tmp_path, point, n, workers):
    root = tmp_path / "store"
    # pool workers inherit the coordinator's stdout: the call returns only once they are gone too,
    # so a worker outliving its killed coordinator shows as a timeout here
    killed = lsdb_run(spec_file, root, workers, kill_at=f"{point}:{n}", timeout=300)
    assert killed.returncode == -signal.SIGKILL, f"never reached {point}:{n}\n{killed.stdout}\n{killed.stderr}"
    finish_and_compare(spec_file, root, baseline)


@pytest.mark.parametrize("point, n, workers", WORKER, ids=[f"{p}:{n}-w{w}" for p, n, w in WORKER])
def test_worker_killed_then_rerun(spec_file, baseline, tmp_path, point, n, workers):
    root = tmp_path / "store"
    died = lsdb_run(spec_file, root, workers, kill_at=f"{point}:{n}")
    assert died.returncode == 1, died.stderr
    assert "a worker process died" in died.stderr and "Traceback" not in died.stderr
    assert len(died.stderr.strip().splitlines()) == 1
    finish_and_compare(spec_file, root, baseline)


# --------------------------------------------------------------------------- damaged data

@pytest.fixture
def copy(tmp_path, finished):
    """A private copy of the finished store."""
    root = tmp_path / "store"
    shutil.copytree(finished, root, symlinks=True)
    return root


def test_corrupted_and_lost_checkpoints_are_retrained(spec_file, baseline, copy):
    root = copy
    store = Store.open(root)
    rows = lsdb.open(root).sql("SELECT id, sha256 FROM checkpoint ORDER BY step, id").rows()
    weights = store.checkpoint_path(rows[3][1])
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")  # one byte altered
    store.checkpoint_path(rows[-1][1]).unlink()  # one lost
    optimizer = root / "checkpoints" / f"{rows[5][0]}.optim.safetensors"
    optimizer.write_bytes(optimizer.read_bytes()[:100])  # one truncated
    report = check(store)
    assert len(report.problems) == 3 and all(p.startswith("checkpoint ") for p in report.problems)
    rc = subprocess.run([*lsdb_cmd(), "check", "--store", str(root)], capture_output=True, text=True)
    assert rc.returncode == 1 and rc.stdout.count("problem: checkpoint") == 3
    finish_and_compare(spec_file, root, baseline)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "misnamed", "foreign_table", "wrong_job",
                                    "unknown_checkpoint", "traversal_sha"])
def test_bad_shards_are_set_aside_and_the_rest_ingested(baseline, copy, damage):
    """A shard that is garbage, truncated, names a table its probe does not write, carries rows of
    another job, names a checkpoint that is not stored or a hash that is a path: rejected with the
    reason, and the rest of the spool is ingested."""
    from lsdb.ingest.ingest import ingest

    root = copy
    store = Store.open(root)
    log = sorted(p for p in store.ingested.iterdir() if p.name.startswith("job-")
                 and (p / "eval.parquet").exists())
    good, victim = log[0], log[1]
    # both go back into the spool: `good` is a plain replay, `victim` is damaged
    shutil.copytree(good, store.spool / good.name)
    bad = store.spool / ("job-zzz." + victim.name.split(".", 1)[1])
    shutil.copytree(victim, bad)
    meta = (bad / "meta.json").read_text()
    if damage == "garbage":
        (bad / "eval.parquet").write_bytes(b"PAR1 not a parquet file")
    elif damage == "truncated":
        data = (bad / "eval.parquet").read_bytes()
        (bad / "eval.parquet").write_bytes(data[: len(data) // 2])
    elif damage == "misnamed":
        (bad / "eval.parquet").rename(bad / "weights.parquet")
    elif damage == "foreign_table":
        (bad / "eval.parquet").rename(bad / "experiment.parquet")
    elif damage == "wrong_job":
        other = sorted(p for p in log if p != victim)[1]
        shutil.copy(other / "eval.parquet", bad / "eval.parquet")
    elif damage == "unknown_checkpoint":  # a failed job (no rows), its id recomputed: only the store can tell
        m = json.loads(meta)
        job = m["job"]
        job.update(checkpoint_id="f" * 16, anchor_checkpoint_id="f" * 16, state="failed", error="x")
        job["id"] = job_id(job["probe"], job["version"], job["params_hash"], ("f" * 16,), job["role"])
        (bad / "meta.json").write_text(json.dumps(m))
        (bad / "eval.parquet").unlink()
    elif damage == "traversal_sha":
        ck = next(p for p in store.ingested.iterdir() if p.name.startswith("ckpt-"))
        m = json.loads((ck / "meta.json").read_text())
        m["row"]["sha256"] = "../../../../etc/passwd"
        bad = store.spool / ("ckpt-zzz." + ck.name.split(".", 1)[1])
        shutil.copytree(ck, bad)
        (bad / "meta.json").write_text(json.dumps(m))
    report = ingest(store)
    assert len(report.rejected) == 1 and report.rejected[0].startswith(bad.name)
    assert (store.spool / "rejected" / bad.name / "REJECTED.txt").read_text().strip()
    assert not bad.exists() and report.skipped_known >= 1  # the good copy changed nothing
    assert check(store).ok
    assert snapshot(root) == baseline


def test_the_same_shard_twice_changes_nothing(baseline, copy):
    from lsdb.ingest.ingest import ingest

    root = copy
    store = Store.open(root)
    for shard in list(store.ingested.iterdir()):
        shutil.copytree(shard, store.spool / shard.name)
    report = ingest(store)
    assert not report.rejected and report.result_rows == 0 and report.checkpoints == 0
    assert snapshot(root) == baseline and check(store).ok


def test_a_diverged_run_ends_cleanly(tmp_path):
    spec_file = tmp_path / "diverge.toml"
    spec_file.write_text(SPEC.replace("lr = 0.05", "lr = 1e8"))
    root = tmp_path / "store"
    first = lsdb_run(spec_file, root)
    assert first.returncode == 0 and "diverged:" in first.stdout
    assert check(Store.open(root)).ok
    assert "nothing to do" in lsdb_run(spec_file, root).stdout


def test_rebuild_from_the_log(spec_file, baseline, copy):
    """The database can be recreated from the ingested log alone."""
    root = copy
    (root / "lsdb.duckdb").write_bytes(b"this is not a database")
    broken = subprocess.run([*lsdb_cmd(), "runs", "--store", str(root)], capture_output=True, text=True)
    assert broken.returncode == 1 and "lsdb rebuild" in broken.stderr and "Traceback" not in broken.stderr
    rb = subprocess.run([*lsdb_cmd(), "rebuild", "--store", str(root)], capture_output=True, text=True)
    assert rb.returncode == 0, rb.stderr
    assert list(root.glob("lsdb.duckdb.broken-*"))
    assert snapshot(root) == baseline
    assert check(Store.open(root)).ok
    assert runner.plan(parse_spec(SPEC), Store.open(root)).nothing_to_do


# ------------------------------------------------------------------------------- full disk

@pytest.fixture
def small_disk(tmp_path):
    """A 6 MB tmpfs: room for the database and some checkpoints, not for the whole study."""
    mount = tmp_path / "disk"
    mount.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True)
    if r.returncode != 0:
        if os.environ.get("LSDB_REQUIRE_TMPFS"):
            pytest.fail(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        pytest.skip(f"cannot mount a tmpfs here (needs root): {r.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_disk_full_loses_nothing(spec_file, baseline, tmp_path, small_disk):
    root = small_disk / "store"
    full = lsdb_run(spec_file, root)
    assert full.returncode == 1, full.stdout + full.stderr
    assert "Traceback" not in full.stderr and len(full.stderr.strip().splitlines()) == 1
    assert "disk full" in full.stderr
    # room again (the store moves to a larger disk): the rerun completes what is missing
    moved = tmp_path / "moved"
    shutil.copytree(root, moved, symlinks=True)
    finish_and_compare(spec_file, moved, baseline)
