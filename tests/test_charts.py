"""Charts: every named chart builds from a store (or says it has no data), exports in every
format, and an exported HTML chart draws in headless Chromium with no network access."""

from __future__ import annotations

import json
from datetime import datetime

import pytest
from typer.testing import CliRunner

from lsdb.errors import QueryError
from lsdb.query.charts import CHARTS, NoChartData, build, chart
from lsdb.query.session import Session

from .chromium import external_requests, ink_fraction, render, require_chromium
from .conftest_query import StoreBuilder, study_store, metric_table

NEEDS_ROWS_OF_THEIR_OWN = {"hessian_spectrum", "slice_1d", "slice_2d"}  # tables beyond metric_series


@pytest.fixture(scope="module")
def session():
    return Session.open(study_store(True))


@pytest.mark.parametrize("name", sorted(set(CHARTS) - NEEDS_ROWS_OF_THEIR_OWN))
def test_named_chart_builds(session, name):
    spec = build(session, name).to_dict()
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite")
    assert json.dumps(spec).count('"values"') or spec.get("datasets")  # data is inlined


@pytest.mark.parametrize("name", sorted(NEEDS_ROWS_OF_THEIR_OWN))
def test_chart_without_data_says_what_to_add(session, name):
    with pytest.raises(NoChartData, match=r"add \[probes\.\w+\]"):
        build(session, name)


def test_spectrum_and_slices_from_their_tables(tmp_path):
    if metric_table("hessian_top_eigenvalue")[0] is None:
        pytest.skip("geometry tables not defined")
    b = StoreBuilder(tmp_path)
    b.run("p0")
    c = b.checkpoint("p0", 40)
    b.add("probe_job", id="jh", probe="hessian", version=1, params_hash="h", params_json="{}", role="self",
          checkpoint_id=c, other_checkpoint_id=None, anchor_checkpoint_id=c, inputs_json="{}", state="done",
          attempts=1, error=None, worker="t", device="cpu", started_at=datetime(2024, 1, 1), seconds=0.0)
    b.add("probe_job", **{**b.rows["probe_job"][-1], "id": "js", "probe": "slice"})
    for k in range(5):
        b.add("hessian_eigenvalue", job_id="jh", idx=k, checkpoint_id=c, other_checkpoint_id=None,
              anchor_checkpoint_id=c, rank=k + 1, value=10.0 / (k + 1), residual=1e-6)
    i = 0
    for a in (-1, 0, 1):
        b.add("slice", job_id="js", idx=i, checkpoint_id=c, other_checkpoint_id=None, anchor_checkpoint_id=c,
              dims=1, a=float(a), b=None, split="test", loss=1 + a * a, error=0.1)
        i += 1
        for bb in (-1, 0, 1):
            b.add("slice", job_id="js", idx=i, checkpoint_id=c, other_checkpoint_id=None, anchor_checkpoint_id=c,
                  dims=2, a=float(a), b=float(bb), split="test", loss=1 + a * a + bb * bb, error=0.1)
            i += 1
    s = Session.open(b.flush())
    spectrum = build(s, "hessian_spectrum").to_dict()
    values = next(iter(spectrum["datasets"].values()))
    assert [v["rank"] for v in values] == [1, 2, 3, 4, 5]
    assert len(next(iter(build(s, "slice_2d").to_dict()["datasets"].values()))) == 9
    assert len(next(iter(build(s, "slice_1d").to_dict()["datasets"].values()))) == 3


def test_exports_every_format(session, tmp_path):
    for suffix in (".json", ".svg", ".png", ".html"):  # .html draws in Chromium below
        out = tmp_path / f"c{suffix}"
        chart(session, ["test_error"], out=out)
        assert out.stat().st_size > 500
    assert json.loads((tmp_path / "c.json").read_text())["layer"]
    assert "<svg" in (tmp_path / "c.svg").read_text()
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "c.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # Vega is inlined
    with pytest.raises(QueryError, match="use one of .html, .svg, .png, .json"):
        chart(session, ["test_error"], out=tmp_path / "c.pdf")


def test_unknown_metric_names_the_valid_ones(session):
    with pytest.raises(QueryError, match="unknown metric 'test_eror'.*did you mean 'test_error'"):
        build(session, ["test_eror"])


def test_cli_chart(session, tmp_path):
    from lsdb.cli import app

    out = tmp_path / "b.json"
    res = CliRunner().invoke(app, ["chart", "--name", "barrier", "--out", str(out), "--store", str(session.store.root)])
    assert res.exit_code == 0, res.output
    assert "error_barrier_test" in out.read_text()
    res = CliRunner().invoke(app, ["chart", "--name", "nope", "--out", str(out), "--store", str(session.store.root)])
    assert res.exit_code != 0 and "valid: barrier" in str(res.exception)


@pytest.mark.chromium
def test_exported_html_draws_offline_in_chromium(session, tmp_path):
    binary = require_chromium()
    out = chart(session, "kernel_accuracy", out=tmp_path / "k.html") and tmp_path / "k.html"
    page = render(out, binary=binary, ready="document.body.dataset.rendered || document.body.dataset.failed",
                  probe="document.querySelectorAll('svg path, svg .mark-symbol path').length")
    assert page.value == "1", page.value
    assert page.probe > 5
    assert page.errors == [] and external_requests(page) == []
    assert ink_fraction(page.screenshot) > 0.01
