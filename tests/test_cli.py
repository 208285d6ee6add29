"""The CLI: wiring (CliRunner), help on every command, and one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess

import pytest
from typer.testing import CliRunner

from lsdb.cli import app
from tests.conftest import lsdb_cmd
from tests.timeouts import hang_timeout

runner = CliRunner()


def lsdb(*args, env=None, cwd=None):
    return subprocess.run(lsdb_cmd() + list(args), capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=hang_timeout(300))


def test_every_command_has_help():
    import typer.main

    group = typer.main.get_command(app)
    assert len(group.commands) >= 9
    for name, cmd in group.commands.items():
        assert cmd.help and cmd.help.strip(), f"command {name} has no help"
        result = runner.invoke(app, [name, "--help"])
        assert result.exit_code == 0, name


def test_help_does_not_import_torch():
    code = "import sys; from lsdb.cli import app; assert 'torch' not in sys.modules, 'torch imported'"
    import sys

    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_init_then_sql_formats(tmp_path):
    s = str(tmp_path / "st")
    assert runner.invoke(app, ["init", "--store", s]).exit_code == 0
    r = runner.invoke(app, ["sql", "SELECT 1 AS a, 'x' AS b", "--store", s, "--format", "csv"])
    assert r.stdout == "a,b\n1,x\n"
    r = runner.invoke(app, ["sql", "SELECT 1 AS a", "--store", s, "--format", "json"])
    assert json.loads(r.stdout) == [{"a": 1}]
    out = tmp_path / "o.parquet"
    r = runner.invoke(app, ["sql", "SELECT range AS i FROM range(250000)", "--store", s, "--format", "parquet",
                            "--out", str(out)])
    import polars as pl

    assert r.exit_code == 0 and pl.read_parquet(out).height == 250000


def test_store_from_environment(tmp_path, cli_env):
    cli_env["LSDB_STORE"] = str(tmp_path / "envstore")
    assert lsdb("init", env=cli_env).returncode == 0
    assert (tmp_path / "envstore" / "lsdb.duckdb").exists()


@pytest.mark.parametrize("text, expected", [
    ("[optim\nlr = 1\n", "malformed TOML"),
    ("[optim]\nlrr = 1\n", "unknown key 'optim.lrr'; did you mean 'lr'?"),
    ("[optim]\nlr = -1.0\n", "optim.lr = -1.0 must be > 0"),
    ("[model]\nname = 'resnet'\n", "model.name = 'resnet' must be one of"),
])
def test_bad_specs_get_one_line(tmp_path, cli_env, text, expected):
    spec = tmp_path / "bad.toml"
    spec.write_text(text)
    r = lsdb("plan", str(spec), "--store", str(tmp_path / "s"), env=cli_env)
    assert r.returncode == 1
    assert expected in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_missing_store_and_write_attempt(tmp_path, cli_env):
    r = lsdb("runs", "--store", str(tmp_path / "nowhere"), env=cli_env)
    assert r.returncode == 1 and r.stderr.startswith("error: no store at") and "lsdb init" in r.stderr
    lsdb("init", "--store", str(tmp_path / "s"), env=cli_env)
    r = lsdb("sql", "DROP TABLE run", "--store", str(tmp_path / "s"), env=cli_env)
    assert r.returncode == 1 and "read-only" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_busy_store(tmp_path, cli_env, tiny_spec_path):
    from lsdb.store import Store

    store = Store.init(tmp_path / "s")
    with store.lock("lsdb run"):
        r = lsdb("run", str(tiny_spec_path), "--store", str(store.root), env=cli_env)
    assert r.returncode == 1 and "is busy" in r.stderr and "pid" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unknown_run(tmp_path):
    s = str(tmp_path / "st")
    runner.invoke(app, ["init", "--store", s])
    r = lsdb("show", "abc", "--store", s)
    assert r.returncode == 1 and "no run 'abc'" in r.stderr


def test_manifest_worker_ingest_round_trip(tiny_spec_path, tmp_path, cli_env):
    """Train only, write a manifest, run it in two worker shards, ingest: same rows as `lsdb run`."""
    from lsdb.query.session import Session

    s = str(tmp_path / "s")
    assert lsdb("run", str(tiny_spec_path), "--store", s, "--no-probes", env=cli_env).returncode == 0
    manifest = tmp_path / "jobs.jsonl"
    r = lsdb("plan", str(tiny_spec_path), "--store", s, "--manifest", str(manifest), env=cli_env)
    assert r.returncode == 0 and "ready probe jobs" in r.stdout
    n_jobs = len(manifest.read_text().splitlines())
    for shard in ("0/2", "1/2"):
        r = lsdb("worker", str(manifest), "--store", s, "--shard", shard, env=cli_env)
        assert r.returncode == 0, r.stderr
    r = lsdb("ingest", "--store", s, env=cli_env)
    assert f"{n_jobs} probe jobs" in r.stdout
    assert Session.open(s).sql("SELECT count(*) AS n FROM probe_job WHERE state = 'done'")["n"][0] == n_jobs
    r = lsdb("run", str(tiny_spec_path), "--store", s, env=cli_env)
    assert "nothing to do" in r.stdout


def test_plan_creates_nothing(tiny_spec_path, tmp_path, cli_env):
    r = lsdb("plan", str(tiny_spec_path), "--store", str(tmp_path / "new"), env=cli_env)
    assert r.returncode == 0 and "does not exist yet" in r.stdout and "runs to train:       6" in r.stdout
    assert not (tmp_path / "new").exists()


def test_large_csv_export_streams_to_a_file(tmp_path):
    s = str(tmp_path / "st")
    runner.invoke(app, ["init", "--store", s])
    out = tmp_path / "big.csv"
    r = runner.invoke(app, ["sql", "SELECT range AS i, range * 0.5 AS x FROM range(300000)", "--store", s,
                            "--format", "csv", "--out", str(out)])
    assert r.exit_code == 0
    lines = out.read_text().splitlines()
    assert lines[0] == '"i","x"' or lines[0] == "i,x"
    assert len(lines) == 300001
