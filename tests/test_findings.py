"""Findings F1–F14 against hand-built studies whose answers are known (see conftest_query.Study)."""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from lsdb.errors import QueryError
from lsdb.query import thresholds as T
from lsdb.query.findings import (FAILS, FINDINGS, HOLDS, NOT_MEASURED, Evidence, Stat, evaluate, findings,
                                 to_frame)
from lsdb.query.session import Session

from .conftest_query import Study, StoreBuilder, study_store

IDS = list(FINDINGS)


@pytest.fixture(scope="module")
def holding():
    return {f.id: f for f in evaluate(Study(holds=True).evidence())}


@pytest.fixture(scope="module")
def failing():
    return {f.id: f for f in evaluate(Study(holds=False).evidence())}


@pytest.mark.parametrize("fid", IDS)
def test_finding_holds_on_a_study_built_to_hold(holding, fid):
    f = holding[fid]
    assert f.verdict == HOLDS, (f.measured, f.detail)
    assert f.measured and f.expected and f.metric


@pytest.mark.parametrize("fid", IDS)
def test_finding_fails_on_a_study_built_to_fail(failing, fid):
    f = failing[fid]
    assert f.verdict == FAILS, (f.measured, f.detail)
    assert "fails on" in f.detail or "stable" in f.measured


def test_measured_numbers_are_seed_statistics(holding):
    f1 = holding["F1"]
    assert f1.numbers["spearman"] == {"mean": pytest.approx(-1.0), "std": pytest.approx(0.0), "n": 3}
    assert f1.numbers["onset_frac"]["mean"] == pytest.approx(4 / 40)  # first spawn below both thresholds
    assert holding["F4"].numbers["ratio"]["mean"] == pytest.approx((0.6 * (1 - 2.718281828**-4) + 0.008) /
                                                                  (0.6 * (1 - 2.718281828**-40) + 0.08))
    assert holding["F12"].numbers["ratio"]["mean"] == pytest.approx(1.5)
    assert str(Stat.of([1.0, 2.0, 3.0])) == "2 ± 1 (3 seeds)" and str(Stat.of([])) == "n/a"


def test_stable_at_initialisation_is_reported():
    f = evaluate(Study(stable=True).evidence(), ["F1"])[0]
    assert f.verdict == FAILS and f.measured.startswith("stable at initialisation")
    assert "harder setting" in f.detail


def test_parts_that_are_not_measured_are_named(holding):
    assert "width" in holding["F13"].detail  # the width sweep is absent from the study
    assert "weight matching" in holding["F14"].detail


def _without(evidence: Evidence, metrics=(), runs_where=None) -> Evidence:
    series = evidence.series.filter(~pl.col("metric").is_in(list(metrics)))
    runs = evidence.runs if runs_where is None else evidence.runs.filter(runs_where)
    return Evidence(runs, evidence.finals, series, evidence.dataset)


def test_missing_inputs_give_not_measured_with_advice():
    ev = Study().evidence()
    got = {f.id: f for f in evaluate(_without(ev, ["kernel_velocity", "error_barrier_test"]), ["F1", "F3"])}
    assert got["F1"].verdict == NOT_MEASURED and "[probes.barrier]" in got["F1"].detail
    assert "[spawn] times" in got["F1"].detail
    assert got["F3"].verdict == NOT_MEASURED and "[probes.ntk_distance]" in got["F3"].detail
    f11 = evaluate(_without(ev, runs_where=pl.col("adversarial") == "none"), ["F11"])[0]
    assert f11.verdict == NOT_MEASURED and "no adversarially trained runs" in f11.detail
    f12 = evaluate(_without(ev, runs_where=pl.col("batch_size") == 64), ["F12"])[0]
    assert f12.verdict == NOT_MEASURED and "batch_size" in f12.detail


def test_f2_with_some_measures_missing_uses_the_rest():
    ev = _without(Study().evidence(), ["sibling_kernel_distance"])
    f2 = evaluate(ev, ["F2"])[0]
    assert f2.verdict == HOLDS and "sibling_kernel_distance" in f2.detail
    too_few = _without(ev, ["child_disagreement", "relative_sibling_distance"])
    assert evaluate(too_few, ["F2"])[0].verdict == NOT_MEASURED


def test_thresholds_are_the_documented_ones():
    # PAPERS.md states these; changing one must be a deliberate edit of this test too
    assert (T.F1_SPEARMAN_MAX, T.F1_ERROR_BARRIER_MAX, T.F1_LOSS_BARRIER_MAX, T.F1_ONSET_FRAC_MAX) == (-0.6, 0.02, 0.05, 0.25)
    assert (T.F2_PAIR_SPEARMAN_MIN, T.F2_PAIR_FRACTION_MIN, T.F3_RATIO_MIN, T.F3_PLATEAU_MAXMIN) == (0.6, 0.8, 3.0, 3.0)
    assert (T.F4_RATIO_MIN, T.F5_RATIO_MIN, T.F6_FRAC_MAX, T.F7_FRAC_MAX, T.F8_RATIO_MAX) == (0.5, 1.5, 0.5, 0.25, 0.5)
    assert (T.F11_RATIO_MIN, T.F12_RATIO_MIN, T.F13_RATIO_MAX, T.F14_MATCHED_RATIO_MAX) == (0.9, 1.2, 0.7, 0.5)


def test_a_real_store_gives_the_same_verdicts_as_the_frames():
    got = findings(Session.open(study_store(True)))
    want = to_frame(evaluate(Study(True).evidence()))
    assert got.select("id", "verdict", "measured").equals(want.select("id", "verdict", "measured"))


def test_a_store_without_probe_results_is_all_not_measured(tmp_path):
    b = StoreBuilder(tmp_path)
    b.run("p0")
    for e in (0, 1, 2, 40):
        b.checkpoint("p0", e)
    got = findings(Session.open(b.flush()))
    assert got.height == 14 and set(got["verdict"]) == {NOT_MEASURED}
    assert all(got["detail"].str.len_chars() > 0)


def test_only_and_unknown_ids():
    ev = Study().evidence()
    assert [f.id for f in evaluate(ev, ["f3", "F1"])] == ["F3", "F1"]
    with pytest.raises(QueryError, match="unknown finding F99; valid: F1, F2"):
        evaluate(ev, ["F99"])


def test_cli_findings(tmp_path):
    from lsdb.cli import app

    store = study_store(True)
    res = CliRunner().invoke(app, ["findings", "--store", str(store.root), "--only", "F1,F8"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("F1   HOLDS") and "2 hold, 0 do not hold" in res.stdout
    res = CliRunner().invoke(app, ["findings", "--store", str(store.root), "--only", "F3", "-f", "json"])
    assert res.exit_code == 0 and '"verdict":"holds"' in res.stdout.replace(" ", "")
