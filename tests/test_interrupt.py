"""SIGKILL `lsdb run` mid-training and mid-ingest, rerun, and end with exactly the clean rows."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from lsdb import runner
from lsdb.plan import load_spec
from lsdb.store import Store
from tests.conftest import lsdb_cmd
from tests.test_pipeline import snapshot
from tests.timeouts import hang_timeout


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [3, 25])
def test_sigkill_and_rerun_matches_a_clean_run(tiny_spec_path, tmp_path, cli_env, kill_after_shards):
    spec = load_spec(tiny_spec_path)
    clean = Store.init(tmp_path / "clean")
    runner.run(spec, clean)

    root = tmp_path / "killed"
    proc = subprocess.Popen(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root), "--no-progress"],
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + hang_timeout(120)
    # wait until the run has written (and partly ingested) some shards, then kill it hard
    while time.monotonic() < deadline and proc.poll() is None:
        done = len(list((root / "spool" / "ingested").glob("*"))) if (root / "spool" / "ingested").exists() else 0
        waiting = len(list((root / "spool").glob("*-*"))) if (root / "spool").exists() else 0
        if done + waiting >= kill_after_shards:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()

    rerun = subprocess.run(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root), "--no-progress"],
                           env=cli_env, capture_output=True, text=True, timeout=hang_timeout(300))
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(Store.open(root)) == snapshot(clean)
    again = subprocess.run(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root)],
                           env=cli_env, capture_output=True, text=True, timeout=hang_timeout(120))
    assert "nothing to do" in again.stdout


@pytest.mark.slow
def test_a_killed_worker_is_one_clear_error_and_rerun_finishes(tiny_spec_path, tmp_path, cli_env):
    import os

    spec = load_spec(tiny_spec_path)
    clean = Store.init(tmp_path / "clean")
    runner.run(spec, clean)

    root = tmp_path / "s"
    proc = subprocess.Popen(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root), "--workers", "2",
                                          "--no-progress"], env=cli_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + hang_timeout(120)
    victim = None
    while time.monotonic() < deadline and victim is None and proc.poll() is None:
        workers = [pid for pid in _children(proc.pid) if "spawn_main" in _cmdline(pid)]
        if workers and (root / "spool" / "ingested").exists() and any((root / "spool" / "ingested").iterdir()):
            victim = int(workers[0])
        time.sleep(0.05)
    assert victim is not None, "no worker process to kill"
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=hang_timeout(120))
    assert proc.returncode == 1, (out, err)
    assert "a worker process died" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rerun = subprocess.run(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root), "--no-progress"],
                           env=cli_env, capture_output=True, text=True, timeout=hang_timeout(300))
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(Store.open(root)) == snapshot(clean)


def _children(pid: int) -> list[int]:
    from pathlib import Path

    out = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            out.append(int(status.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return open(f"/proc/{pid}/cmdline").read()
    except OSError:
        return ""
