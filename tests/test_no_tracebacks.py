"""Bad input from the machine or the user ends every command in one line on stderr and exit code
1, never a traceback: a database file that is not DuckDB's, a spec that is a folder, binary or
UTF-16, a store path that is a file, a read-only store."""

from __future__ import annotations

import subprocess

import pytest

from lsdb.store import Store
from tests.conftest import TINY_SPEC, lsdb_cmd

READS = [["runs"], ["metrics"], ["jobs"], ["show", "abc"], ["sql", "SELECT 1"], ["check"], ["findings"],
         ["correlate", "test_error", "train_loss"], ["transition", "test_error"],
         ["chart", "test_error", "--out", "x.html"]]


def one_line_error(args, cwd, capsys, monkeypatch) -> str:
    """Run the console entry point in this process (what `lsdb ARGS` runs, minus an interpreter
    start): an exception escaping main() would fail the test with its traceback."""
    from lsdb.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr("sys.argv", ["lsdb", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    assert e.value.code == 1, (args, out.out, out.err)
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), (args, out.err)
    return lines[0]


@pytest.fixture
def fail(tmp_path, capsys, monkeypatch):
    return lambda args: one_line_error(args, tmp_path, capsys, monkeypatch)


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "tiny.toml"
    p.write_text(TINY_SPEC)
    return p


def test_a_database_file_that_is_not_duckdb(tmp_path, spec, fail):
    store = Store.init(tmp_path / "s")
    store.db_path.write_bytes(b"not a database" * 100)
    for args in READS + [["run", str(spec)], ["ingest"], ["plan", str(spec)], ["init"]]:
        line = fail([*args, "--store", str(store.root)])
        assert "lsdb rebuild" in line, line


@pytest.mark.parametrize("content", [None, b"\x00\x01\x02binary", TINY_SPEC.encode("utf-16")],
                         ids=["directory", "binary", "utf-16"])
def test_a_spec_that_is_not_a_toml_text_file(tmp_path, content, fail):
    path = tmp_path / "spec.toml"
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    for command in ("plan", "run"):
        line = fail([command, str(path), "--store", str(tmp_path / "s")])
        assert str(path) in line


def test_a_store_path_that_is_a_file(tmp_path, spec, fail):
    target = tmp_path / "afile"
    target.write_text("x")
    for args in (["init"], ["run", str(spec)]):
        assert "is a file" in fail([*args, "--store", str(target)])
    for args in READS:
        fail([*args, "--store", str(target)])
    assert target.read_text() == "x"


def test_a_read_only_store(tmp_path, spec, fail):
    """A store on a read-only file system: reads work, writes say so in one line."""
    mount = tmp_path / "ro"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=32m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        Store.init(mount / "s")
        assert subprocess.run(["mount", "-o", "remount,ro", str(mount)], capture_output=True).returncode == 0
        for args in (["run", str(spec)], ["ingest"], ["init"]):
            line = fail([*args, "--store", str(mount / "s")])
            assert "Read-only file system" in line or "read-only" in line.lower(), line
        ok = subprocess.run([*lsdb_cmd(), "runs", "--store", str(mount / "s")], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
