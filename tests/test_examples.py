"""Every example spec runs: the quick pipeline demo end to end, the demo study end to end with
findings and report, and the full study at least plans (it takes minutes; see README)."""

from __future__ import annotations

import subprocess

import pytest

import lsdb
from tests.chromium import external_requests, render, require_chromium
from tests.conftest import REPO, lsdb_cmd


def lsdb_run(*args, env):
    r = subprocess.run(lsdb_cmd() + list(args), capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_quick_example_end_to_end(tmp_path, cli_env):
    from lsdb.plan import expand_runs
    from lsdb.spec import load_spec

    store = str(tmp_path / "store")
    spec = REPO / "examples" / "quick.toml"
    out = lsdb_run("run", str(spec), "--store", store, env=cli_env)
    assert "0 failed" in out
    runs = expand_runs(load_spec(spec), 1437)
    n_ckpt = sum(len(r.save_steps) for r in runs)
    db = lsdb.open(store)
    assert db.sql("SELECT count(*) AS n FROM checkpoint")["n"][0] == n_ckpt
    per_metric = dict(db.sql("SELECT metric, count(*) FROM metric_series GROUP BY metric").rows())
    assert per_metric["test_error"] == per_metric["eval_test_error"] == per_metric["weight_norm"] == n_ckpt
    assert per_metric["sibling_distance"] == 2 * 2  # 2 seeds × 2 spawn times × 1 pair
    assert "nothing to do" in lsdb_run("run", str(spec), "--store", store, env=cli_env)
    corr = lsdb_run("correlate", "test_error", "distance_to_init", "--store", store, "--format", "csv", env=cli_env)
    assert "pooled" in corr or "spearman" in corr


@pytest.mark.slow
@pytest.mark.chromium
def test_demo_quick_gives_a_verdict_for_every_finding_and_a_report(tmp_path, cli_env):
    store = str(tmp_path / "store")
    report = tmp_path / "report.html"
    out = lsdb_run("demo", "--quick", "--store", store, "--report", str(report), env=cli_env)
    verdicts = [line for line in out.splitlines() if line[:1] == "F" and line[1:3].strip().isdigit()]
    assert len(verdicts) == 14
    assert all(any(v in line for v in ("HOLDS", "DOES NOT HOLD", "NOT MEASURED")) for line in verdicts)
    measured = [line for line in verdicts if "NOT MEASURED" not in line]
    assert len(measured) >= 8  # the quick study measures the kernel, barrier and Hessian findings
    again = lsdb_run("findings", "--store", store, env=cli_env)
    assert sum(("HOLDS" in line or "NOT MEASURED" in line) for line in again.splitlines()) >= 1
    binary = require_chromium()
    got = render(report, binary=binary, ready="document.body.dataset.rendered || document.body.dataset.failed",
                 probe="document.querySelectorAll('.chart svg').length")
    assert got.errors == [] and external_requests(got) == []
    assert got.probe and int(got.probe) > 0


@pytest.mark.parametrize("name", ["fort2020-mnist1d.toml", "fort2020-mnist1d-quick.toml"])
def test_demo_specs_plan_every_probe(name):
    from lsdb.plan import expand_runs, probe_requests, simulated_study
    from lsdb.spec import load_spec

    spec = load_spec(REPO / "examples" / name)
    runs = expand_runs(spec, 4000)
    probes = {req[0] for req in probe_requests(spec, simulated_study(runs))}
    # ntk_distance needs stored kernels first, so a dry plan cannot list it
    assert probes >= set(spec.probe_params()) - {"ntk_distance"}
