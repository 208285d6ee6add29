"""--format and --out: the same bytes on stdout and in a file, empty results, parquet, one JSON document."""

from __future__ import annotations

import io
import json
import math

import polars as pl
import pytest
import typer.main
from typer.testing import CliRunner

from lsdb.cli import app
from lsdb.cli_common import Format, emit
from lsdb.errors import LsdbError

from .conftest_query import StoreBuilder

runner = CliRunner()
EPOCHS = (0, 0.5, 1, 2, 4, 8, 16, 40)
# The arguments a command needs on the small store below (the commands themselves come from the app).
ARGS = {"sql": ["SELECT id, seed FROM run ORDER BY id"], "show": ["p0"],
        "correlate": ["train_loss", "test_loss"], "transition": ["train_loss"]}
# A query whose CSV needs quoting, nulls, NaN, floats and timestamps, over more than one Arrow batch.
AWKWARD = ("SELECT range AS i, range * 0.1 AS x, CASE WHEN range % 3 = 0 THEN NULL ELSE 'a,\"b\"' END AS s, "
           "CASE WHEN range = 5 THEN 'nan'::DOUBLE END AS f, TIMESTAMP '2024-01-01 00:00:00' AS t "
           "FROM range(250000)")


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two runs of eight checkpoints: enough rows for every query command, no training."""
    b = StoreBuilder(tmp_path_factory.mktemp("exports"))
    for rid, seed in (("p0", 0), ("p1", 1)):
        b.run(rid, seed=seed)
        for i, e in enumerate(EPOCHS):
            b.checkpoint(rid, e, train_loss=2 + math.sin(i), test_loss=1 + math.cos(i))
    return b.flush()


@pytest.fixture(scope="module")
def empty(tmp_path_factory):
    return StoreBuilder(tmp_path_factory.mktemp("empty")).flush()


def offering(fmt: str) -> dict:
    """The commands whose --format offers ``fmt``, with their click objects."""
    out = {}
    for name, cmd in typer.main.get_command(app).commands.items():
        opt = next((p for p in cmd.params if "--format" in getattr(p, "opts", ())), None)
        if opt is not None and fmt in _choices(opt):
            out[name] = cmd
    return out


def _choices(option) -> list[str]:
    if hasattr(option, "type_descriptor"):  # Typer >= 0.2x keeps the annotation (an Enum) here
        return [e.value for e in option.type_descriptor.annotation]
    return list(option.type.choices)


def invoke(name, store, *extra):
    res = runner.invoke(app, [name, *ARGS.get(name, []), "--store", str(store.root), *extra])
    assert res.exit_code == 0, f"lsdb {name}: {res.output}"
    return res


# ------------------------------------------------------------------------------ csv bytes
@pytest.mark.parametrize("args", [["sql", AWKWARD], ["sql", "SELECT * FROM checkpoint ORDER BY id"], ["runs"]])
def test_csv_on_stdout_and_in_a_file_are_the_same_bytes(store, tmp_path, args):
    out = tmp_path / "out.csv"
    shown = runner.invoke(app, [*args, "--store", str(store.root), "-f", "csv"])
    written = runner.invoke(app, [*args, "--store", str(store.root), "-f", "csv", "--out", str(out)])
    assert shown.exit_code == 0 and written.exit_code == 0, shown.output + written.output
    assert shown.stdout_bytes == out.read_bytes()
    assert shown.stdout_bytes.endswith(b"\n") and not shown.stdout_bytes.endswith(b"\n\n")


# --------------------------------------------------------------------------- empty results
def test_an_empty_result_still_writes_the_file(store, empty, tmp_path):
    """runs on a store without runs: a header-only CSV, [] and an empty parquet table with the columns."""
    header = invoke("runs", store, "-f", "csv").stdout.splitlines()[0]
    for fmt, check in (("csv", lambda p: p.read_text() == header + "\n"),
                       ("json", lambda p: json.loads(p.read_text()) == []),
                       ("parquet", lambda p: pl.read_parquet(p).height == 0 and pl.read_parquet(p).width > 0)):
        out = tmp_path / f"runs.{fmt}"
        res = runner.invoke(app, ["runs", "-s", str(empty.root), "-f", fmt, "--out", str(out)])
        assert res.exit_code == 0 and out.exists() and check(out), (fmt, res.output)


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_an_empty_sql_export_writes_the_header_or_says_it_wrote_nothing(store, tmp_path, fmt):
    out = tmp_path / f"none.{fmt}"
    res = runner.invoke(app, ["sql", "SELECT id, seed FROM run WHERE false", "-s", str(store.root), "-f", fmt,
                              "--out", str(out)])
    assert res.exit_code == 0, res.output
    if out.exists():
        read = pl.read_csv if fmt == "csv" else pl.read_parquet
        assert read(out).columns == ["id", "seed"] and read(out).height == 0
    else:
        assert "nothing written" in res.stderr


def test_an_empty_table_says_no_rows(empty):
    res = runner.invoke(app, ["runs", "-s", str(empty.root)])
    assert res.exit_code == 0 and res.stdout == "" and res.stderr.startswith("no rows")


# -------------------------------------------------------------------------------- parquet
def test_every_command_offering_parquet_takes_out():
    lacking = [name for name, cmd in offering("parquet").items()
               if not any("--out" in getattr(p, "opts", ()) for p in cmd.params)]
    assert not lacking, f"--format parquet without --out: {lacking}"


@pytest.mark.parametrize("name", sorted(offering("parquet")))
def test_parquet_out_round_trips(store, tmp_path, name):
    if not any("--out" in getattr(p, "opts", ()) for p in offering("parquet")[name].params):
        pytest.skip(f"lsdb {name} has no --out (test_every_command_offering_parquet_takes_out fails)")
    out = tmp_path / f"{name}.parquet"
    invoke(name, store, "-f", "parquet", "--out", str(out))
    csv = invoke(name, store, "-f", "csv").stdout
    assert pl.read_parquet(out).columns == csv.splitlines()[0].split(",")  # the same table as csv


def test_parquet_goes_to_stdout_when_it_is_not_a_terminal(store):
    res = invoke("runs", store, "-f", "parquet")  # the runner's stdout is a pipe, not a terminal
    assert pl.read_parquet(io.BytesIO(res.stdout_bytes))["id"].to_list() == ["p0", "p1"]


def test_parquet_is_refused_on_a_terminal(monkeypatch):
    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", Terminal(io.BytesIO()))
    with pytest.raises(LsdbError, match="--out FILE"):
        emit(pl.DataFrame({"a": [1]}), Format.parquet)


# ----------------------------------------------------------------------------------- json
@pytest.mark.parametrize("name", sorted(offering("json")))
def test_json_is_one_document(store, name):
    doc = json.loads(invoke(name, store, "-f", "json").stdout)  # raises on two documents or none
    assert isinstance(doc, (list, dict))  # an array of rows, or {run, checkpoints} for show


def test_json_of_nothing_is_an_empty_list(empty):
    assert json.loads(invoke("runs", empty, "-f", "json").stdout) == []


def test_json_turns_nan_into_null(store):
    res = runner.invoke(app, ["sql", "SELECT 'nan'::DOUBLE AS x, 'inf'::DOUBLE AS y", "-s", str(store.root),
                              "-f", "json"])
    assert json.loads(res.stdout) == [{"x": None, "y": None}]
