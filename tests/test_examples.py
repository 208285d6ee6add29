"""Every example spec runs: the quick pipeline demo end to end, the demo study end to end with
findings and report, and the full study at least plans (it takes minutes; see README)."""

from __future__ import annotations

import subprocess

import pytest

import lsdb
from lsdb.query.findings import FINDINGS
from tests.chromium import external_requests, render, require_chromium
from tests.conftest import REPO, lsdb_cmd
from tests.timeouts import hang_timeout


def lsdb_run(*args, env):
    r = subprocess.run(lsdb_cmd() + list(args), capture_output=True, text=True, env=env, timeout=hang_timeout(900))
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout


@pytest.mark.slow
def test_quick_example_end_to_end(tmp_path, cli_env):
    from lsdb.plan import expand_runs
    from lsdb.plan import load_spec

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
    n_pairs = sum(len(r.save_steps) - 1 for r in runs)
    # kernel probes (issue 3): distance to init, velocity for every
    # consecutive pair, kernel accuracy at every checkpoint of every run
    # every checkpoint of every run (children measure from their trajectory's init), but the inits
    assert per_metric["kernel_distance_to_init"] == n_ckpt - 2
    assert per_metric["kernel_velocity"] == n_pairs
    assert per_metric["linearised_test_error"] == per_metric["kernel_regression_test_error"] == n_ckpt
    # geometry probes (issue 4): top eigenvalue and trace everywhere, a barrier curve per sibling pair
    assert per_metric["hessian_top_eigenvalue"] == per_metric["hessian_trace"] == n_ckpt
    curves = db.sql("SELECT count(DISTINCT c.job_id) AS n FROM barrier_curve c JOIN probe_job j ON j.id = c.job_id "
                    "WHERE j.role = 'siblings'")["n"][0]
    assert curves == 4
    assert "nothing to do" in lsdb_run("run", str(spec), "--store", store, env=cli_env)
    corr = lsdb_run("correlate", "kernel_velocity", "test_error", "--store", store, "--format", "csv", env=cli_env)
    assert len(corr.strip().splitlines()) >= 2
    for name, suffix in (("barrier", "html"), ("slice_2d", "svg")):
        out = tmp_path / f"{name}.{suffix}"
        lsdb_run("chart", "--name", name, "--store", store, "--out", str(out), env=cli_env)
        assert out.stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.chromium
def test_demo_quick_gives_a_verdict_for_every_finding_and_a_report(tmp_path, cli_env):
    binary = require_chromium()  # before the demo: minutes of training for a test that would skip
    store = str(tmp_path / "store")
    report = tmp_path / "report.html"
    out = lsdb_run("demo", "--quick", "--store", store, "--report", str(report), env=cli_env)
    verdicts = [line for line in out.splitlines() if line[:1] == "F" and line[1:3].strip().isdigit()]
    assert len(verdicts) == len(FINDINGS)
    assert all(any(v in line for v in ("HOLDS", "DOES NOT HOLD", "INCONCLUSIVE", "NOT MEASURED")) for line in verdicts)
    measured = [line for line in verdicts if "NOT MEASURED" not in line]
    assert len(measured) >= 8  # the quick study measures the kernel, barrier and Hessian findings
    again = lsdb_run("findings", "--store", store, env=cli_env)
    # the same store gives the same findings, line for line (verdicts, numbers, notes)
    findings_part = out[out.index("F1 "):out.index("report written")].strip()
    assert again.strip() == findings_part
    got = render(report, binary=binary, ready="document.body.dataset.rendered || document.body.dataset.failed",
                 probe="document.querySelectorAll('.chart svg').length")
    assert got.errors == [] and external_requests(got) == []
    assert got.probe and int(got.probe) > 0


@pytest.mark.parametrize("name", ["fort2020-mnist1d.toml", "fort2020-mnist1d-quick.toml"])
def test_demo_specs_plan_every_probe(name):
    from lsdb.plan import expand_runs, probe_requests, simulated_study
    from lsdb.plan import load_spec

    spec = load_spec(REPO / "examples" / name)
    runs = expand_runs(spec, 4000)
    probes = {req[0] for req in probe_requests(spec, simulated_study(runs))}
    # ntk_distance needs stored kernels first, so a dry plan cannot list it
    assert probes >= set(spec.probe_params()) - {"ntk_distance"}
