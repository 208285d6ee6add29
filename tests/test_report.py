"""The HTML report: self-contained, every chart draws in headless Chromium, not blank, fills the
page's width and reads well (one title per axis, short legend labels)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lsdb.query.report import CHART_WIDTH, PAGE_WIDTH, SECTIONS, report
from lsdb.query.session import Session

from .chromium import (VEGA_TEXT_PROBE, external_requests, ink_fraction, png_pixels, render, require_chromium,
                       vega_text_problems)
from .conftest_query import StoreBuilder, study_store


# the report's charts this study has rows for (all but the Hessian spectrum and the slices); the soup,
# merge_width and task_arithmetic charts read the study's soup, merge and task_arithmetic rows
DRAWN = 10


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    report(Session.open(study_store(True)), out)
    return out


def test_report_is_self_contained(page):
    text = page.read_text()
    assert "<script src=" not in text and "<link " not in text and "@import" not in text
    assert text.count("class='chart'") == int(text.split('data-charts="')[1].split('"')[0]) == DRAWN
    assert "F14" in text and "holds" in text and "What this page is" in text
    assert "Not drawn (no data)" in text  # Hessian spectrum and slices have no rows in this store


def test_report_charts_are_page_wide(page):
    text = page.read_text()
    specs = json.loads(text.split('id="specs">')[1].split("</script>")[0])
    widths = [s.get("width") or s["vconcat"][0]["width"] for s in specs]
    assert widths.count(CHART_WIDTH) >= 5, widths  # the heatmap's width is its cells'
    assert CHART_WIDTH <= PAGE_WIDTH and f"max-width: {PAGE_WIDTH}px" in text


@pytest.mark.chromium
def test_report_renders_every_chart_in_chromium(page, tmp_path):
    binary = require_chromium()
    got = render(page, binary=binary, ready="document.body.dataset.rendered || document.body.dataset.failed",
                 probe=VEGA_TEXT_PROBE)
    assert got.value == str(DRAWN), got.value
    assert all(c["marks"] > 0 for c in got.probe), got.probe  # every chart has marks
    assert [vega_text_problems(c) for c in got.probe] == [[]] * DRAWN
    # each chart fills most of the text column and none runs past it
    assert all(0.75 * c["room"] <= c["width"] <= c["room"] for c in got.probe), got.probe
    assert got.errors == [] and external_requests(got) == []
    (tmp_path / "report.png").write_bytes(got.screenshot)
    w, h, _, _ = png_pixels(got.screenshot)
    assert (w, h) == (1200, 1600) and ink_fraction(got.screenshot) > 0.02


def test_report_of_an_empty_store_through_the_cli(tmp_path):
    from lsdb.cli import app

    b = StoreBuilder(tmp_path / "s")
    b.run("p0")
    b.checkpoint("p0", 0)
    store = b.flush()
    out = tmp_path / "r.html"
    res = CliRunner().invoke(app, ["findings", "--store", str(store.root), "--only", "F1,F2", "--report", str(out)])
    assert res.exit_code == 0, res.output
    assert f"report: {out}" in res.stderr and "0 hold, 0 do not hold, 2 not measured" in res.stdout
    text = out.read_text()
    assert "not measured" in text and 'data-charts="1"' in text  # only the training curves have data


def test_sections_name_real_charts():
    from lsdb.query.charts import CHARTS

    assert all(isinstance(w, list) or w in CHARTS for w, _, _ in SECTIONS)
