"""Charts: every named chart builds from a store (or says it has no data), exports in every
format, reads well (one title per axis, short legend labels, a time axis that ends at the data,
a heatmap that stays legible at 50 metrics), and draws in headless Chromium with no network."""

from __future__ import annotations

import json
import re
from datetime import datetime

import pytest
from typer.testing import CliRunner

from lsdb.errors import QueryError
from lsdb.query.charts import (CELL_MIN, CHARTS, LEGEND_FORMAT, TEXT_CELL, NoChartData, build, chart,
                               correlation_heatmap, vega_bundle)
from lsdb.query.session import Session
from lsdb.query.thresholds import LOG_TIME_OFFSET

from .chromium import (VEGA_TEXT_PROBE, external_requests, ink_fraction, render, repeated_titles, require_chromium,
                       vega_text_problems)
from .conftest_query import StoreBuilder, has_metric, metric_table, study_store

NEEDS_ROWS_OF_THEIR_OWN = {"hessian_spectrum", "slice_1d", "slice_2d", "slice_2d_variants"}  # tables beyond metric_series
SPECTRUM_EPOCHS = (0.1 + 0.2, 40.0)  # 0.30000000000000004: the legend must still say 0.3


@pytest.fixture(scope="module")
def session():
    return Session.open(study_store(True))


@pytest.fixture(scope="module")
def geometry(tmp_path_factory):
    """A store with Hessian eigenvalues and 1D/2D loss slices (the charts with tables of their own)."""
    if metric_table("hessian_top_eigenvalue")[0] is None:
        pytest.skip("geometry tables not defined")
    b = StoreBuilder(tmp_path_factory.mktemp("geometry"))
    b.run("p0")
    job = dict(version=1, params_hash="h", params_json="{}", role="self", other_checkpoint_id=None,
               inputs_json="{}", state="done", attempts=1, error=None, worker="t", device="cpu",
               started_at=datetime(2024, 1, 1), seconds=0.0)
    for e in SPECTRUM_EPOCHS:
        c = b.checkpoint("p0", e)
        b.add("probe_job", id=f"jh{e}", probe="hessian", checkpoint_id=c, anchor_checkpoint_id=c, **job)
        for k in range(5):
            b.add("hessian_eigenvalue", job_id=f"jh{e}", idx=k, checkpoint_id=c, other_checkpoint_id=None,
                  anchor_checkpoint_id=c, rank=k + 1, value=10.0 / (k + 1), residual=1e-6)
    b.add("probe_job", id="js", probe="slice", checkpoint_id=c, anchor_checkpoint_id=c, **job)
    i = 0
    for a in (-1, 0, 1):
        b.add("slice", job_id="js", idx=i, checkpoint_id=c, other_checkpoint_id=None, anchor_checkpoint_id=c,
              dims=1, a=float(a), b=None, split="test", loss=1 + a * a, error=0.1)
        i += 1
        for bb in (-1, 0, 1):
            b.add("slice", job_id="js", idx=i, checkpoint_id=c, other_checkpoint_id=None, anchor_checkpoint_id=c,
                  dims=2, a=float(a), b=float(bb), split="test", loss=1 + a * a + bb * bb, error=0.1)
            i += 1
    # an adversarially trained variant, flatter, for the side-by-side surfaces (slice_2d_variants)
    b.run("a0", variant="adversarial", adversarial="fgsm")
    ca = b.checkpoint("a0", 40.0)
    b.add("probe_job", id="ja", probe="slice", checkpoint_id=ca, anchor_checkpoint_id=ca, **job)
    for i, (a, bb) in enumerate((a, bb) for a in (-1, 0, 1) for bb in (-1, 0, 1)):
        b.add("slice", job_id="ja", idx=i, checkpoint_id=ca, other_checkpoint_id=None, anchor_checkpoint_id=ca,
              dims=2, a=float(a), b=float(bb), split="test", loss=1 + 0.5 * (a * a + bb * bb), error=0.1)
    return Session.open(b.flush())


def _named(session, geometry, name):
    return build(geometry if name in NEEDS_ROWS_OF_THEIR_OWN else session, name)


def _data(spec) -> list[dict]:
    return next(iter(spec["datasets"].values()))


def _layers(spec) -> list[dict]:
    return [spec] if "layer" not in spec else spec["layer"]


@pytest.mark.parametrize("name", sorted(set(CHARTS) - NEEDS_ROWS_OF_THEIR_OWN))
def test_named_chart_builds(session, name):
    spec = build(session, name).to_dict()
    assert spec["$schema"].startswith("https://vega.github.io/schema/vega-lite")
    assert json.dumps(spec).count('"values"') or spec.get("datasets")  # data is inlined


@pytest.mark.parametrize("name", sorted(NEEDS_ROWS_OF_THEIR_OWN))
def test_chart_without_data_says_what_to_add(session, name):
    with pytest.raises(NoChartData, match=r"add \[probes\.\w+\]"):
        build(session, name)


def test_spectrum_and_slices_from_their_tables(geometry):
    spectrum = build(geometry, "hessian_spectrum").to_dict()
    assert [v["rank"] for v in _data(spectrum)] == [1, 2, 3, 4, 5] * 2
    assert len(_data(build(geometry, "slice_2d").to_dict())) == 9
    assert len(_data(build(geometry, "slice_1d").to_dict())) == 3


def test_spectrum_legend_prints_epochs_short(geometry):
    spec = build(geometry, "hessian_spectrum").to_dict()
    assert spec["encoding"]["color"]["legend"]["format"] == LEGEND_FORMAT
    legend = _vega(spec)["legends"][0]
    assert legend["format"] == LEGEND_FORMAT  # Vega applies it to the ordinal epoch labels


# ------------------------------------------------------------------ axes read once
def _vega(spec) -> dict:
    import vl_convert as vlc

    return vlc.vegalite_to_vega(spec)


def _axis_titles(vega: dict, path: str = "root", out: dict | None = None) -> dict[str, list[str]]:
    """Axis titles per view (Vega group) of a compiled spec."""
    out = {} if out is None else out
    for axis in vega.get("axes", []):
        title = axis.get("title")
        if title:
            out.setdefault(path, []).extend(title if isinstance(title, list) else [title])
    for k, mark in enumerate(vega.get("marks", [])):
        if mark.get("type") == "group":
            _axis_titles(mark, f"{path}/{mark.get('name', k)}", out)
    return out


@pytest.mark.parametrize("name", sorted(CHARTS))
def test_each_axis_title_appears_once_per_view(session, geometry, name):
    titles = _axis_titles(_vega(_named(session, geometry, name).to_dict()))
    assert titles or name == "correlation"  # the heatmap's axes are the metric names
    for view, ts in titles.items():
        assert repeated_titles(ts) == [], (view, ts)


def test_time_axis_title_is_plain_words(session):
    titles = _axis_titles(_vega(build(session, "kernel_velocity").to_dict()))["root"]
    assert f"epoch (log scale; epoch 0 drawn at {LOG_TIME_OFFSET:g})" in titles
    assert not any("+0.01" in t for t in titles)


def test_velocity_time_axis_ends_at_the_last_epoch(tmp_path):
    if not has_metric("kernel_velocity"):
        pytest.skip("kernel_velocity not declared")
    b = StoreBuilder(tmp_path)
    b.run("p20", epochs=20.0)
    for e in (0, 0.5, 1, 2, 5, 10, 20):
        c = b.checkpoint("p20", e, epochs=20.0)
        b.metric("kernel_velocity", c, 1 / (1 + e))
    spec = build(Session.open(b.flush()), "kernel_velocity").to_dict()
    for layer in _layers(spec):
        scale = layer["encoding"]["x"]["scale"]
        assert scale["type"] == "log" and scale["nice"] is False
        assert scale["domain"] == [LOG_TIME_OFFSET, 20 + LOG_TIME_OFFSET]
    x = next(s for s in _vega(spec)["scales"] if s["name"] == "x")
    assert x["domain"][1] <= 20 + LOG_TIME_OFFSET and x.get("nice") is False  # not rounded up to 100


# ------------------------------------------------------------------ heatmap
def _two_blocks(n: int):
    """Pairs of n metrics in two interleaved groups: r = 0.9 within a group, 0.1 across."""
    import polars as pl

    names = [f"m{i:02d}" for i in range(n)]
    rows = [(a, b, 0.9 if i % 2 == j % 2 else 0.1, 10)
            for i, a in enumerate(names) for j, b in enumerate(names) if i < j]
    return pl.DataFrame(rows, schema=["metric_a", "metric_b", "r", "n"], orient="row")


def test_heatmap_at_50_metrics_clusters_and_drops_the_numbers():
    spec = correlation_heatmap(_two_blocks(50), width=800).to_dict()
    assert len(spec["layer"]) == 1  # no text layer: the r values live in the tooltip
    assert spec["width"] == spec["height"] >= 50 * CELL_MIN
    order = spec["layer"][0]["encoding"]["x"]["sort"]
    groups = [int(m[1:]) % 2 for m in order]
    assert groups == sorted(groups) or groups == sorted(groups, reverse=True)  # each group one block
    assert "clustered" in spec["title"]


def test_heatmap_of_few_metrics_prints_r_in_readable_cells():
    spec = correlation_heatmap(_two_blocks(6), width=420).to_dict()
    text = spec["layer"][1]
    assert text["mark"]["type"] == "text" and text["mark"]["fontSize"] >= 9
    assert spec["width"] / 6 >= TEXT_CELL


# ------------------------------------------------------------------ one metric against another
def test_metric_against_metric(session):
    spec = chart(session, ["test_error"], x="kernel_velocity").to_dict()
    enc = spec["layer"][0]["encoding"]
    assert (enc["x"]["field"], enc["x"]["title"]) == ("x", "kernel_velocity")
    assert (enc["y"]["field"], enc["y"]["title"]) == ("value", "test_error")
    assert enc["color"]["field"] == "variant" and enc["detail"]["field"] == "run_id"
    assert enc["order"]["field"] == "epoch"  # the line of a run follows time
    assert {layer["mark"]["type"] for layer in spec["layer"]} == {"line", "point"}
    rows = _data(spec)
    assert len(rows) == 3 * 16  # 3 parents x 16 checkpoints with a velocity (none at the last one)
    assert all(r["x"] is not None and r["value"] is not None for r in rows)


def test_metric_against_a_missing_metric_points_at_lsdb_metrics(session):
    with pytest.raises(QueryError) as e:
        chart(session, ["test_error"], x="kernel_velocty")
    msg = str(e.value)
    assert "kernel_velocty" in msg and "lsdb metrics" in msg and "\n" not in msg


def test_cli_metric_against_metric(session, tmp_path):
    from lsdb.cli import app

    out, store = tmp_path / "xy.json", ["--store", str(session.store.root)]
    res = CliRunner().invoke(app, ["chart", "test_error", "--x", "kernel_velocity", "--out", str(out), *store])
    assert res.exit_code == 0, res.output
    assert json.loads(out.read_text())["layer"][0]["encoding"]["x"]["title"] == "kernel_velocity"
    res = CliRunner().invoke(app, ["chart", "--name", "barrier", "--x", "test_error", "--out", str(out), *store])
    assert res.exit_code != 0 and "--x" in str(res.exception)


# ------------------------------------------------------------------ files
def test_exports_every_format(session, tmp_path):
    for suffix in (".json", ".svg", ".png", ".pdf", ".html"):  # .html draws in Chromium below
        out = tmp_path / f"c{suffix}"
        chart(session, ["test_error"], out=out)
        assert out.stat().st_size > 500
    assert json.loads((tmp_path / "c.json").read_text())["layer"]
    assert "<svg" in (tmp_path / "c.svg").read_text()
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"
    page = (tmp_path / "c.html").read_text()
    assert "<script src=" not in page and "cdn.jsdelivr" not in page  # Vega is inlined
    with pytest.raises(QueryError, match="use one of .html, .svg, .png, .pdf, .json"):
        chart(session, ["test_error"], out=tmp_path / "c.gif")


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
    res = CliRunner().invoke(app, ["chart", "test_error", "--out", str(tmp_path / "t.pdf"),
                                   "--store", str(session.store.root)])
    assert res.exit_code == 0 and (tmp_path / "t.pdf").read_bytes()[:4] == b"%PDF"


# ------------------------------------------------------------------ drawn in Chromium
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


def _gallery(specs: dict[str, dict], path):
    """One offline page drawing several specs as SVG, like the report (one browser for all)."""
    divs = "".join(f"<div class='chart' id='c{i}' data-name='{n}'></div>" for i, n in enumerate(specs))
    data = json.dumps(list(specs.values())).replace("</", "<\\/")
    path.write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'></head><body>{divs}"
        f"<script type='application/json' id='specs'>{data}</script><script type='module'>{vega_bundle()}</script>"
        "<script type='module'>const specs = JSON.parse(document.getElementById('specs').textContent);"
        "Promise.all(specs.map((s, i) => vegaEmbed('#c' + i, s, {renderer: 'svg', actions: false})))"
        ".then(r => { document.body.dataset.rendered = String(r.length); })"
        ".catch(e => { document.body.dataset.failed = String(e); });</script></body></html>", encoding="utf-8")
    return path


@pytest.mark.chromium
def test_every_named_chart_draws_with_readable_text(session, geometry, tmp_path):
    binary = require_chromium()
    specs = {n: _named(session, geometry, n).to_dict() for n in sorted(CHARTS)}
    specs["test_error vs kernel_velocity"] = chart(session, ["test_error"], x="kernel_velocity").to_dict()
    page = render(_gallery(specs, tmp_path / "all.html"), binary=binary, probe=VEGA_TEXT_PROBE, height=4000,
                  ready="document.body.dataset.rendered || document.body.dataset.failed")
    assert page.value == str(len(specs)), page.value
    assert page.errors == [] and external_requests(page) == []
    drawn = dict(zip(specs, page.probe))
    for name, got in drawn.items():
        assert got["marks"] > 0, name
        assert vega_text_problems(got) == [], name
    assert "0.3" in drawn["hessian_spectrum"]["legend"]  # the 0.30000000000000004 epoch
    assert any(re.fullmatch(r"epoch \(log scale; epoch 0 drawn at 0\.01\)", t)
               for view in drawn["kernel_velocity"]["views"] for t in view)
