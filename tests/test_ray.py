"""The Ray executor (lsdb.probes.ray_executor) on a real Ray. docs/cluster.md's recipes run as
written: the Ray one against a `ray start` head, its coordinator killed once and rerun, ends with
the same rows as inline and the process pool. Then, on a local Ray started once for the module
(2 CPUs, 2 fake GPUs): each task on its own GPU; killed tasks retried without duplicate rows; a job
lost on every try recorded as failed; Ctrl-C cancelling what is outstanding; a job asking for GPUs
the cluster lacks failing at once. Without Ray only the install hint and the manifest recipe run.
"""

from __future__ import annotations

import functools
import os
import re
import secrets
import shlex
import signal
import socket
import subprocess
import threading
import time
from importlib.util import find_spec
from pathlib import Path

import pytest

from lsdb import runner
from lsdb.errors import LsdbError
from lsdb.plan import parse_spec
from lsdb.probes.executors import make_executor
from lsdb.store import Store
from tests.conftest import REPO, TINY_SPEC, lsdb_cmd, row_differences, stored_rows
from tests.timeouts import hang_timeout

needs_ray = pytest.mark.skipif(find_spec("ray") is None,
                               reason="Ray is not installed (pip install 'lsdb[ray]' to run the Ray tests)")

TABLES = ("experiment", "run", "checkpoint", "probe_job", "eval", "weights")


def rows(root, skip=()) -> dict[str, list]:
    """What the executors must agree on: not the spec's text (the file's or the string's), nor how a
    job ran (inline has two torch threads, Ray and pool workers one; memory varies)."""
    return stored_rows(root, TABLES, skip={"spec_toml", "threads", "peak_memory_mb", *skip})


def same_rows(a: dict, b: dict) -> list[str]:
    """Training compares exactly; probe floats to 1e-6 relative (inline runs two threads, Ray and
    pool workers one, so reductions may round differently), as tests/test_faults.py does."""
    def tolerance(table):
        return None if table in ("experiment", "run", "checkpoint") else dict(rel_tol=1e-6, abs_tol=1e-9)

    return row_differences(a, b, tolerance)


def test_without_ray_the_ray_executor_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)  # `import ray` raises ImportError
    with pytest.raises(LsdbError) as e:
        make_executor(2, "ray")
    assert str(e.value) == "--executor ray needs Ray, which is not installed: pip install 'lsdb[ray]'"


def test_executor_choices_are_checked():
    with pytest.raises(LsdbError, match="unknown executor 'dask'; choose one of inline, process, ray"):
        make_executor(1, "dask")
    with pytest.raises(LsdbError, match="apply only to --executor ray"):
        make_executor(2, "process", gpus_per_job=1)


def test_an_address_where_nothing_listens_fails_at_once():
    from lsdb.probes.ray_executor import _check_reachable

    port = _free_port()
    t0 = time.monotonic()
    with pytest.raises(LsdbError, match=rf"^no Ray cluster answers at 127.0.0.1:{port} \(Connection refused\); "):
        _check_reachable(f"127.0.0.1:{port}")
    assert time.monotonic() - t0 < 6
    _check_reachable("auto")  # resolved by Ray
    _check_reachable("ray://head:10001")


# ------------------------------------------------------------------------- on a real Ray

@pytest.fixture(scope="module")
def ray_cluster():
    if find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'lsdb[ray]' to run the Ray tests)")
    import logging
    import signal
    import sys

    import ray

    env, sigterm, excepthook = dict(os.environ), signal.getsignal(signal.SIGTERM), sys.excepthook
    # the executors below find this Ray initialised and use it (they shut down only what they start)
    ray.init(address="local", num_cpus=2, num_gpus=2, include_dashboard=False, logging_level=logging.ERROR)
    yield ray
    ray.shutdown()
    # Ray leaves its environment variables, SIGTERM handler and excepthook: later tests get ours back
    os.environ.clear()
    os.environ.update(env)
    signal.signal(signal.SIGTERM, sigterm)
    sys.excepthook = excepthook


@pytest.fixture(scope="module")
def inline(tmp_path_factory):
    """The study run inline, and a copy of its store taken after training, before any probe."""
    import shutil

    store = Store.init(tmp_path_factory.mktemp("inline") / "store")
    assert runner.run(parse_spec(TINY_SPEC), store, probes=False).ok
    trained = shutil.copytree(store.root, store.root.parent / "trained")
    assert runner.run(parse_spec(TINY_SPEC), store).ok
    return store.root, trained


@pytest.fixture(scope="module")
def inline_rows(inline):
    return rows(inline[0])


@pytest.fixture
def trained(inline, tmp_path):
    """A store holding the study's training, no probe results yet."""
    import shutil

    return Store(shutil.copytree(inline[1], tmp_path / "trained"))


def recipe(heading: str) -> list[str]:
    """The `lsdb` lines of the bash block under ``heading`` in docs/cluster.md."""
    text = (REPO / "docs" / "cluster.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.startswith("lsdb ")]


def test_the_manifest_recipe_runs_as_written(tiny_spec_path, tmp_path, monkeypatch, inline_rows):
    from typer.testing import CliRunner

    from lsdb.cli import app

    monkeypatch.chdir(tmp_path)  # the recipe writes jobs.jsonl where it runs
    env = {"SPEC": str(tiny_spec_path), "STORE": str(tmp_path / "store")}
    lines = recipe("Job manifests (any scheduler, no Ray)")
    commands = [shlex.split(line, comments=True)[1:] for line in lines]
    assert [c[0] for c in commands] == ["run", "plan", "worker", "worker", "ingest", "run"]
    for line, command in zip(lines, commands):
        args = [a.replace("$SPEC", env["SPEC"]).replace("$STORE", env["STORE"]) for a in command]
        res = CliRunner().invoke(app, args)
        assert res.exit_code == 0, (line, res.output, res.exception)
    assert same_rows(rows(tmp_path / "store"), inline_rows) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def recipe_store(tmp_path_factory):
    """docs/cluster.md's Ray recipe: its `lsdb` line run as written, in a shell, against a head
    the test starts (`ray start --head --block`, so stopping it stops only this cluster, where the
    recipe's `ray stop` would stop every Ray on the machine). The first time, the coordinator is
    killed (SIGKILL) after its 8th task, mid-probing; the second time it finishes the work."""
    if find_spec("ray") is None:
        pytest.skip("Ray is not installed (pip install 'lsdb[ray]' to run the Ray tests)")
    tmp = tmp_path_factory.mktemp("recipe")
    (tmp / "tiny.toml").write_text(TINY_SPEC)
    port = _free_port()
    exe = Path(lsdb_cmd()[0]).parent
    env = {**os.environ, "PATH": f"{exe}{os.pathsep}{os.environ['PATH']}", "SPEC": str(tmp / "tiny.toml"),
           "STORE": str(tmp / "store"), "RAY_ADDRESS": f"127.0.0.1:{port}",
           # the cluster's own token, whatever ~/.ray holds on this machine
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    head = subprocess.Popen([str(exe / "ray"), "start", "--head", "--block", "--port", str(port), "--num-cpus", "2",
                             "--num-gpus", "0", "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        for line in head.stdout:
            if "Ray runtime started" in line:
                break
        lines = recipe("Ray")
        assert len(lines) == 1 and "--executor ray --address auto" in lines[0]
        killed = subprocess.run(lines[0], shell=True, cwd=tmp, env={**env, "LSDB_KILL_AT": "task_done:8"},
                                capture_output=True, text=True, timeout=hang_timeout(120))
        assert killed.returncode in (137, -signal.SIGKILL), killed.stderr
        done = subprocess.run(lines[0], shell=True, cwd=tmp, env=env, capture_output=True, text=True,
                              timeout=hang_timeout(120))
        assert done.returncode == 0, done.stderr
        assert re.search(r"probe jobs: \d+ done, 0 skipped, 0 failed", done.stdout), done.stdout
    finally:
        head.send_signal(signal.SIGINT)  # what Ctrl-C does to `ray start --block`: stops its processes
        try:
            head.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.communicate()
    return tmp / "store"


@needs_ray
@pytest.mark.slow
def test_ray_the_pool_and_inline_store_the_same_rows(recipe_store, inline_rows, tmp_path):
    pool = Store.init(tmp_path / "pool")
    assert runner.run(parse_spec(TINY_SPEC), pool, workers=2).ok
    got = rows(recipe_store)
    assert got["eval"] and got["weights"]
    assert same_rows(got, inline_rows) == []
    assert row_differences(got, rows(pool.root)) == []  # one thread each: bit for bit


def where(i, device=None, nap=0.5):
    """What a task was given (a function with a ``device`` parameter asks for GPUs)."""
    import ray

    t0 = time.time()
    time.sleep(nap)
    return dict(i=i, gpus=ray.get_gpu_ids(), visible=os.environ.get("CUDA_VISIBLE_DEVICES"), pid=os.getpid(),
                span=(t0, time.time()))


def where_cpu(i):
    import ray

    return dict(gpus=ray.get_gpu_ids(), visible=os.environ.get("CUDA_VISIBLE_DEVICES"))


@needs_ray
def test_each_task_sees_its_own_gpu_and_a_cpu_task_none(ray_cluster):
    ex = make_executor(2, "ray")  # the cluster has GPUs: one per job by default
    try:
        assert ex.gpus_per_job == 1.0
        seen = list(ex.map(where, [(i,) for i in range(3)]))  # two at once, then one on a freed GPU
        cpu = list(ex.map(where_cpu, [(0,)]))
    finally:
        ex.close()
    assert sorted(s["i"] for s in seen) == [0, 1, 2]
    for s in seen:
        assert len(s["gpus"]) == 1 and s["visible"] == str(s["gpus"][0])
    for a in seen:  # tasks that ran at the same time held different GPUs
        for b in seen:
            if a is not b and a["span"][0] < b["span"][1] and b["span"][0] < a["span"][1]:
                assert a["gpus"] != b["gpus"]
    assert len({s["pid"] for s in seen}) == 3  # a GPU task's process ends with it, freeing its memory
    assert cpu == [dict(gpus=[], visible="")]


@needs_ray
def test_asking_for_more_gpus_than_the_cluster_has_fails_at_once(ray_cluster, tiny_spec_path, tmp_path):
    from typer.testing import CliRunner

    from lsdb.cli import app

    t0 = time.monotonic()
    with pytest.raises(LsdbError) as e:
        make_executor(1, "ray", gpus_per_job=3)
    assert str(e.value) == ("--gpus-per-job 3: each job asks for 3 GPUs, but the Ray cluster (local) has 2 GPUs "
                            "and 2 CPUs; ask for at most 2")
    assert time.monotonic() - t0 < 5
    res = CliRunner().invoke(app, ["run", str(tiny_spec_path), "--store", str(tmp_path / "s"), "--executor", "ray",
                                   "--gpus-per-job", "3", "--no-progress"])
    assert isinstance(res.exception, LsdbError) and "asks for 3 GPUs" in str(res.exception)


def _claim(marker: Path) -> bool:
    """True for the first process (of any worker) to get here, False after."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return False
    return True


def train_dies_once(entry, marker, task):
    """The first training task to finish is killed (no cleanup) after writing its shards, so Ray's
    retry trains the run again and writes them a second time."""
    result = entry(task)
    if _claim(Path(marker)):
        os._exit(1)
    return result


def probe_dies_once(store_root, job, device=None, marker=""):
    """The first job to finish is killed after writing its shard: Ray's retry writes another."""
    from lsdb.probes.worker import run_probe_job

    result = run_probe_job(store_root, job, device)
    if _claim(Path(marker)):
        os._exit(1)
    return result


@needs_ray
@pytest.mark.slow
def test_tasks_killed_after_writing_are_retried_without_duplicate_rows(ray_cluster, inline_rows, tmp_path,
                                                                      monkeypatch):
    store = Store.init(tmp_path / "store")
    train_marker, probe_marker = tmp_path / "train-died", tmp_path / "probe-died"
    monkeypatch.setattr(runner, "_train_entry", functools.partial(train_dies_once, runner._train_entry,
                                                                  str(train_marker)))
    monkeypatch.setattr(runner, "run_probe_job", functools.partial(probe_dies_once, marker=str(probe_marker)))
    s = runner.run(parse_spec(TINY_SPEC), store, executor="ray", gpus_per_job=0)
    assert train_marker.exists() and probe_marker.exists()  # one training and one probe task died
    assert s.ok and s.trained == 6 and s.jobs_done == 74
    assert same_rows(rows(store.root), inline_rows) == []  # attempts included: one per job


def probe_always_dies(store_root, job, device=None):
    os._exit(1)


@needs_ray
def test_a_probe_job_lost_on_every_try_is_recorded_failed_with_rays_error(ray_cluster, trained, tmp_path):
    import dataclasses

    from lsdb.ingest.ingest import ingest
    from lsdb.probes.worker import run_probe_job

    jobs = runner.ready_jobs(parse_spec(TINY_SPEC), trained)
    ex = make_executor(2, "ray", gpus_per_job=0)
    try:
        lost = list(ex.map(probe_always_dies, [(str(trained.root), jobs[0], None)]))
    finally:
        ex.close()
    assert len(lost) == 1 and lost[0]["state"] == "failed"
    assert lost[0]["error"].startswith("WorkerCrashedError: ")
    # what a worker writes for a job that fails before it computes, less what only a live worker
    # knows (its threads, its memory): ingest stores those as null
    early = run_probe_job(str(tmp_path / "elsewhere"), dataclasses.replace(jobs[1], probe="no-such-probe"), "cpu")
    assert early["state"] == "failed" and lost[0].keys() <= early.keys()
    ingest(trained)
    with trained.read() as con:  # one attempt by lsdb's count (Ray's retries are inside it), then retried
        assert con.execute("SELECT state, attempts, error LIKE 'WorkerCrashedError%' FROM probe_job WHERE id = ?",
                           [jobs[0].id]).fetchall() == [("failed", 1, True)]


def dies_if(die: bool) -> bool:
    if die:
        os._exit(1)
    return die


@needs_ray
def test_a_lost_task_that_is_no_probe_job_stops_the_run_after_the_others(ray_cluster):
    from lsdb.errors import WorkerDied

    ex = make_executor(2, "ray")
    got = []
    try:
        with pytest.raises(WorkerDied, match=r"^1 of 2 Ray tasks died 3 times \(WorkerCrashedError: .*rerun the same"):
            for r in ex.map(dies_if, [(True,), (False,)]):
                got.append(r)
    finally:
        ex.close()
    assert got == [False]


def refuses(x):
    raise LsdbError(f"checkpoint {x} is damaged")


@needs_ray
def test_an_error_raised_by_the_task_reaches_the_caller_as_itself(ray_cluster):
    ex = make_executor(2, "ray")
    try:
        with pytest.raises(LsdbError, match="^checkpoint 7 is damaged$"):  # one line for the CLI, as inline
            list(ex.map(refuses, [(7,)]))
    finally:
        ex.close()


def nap(seconds):
    time.sleep(seconds)
    return seconds


@needs_ray
def test_ctrl_c_cancels_the_outstanding_tasks(ray_cluster):
    ex = make_executor(2, "ray")
    got = []
    t0 = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            for r in ex.map(nap, [(0,), (60,), (60,), (60,)]):
                got.append(r)
                threading.Timer(0.5, os.kill, (os.getpid(), 2)).start()  # Ctrl-C while waiting for the rest
    finally:
        ex.close()
    assert got == [0] and time.monotonic() - t0 < 20
    deadline = time.monotonic() + 20
    while ray_cluster.available_resources().get("CPU", 0) < 2:  # the cancelled tasks gave their CPUs back
        assert time.monotonic() < deadline, ray_cluster.available_resources()
        time.sleep(0.2)


def probe_waits_after_two(store_root, job, device=None, marker_dir=""):
    """The first two jobs run; the others wait (until cancelled)."""
    from lsdb.probes.worker import run_probe_job

    if not any(_claim(Path(marker_dir) / f"fast-{k}") for k in range(2)):
        time.sleep(120)
    return run_probe_job(store_root, job, device)


@needs_ray
@pytest.mark.slow
def test_ctrl_c_during_a_run_keeps_what_finished_and_a_rerun_completes(ray_cluster, inline_rows, trained,
                                                                      tmp_path, monkeypatch):
    store, spec = trained, parse_spec(TINY_SPEC)
    monkeypatch.setattr(runner, "run_probe_job", functools.partial(probe_waits_after_two, marker_dir=str(tmp_path)))

    def interrupt_after_two_shards():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len([p for p in store.spool.rglob("job-*") if p.is_dir()]) >= 2:
                time.sleep(0.3)
                os.kill(os.getpid(), 2)
                return
            time.sleep(0.1)

    threading.Thread(target=interrupt_after_two_shards, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        runner.run(spec, store, executor="ray", gpus_per_job=0)
    with store.read() as con:  # ingested on the way out
        assert con.execute("SELECT count(*) FROM probe_job WHERE state = 'done'").fetchone()[0] == 2
    monkeypatch.undo()
    again = runner.run(spec, store)  # inline: the cancelled tasks' workers are gone, a new Ray one starts cold
    assert again.ok and again.jobs_done == 72
    assert same_rows(rows(store.root), inline_rows) == []
