"""``lsdb submit --slurm``: the scripts it writes, and their command lines run here as Slurm would.

No Slurm is needed: each ``.sbatch`` file is a bash script whose ``#SBATCH`` lines are comments,
so the test runs the training job, every array task (``SLURM_ARRAY_TASK_ID`` set by hand, one task
twice, as a requeue would) and the final job, and compares the store with one ``lsdb run`` made.
"""

from __future__ import annotations

import subprocess

import pytest

from lsdb import runner
from lsdb.plan import parse_spec
from lsdb.store import Store
from tests.conftest import TINY_SPEC, lsdb_cmd, row_differences, stored_rows
from tests.timeouts import hang_timeout

SPEC = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("times = [1.0]", "times = []")
TABLES = ("run", "checkpoint", "probe_job", "eval", "weights")


def cli(*args, env, cwd=None):
    return subprocess.run(lsdb_cmd() + list(args), capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=hang_timeout(300))


def test_dry_run_prints_three_chained_jobs(tmp_path, cli_env):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    r = cli("submit", str(spec), "--slurm", "--array-size", "3", "--gpus", "1", "--partition", "gpu",
            "--store", str(tmp_path / "s"), "--dry-run", env=cli_env)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "#SBATCH --array=0-2" in out and "#SBATCH --gpus=1" in out and "#SBATCH --partition=gpu" in out
    assert '--shard "${SLURM_ARRAY_TASK_ID}/3" --device cuda' in out
    assert "--dependency=afterok:${train}" in out and "--dependency=afterany:${probe}" in out
    assert "--no-probes" in out and "--manifest" in out
    assert not (tmp_path / "s").exists()  # a dry run writes nothing


def test_submit_without_a_scheduler_names_one(tmp_path, cli_env):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    r = cli("submit", str(spec), "--store", str(tmp_path / "s"), env=cli_env)
    assert r.returncode == 1 and "--slurm" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_the_scripts_run_as_written_give_the_rows_of_lsdb_run(tmp_path, cli_env):
    spec = tmp_path / "tiny.toml"
    spec.write_text(SPEC)
    folder = tmp_path / "jobs"
    env = {k: v for k, v in cli_env.items() if k != "PATH"}
    env["PATH"] = "/usr/bin:/bin"  # no sbatch here: submit writes the scripts and says how to submit them
    r = cli("submit", str(spec), "--slurm", "--array-size", "2", "--store", str(tmp_path / "s"), "--dir", str(folder),
            env=env)
    assert r.returncode == 1 and "sbatch not found" in r.stderr and f"bash {folder}/submit.sh" in r.stderr

    def sh(name, **extra):
        done = subprocess.run(["bash", str(folder / name)], capture_output=True, text=True,
                              env={**cli_env, **extra}, timeout=hang_timeout(600))
        assert done.returncode == 0, (name, done.stderr)

    sh("train.sbatch")
    for task in ("0", "1", "1"):  # task 1 twice: Slurm requeues run a task again
        sh("probe.sbatch", SLURM_ARRAY_TASK_ID=task)
    sh("finish.sbatch")

    direct = Store.init(tmp_path / "direct")
    assert runner.run(parse_spec(SPEC), direct).ok
    skip = ("attempts",)  # the requeued task's job is attempted once per process
    assert row_differences(stored_rows(direct.root, TABLES, skip), stored_rows(tmp_path / "s", TABLES, skip)) == []


def test_scripts_quote_paths_and_carry_lsdb_path(tmp_path, monkeypatch):
    from pathlib import Path

    from lsdb.submit import SlurmPlan, scripts

    monkeypatch.setenv("LSDB_PATH", "/my models")
    text = scripts(SlurmPlan(spec=Path("a b.toml"), store=tmp_path / "st ore", folder=tmp_path / "f"))
    assert "'" + str((tmp_path / "st ore").resolve()) + "'" in text["train.sbatch"]
    assert "export LSDB_PATH='/my models'" in text["probe.sbatch"]
    assert text["probe.sbatch"].splitlines()[1] == "#SBATCH --job-name=lsdb-probe-a_b"
