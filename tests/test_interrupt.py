"""SIGKILL `lsdb run` mid-training and mid-ingest, rerun, and end with exactly the clean rows."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from lsdb import runner
from lsdb.spec import load_spec
from lsdb.store import Store
from tests.conftest import lsdb_cmd
from tests.test_pipeline import snapshot


@pytest.mark.slow
@pytest.mark.parametrize("kill_after_shards", [3, 25])
def test_sigkill_and_rerun_matches_a_clean_run(tiny_spec_path, tmp_path, cli_env, kill_after_shards):
    spec = load_spec(tiny_spec_path)
    clean = Store.init(tmp_path / "clean")
    runner.run(spec, clean)

    root = tmp_path / "killed"
    proc = subprocess.Popen(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root), "--no-progress"],
                            env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
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
                           env=cli_env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert snapshot(Store.open(root)) == snapshot(clean)
    again = subprocess.run(lsdb_cmd() + ["run", str(tiny_spec_path), "--store", str(root)],
                           env=cli_env, capture_output=True, text=True, timeout=120)
    assert "nothing to do" in again.stdout
