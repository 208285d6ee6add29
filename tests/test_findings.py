"""Findings F1–F14 against hand-built studies whose answers are known (see conftest_query.Study).

Every rule has a study where it holds and one where it does not; the rules changed for uncertainty,
preconditions and grids also get studies where they are inconclusive or not measured.
"""

from __future__ import annotations

import polars as pl
import pytest
from typer.testing import CliRunner

from lsdb.errors import QueryError
from lsdb.query import thresholds as T
from lsdb.query.findings import (FAILS, FINDINGS, HOLDS, INCONCLUSIVE, NOT_MEASURED, Evidence, Stat, as_text,
                                 bootstrap_interval, check, evaluate, findings, to_frame)
from lsdb.query.session import Session

from .conftest_query import Frames, Study, StoreBuilder, study_store

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
    gone = ["kernel_velocity", "kernel_angular_velocity", "error_barrier_test"]
    got = {f.id: f for f in evaluate(_without(ev, gone), ["F1", "F3"])}
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
    # docs/findings.md states these; changing one must be a deliberate edit of this test too
    assert (T.F1_SPEARMAN_MAX, T.F1_ERROR_BARRIER_MAX, T.F1_LOSS_BARRIER_MAX, T.F1_ONSET_FRAC_MAX) == (-0.6, 0.02, 0.05, 0.25)
    assert (T.F2_PAIR_SPEARMAN_MIN, T.F2_PAIR_FRACTION_MIN, T.F3_RATIO_MIN, T.F3_PLATEAU_MAXMIN) == (0.6, 0.8, 3.0, 3.0)
    assert (T.F4_RATIO_MIN, T.F5_RATIO_MIN, T.F6_FRAC_MAX, T.F7_FRAC_MAX, T.F8_RATIO_MAX) == (0.5, 1.5, 0.5, 0.25, 0.5)
    assert (T.F11_RATIO_MIN, T.F12_RATIO_MIN, T.F13_RATIO_MAX, T.F14_MATCHED_RATIO_MAX) == (0.9, 1.2, 0.7, 0.5)
    assert (T.F3_FROZEN_FRAC, T.F5_DEFAULT_FRAC, T.PATH_POINTS_MIN, T.F11_MATCH_ERROR) == (0.01, 0.1, 21, 0.05)
    assert (T.F3_DECIDING_METRIC, T.F12_DECIDING_METRIC) == ("kernel_angular_velocity", "adversarial_sharpness")


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
    assert got.height == len(IDS) and set(got["verdict"]) == {NOT_MEASURED}
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
    assert res.stdout.splitlines()[0].startswith("F1   HOLDS")
    assert "2 hold, 0 do not hold, 0 not measured, 0 inconclusive" in res.stdout
    res = CliRunner().invoke(app, ["findings", "--store", str(store.root), "--only", "F3", "-f", "json"])
    assert res.exit_code == 0 and '"verdict":"holds"' in res.stdout.replace(" ", "")


# ---------------------------------------------------------------------------- editing a study's frames
BASE = ("base-s0", "base-s1", "base-s2")


def _evidence(ev: Evidence, series=None, finals=None, points=None) -> Evidence:
    return Evidence(ev.runs, ev.finals if finals is None else finals, ev.series if series is None else series,
                    ev.dataset, ev.path_points if points is None else points)


def _edit(ev: Evidence, metric: str, fn) -> Evidence:
    """``fn(run_id, epoch, value)`` → the new value of each ``metric`` row (None drops the row)."""
    rows = []
    for r in ev.series.iter_rows(named=True):
        if r["metric"] == metric:
            v = fn(r["run_id"], r["epoch"], r["value"])
            if v is None:
                continue
            r = {**r, "value": float(v)}
        rows.append(r)
    return _evidence(ev, series=pl.DataFrame(rows, schema=ev.series.schema))


def _add(ev: Evidence, metric: str, values: dict[str, float]) -> Evidence:
    """``metric`` at existing checkpoints (checkpoint id → value)."""
    at = {r["checkpoint_id"]: r for r in ev.series.filter(pl.col("metric") == "lr").iter_rows(named=True)}
    rows = pl.DataFrame([{**at[c], "metric": metric, "value": float(v)} for c, v in values.items()],
                        schema=ev.series.schema)
    return _evidence(ev, series=pl.concat([ev.series, rows]))


def _one(ev: Evidence, fid: str):
    return evaluate(ev, [fid])[0]


# ---------------------------------------------------------------------------- uncertainty
def test_check_settles_a_threshold_or_says_why_not():
    assert check([1.0, 1.1, 0.9], 0.5, ">=") == check([1.0, 1.1, 0.9], 0.5, ">=")
    assert check([1.0, 1.1, 0.9], 0.5, ">=").ok is True and check([1.0, 1.1, 0.9], 0.5, ">=").why == ""
    spread = check([0.4, 3.0, 6.0], 3.0, ">=")
    assert spread.ok is True and "spread" in spread.why and "straddles 3" in spread.why
    assert check([2.0], 1.5, ">=").why == "only 1 seed measured (minimum 2)"
    assert check([0.1, float("inf"), 0.2], 0.25, "<=") == check([0.2, 0.1, float("inf")], 0.25, "<=")
    mixed = check([0.1, float("inf"), 0.2], 0.25, "<=")
    assert mixed.ok is False and mixed.why == "2 of 3 seeds pass"
    assert check([float("inf")] * 2, 0.25, "<=").ok is False and check([float("inf")] * 2, 0.25, "<=").why == ""
    assert check([], 1.0, "<=").ok is None and check([None, float("nan")], 1.0, "<=").ok is None
    # skewed seeds: mean ± std = [-2.4, 9.1] clears 9.5, the bootstrap interval [0, 10] does not
    boot = check([0.0, 0.0, 10.0], 9.5, "<=")
    assert boot.ok is True and "bootstrap interval [0, 10]" in boot.why
    assert bootstrap_interval([1.0, 2.0, 3.0]) == bootstrap_interval([1.0, 2.0, 3.0])  # seeded: same every run
    with pytest.raises(ValueError):
        check([1.0], 1.0, "<")


def test_fewer_seeds_than_the_minimum_are_inconclusive():
    got = {f.id: f for f in evaluate(Study(seeds=(0,)).evidence())}
    for fid in ("F1", "F3", "F4", "F5", "F6", "F8", "F10", "F12"):
        assert got[fid].verdict == INCONCLUSIVE, (fid, got[fid].detail)
        assert f"only 1 seed measured (minimum {T.MIN_SEEDS})" in got[fid].detail
    assert "inconclusive" in as_text(list(got.values())).splitlines()[-1]


def test_seeds_on_both_sides_of_the_onset_threshold_are_inconclusive():
    ev = Study().evidence()
    never = {"base-s2"}  # this seed's barrier never falls below threshold
    ev = _edit(ev, "error_barrier_test", lambda r, e, v: 0.3 if r in never else v)
    f1 = _one(_edit(ev, "loss_barrier_test", lambda r, e, v: 2.0 if r in never else v), "F1")
    assert f1.verdict == INCONCLUSIVE and "onset would fail but 2 of 3 seeds pass" in f1.detail


def test_a_holding_finding_with_unmeasured_parts_reads_partly_measured(holding):
    f13 = holding["F13"]
    assert f13.verdict == HOLDS and f13.label == "holds (partly measured: classical parameters per patch missing)"
    assert to_frame([f13])["verdict"][0] == f13.label
    assert as_text([f13]).splitlines()[0].startswith("F13  HOLDS (partly measured: classical parameters per patch missing)")
    assert holding["F1"].label == HOLDS


# ---------------------------------------------------------------------------- F3
def _kernel_study(early: list[float], late: float = 1.0, s_over_delta: list[float] | None = None,
                  angular: bool = True) -> Evidence:
    """Base parents whose velocity is ``early[seed]`` up to 2 epochs (5% of 40) and ``late`` after; with
    ``s_over_delta`` the S/Δ velocity is that early (late 1) next to the angular one."""
    fr = Frames()
    epochs = (0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40)
    for seed, a in enumerate(early):
        pid = fr.run(f"base-s{seed}", seed)
        for e in epochs:
            c = fr.ckpt(pid, e, train_loss=0.01, test_error=0.1)
            if e == 40:
                continue
            if angular:
                fr.metric("kernel_angular_velocity", c, a if e <= 2 else late)
            if s_over_delta is not None or not angular:
                fr.metric("kernel_velocity", c, (s_over_delta[seed] if s_over_delta else a) if e <= 2 else
                          (1.0 if s_over_delta else late))
    return fr.evidence()


def test_f3_holds_fails_and_is_inconclusive_on_the_angular_velocity():
    assert _one(_kernel_study([5.0, 5.0, 5.0]), "F3").verdict == HOLDS
    assert _one(_kernel_study([1.5, 1.5, 1.5]), "F3").verdict == FAILS
    # the quick study's 3.29 ± 3.04 over 2 seeds: no verdict either way
    f3 = _one(_kernel_study([3.29 - 3.04 / 2 ** 0.5, 3.29 + 3.04 / 2 ** 0.5]), "F3")
    assert f3.verdict == INCONCLUSIVE and "3.29 ± 3.04 (2 seeds) straddles 3" in f3.detail


def test_f3_a_frozen_kernel_is_its_own_outcome_not_holds():
    f3 = _one(_kernel_study([5.0, 5.0, 5.0], late=0.001), "F3")  # early/late = 5000, "fast early" passes
    assert f3.verdict == FAILS and f3.measured.startswith("frozen kernel in 3/3 seeds: late/early 0.0002")
    assert "different outcome" in f3.detail and f3.numbers["frozen_seeds"] == 3
    one = _one(_kernel_study([5.0, 5.0, 5.0]), "F3")
    assert one.numbers["frozen_seeds"] == 0


def test_f3_the_angular_velocity_decides_and_s_over_delta_is_reported():
    ev = _kernel_study([3.56] * 3, s_over_delta=[1.81] * 3)
    f3 = _one(ev, "F3")
    assert f3.verdict == HOLDS and f3.numbers["deciding_metric"] == "kernel_angular_velocity"
    assert "angular velocity θ/Δ (decides): early/late 3.56" in f3.measured and "S/Δ early/late 1.81" in f3.measured
    only_s = _one(_without(ev, ["kernel_angular_velocity"]), "F3")
    assert only_s.verdict == FAILS and "no angular velocity stored: S/Δ decides" in only_s.detail


# ---------------------------------------------------------------------------- F5
def test_f5_falls_back_to_ten_percent_when_the_onset_is_at_zero():
    f5 = _one(Study(stable=True).evidence(), "F5")  # barrier below threshold at spawn 0: onset t* = 0
    assert f5.verdict == HOLDS, (f5.measured, f5.detail)
    assert f5.numbers["ratio"]["n"] == 3 and f5.numbers["compared_at_default"] == 3  # no seed dropped
    assert f5.numbers["compared_at_frac"]["mean"] == pytest.approx(T.F5_DEFAULT_FRAC)
    assert "compared at 10% of training for 3 seed(s)" in f5.measured


def test_f5_inconclusive_when_the_seeds_straddle_the_ratio():
    at_onset = {"base-s0": 0.7 / 1.2, "base-s1": 0.7 / 1.6, "base-s2": 0.7 / 3.0}  # err(0) = 0.7
    ev = _edit(Study().evidence(), "linearised_test_error", lambda r, e, v: at_onset[r] if e == 4 else v)
    f5 = _one(ev, "F5")
    assert f5.verdict == INCONCLUSIVE and "ratio would hold but seeds' spread" in f5.detail
    single = _edit(Study().evidence(), "linearised_test_error", lambda r, e, v: v if e in (0, 40) else None)
    assert _one(single, "F5").verdict == NOT_MEASURED  # only t = 0 before the end


# ---------------------------------------------------------------------------- F6
def test_f6_leaves_out_the_trivial_endpoint_and_reports_an_unplaceable_catch_up():
    assert _one(Study().evidence(), "F6").numbers["catch_up_frac"]["mean"] == pytest.approx(0.1)
    failing = _one(Study(False).evidence(), "F6")
    assert failing.verdict == FAILS and "do not catch up before the end (grid to t/T 0.8)" in failing.measured
    # expansions only up to 8 epochs (20%) and at the end: the endpoint "catches up" trivially
    early_only = _edit(Study(False).evidence(), "linearised_test_error", lambda r, e, v: None if 8 < e < 40 else v)
    f6 = _one(early_only, "F6")
    assert f6.verdict == NOT_MEASURED and "cannot place the catch-up for 3 seed(s)" in f6.detail
    assert "(0.2, 1] (3 seeds)" in f6.detail and "add spawn times" in f6.detail
    # catch-up first seen at 32 epochs after 8: somewhere in (0.2, 0.8], either side of 50%
    gap = _edit(Study(False).evidence(), "linearised_test_error",
                lambda r, e, v: None if 8 < e < 32 else (0.1 if e >= 32 else v))
    f6 = _one(gap, "F6")
    assert f6.verdict == NOT_MEASURED and "(0.2, 0.8]" in f6.detail


def test_f6_inconclusive_when_the_seeds_straddle_half_of_training():
    late = _edit(Study().evidence(), "linearised_test_error",
                 lambda r, e, v: (0.3 if e < 24 else 0.1) if r == "base-s2" else v)  # seed 2 catches up at 60%
    f6 = _one(late, "F6")
    assert f6.verdict == INCONCLUSIVE and f6.numbers["catch_up_frac"]["mean"] == pytest.approx((0.1 + 0.1 + 0.6) / 3)
    assert "catch-up time would hold but seeds' spread" in f6.detail


# ---------------------------------------------------------------------------- F11
def test_f11_is_inconclusive_without_matched_clean_accuracy():
    ev = Study().evidence()
    finals = ev.finals.with_columns(pl.when(pl.col("run_id").str.starts_with("adversarial"))
                                    .then(0.3).otherwise(pl.col("test_error")).alias("test_error"))
    f11 = _one(_evidence(ev, finals=finals), "F11")
    assert f11.verdict == INCONCLUSIVE and "not at matched accuracy" in f11.detail and "gap 0.2" in f11.measured
    failing = Study(False).evidence()
    finals = failing.finals.with_columns(pl.when(pl.col("run_id").str.starts_with("adversarial"))
                                         .then(0.3).otherwise(pl.col("test_error")).alias("test_error"))
    assert _one(_evidence(failing, finals=finals), "F11").verdict == INCONCLUSIVE  # not "does not hold" either


# ---------------------------------------------------------------------------- F12
def _large_batch_not_converged(holds: bool = True) -> Evidence:
    """The large-batch runs end at train loss 0.2, where the small-batch runs were at ~8 epochs."""
    return _edit(Study(holds).evidence(), "train_loss",
                 lambda r, e, v: 0.2 if r.startswith("large_batch") and e == 40 else v)


def test_f12_is_inconclusive_when_train_losses_do_not_match():
    f12 = _one(_large_batch_not_converged(), "F12")
    assert f12.verdict == INCONCLUSIVE and "not at matched train loss" in f12.detail
    assert "train loss large 0.2" in f12.measured and "at unmatched loss" in f12.measured


def test_f12_compares_at_matched_train_loss_and_reports_every_measure():
    j = {f"base-s{s}": 1 + 0.05 * s for s in range(3)}  # the study's seed factor
    ev = _large_batch_not_converged()
    at8 = {f"{r}@800": j[r] for r in BASE}  # train loss 0.206 at 8 epochs
    ev = _add(ev, "adversarial_sharpness", {c: 0.5 * v for c, v in at8.items()})  # large 1.5 j: 3× sharper
    ev = _add(ev, "sharpness_1d", {c: 5.0 * v for c, v in at8.items()})  # σ_1D says flatter (0.3×)
    ev = _add(ev, "hessian_top_eigenvalue", {f"large_batch-s{s}@4000": 2.25 * 26.6524 * (1 + 0.05 * s)
                                             for s in range(3)})
    f12 = _one(ev, "F12")
    assert f12.verdict == HOLDS, (f12.measured, f12.detail)
    assert f12.numbers["ratio"]["mean"] == pytest.approx(3.0) and f12.numbers["matched_seeds"] == 3
    assert "worst-case sharpness (decides) 3 ± 0 (3 seeds) at matched loss" in f12.measured
    assert "σ_1D 0.3 ± 0 (3 seeds) at matched loss" in f12.measured
    assert "Hessian λ₁ 2.25 ± 0 (3 seeds) at matched loss" in f12.measured
    flatter = _add(_large_batch_not_converged(), "adversarial_sharpness", {c: 1.4 * v for c, v in at8.items()})
    assert _one(flatter, "F12").verdict == FAILS  # 1.5 / 1.4 < 1.2 at matched loss


def test_f12_needs_the_deciding_measure():
    f12 = _one(_without(Study().evidence(), ["adversarial_sharpness"]), "F12")
    assert f12.verdict == NOT_MEASURED and "[probes.flatness]" in f12.detail


# ---------------------------------------------------------------------------- F13
def test_f13_is_inconclusive_when_the_patch_networks_are_not_at_a_minimum():
    still = _edit(Study().evidence(), "train_loss",
                  lambda r, e, v: 0.2 if r.startswith("patch") and e == 36 else v)
    f13 = _one(still, "F13")
    assert f13.verdict == INCONCLUSIVE and "not at a minimum" in f13.detail
    assert "patch1 (3 runs): −75% from t/T 0.9, final train loss 0.05" in f13.detail
    sparse = _edit(Study(False).evidence(), "train_loss",
                   lambda r, e, v: None if r.startswith("patch") and e == 36 else v)  # checkpoints 0 and 40 only
    assert _one(sparse, "F13").verdict == INCONCLUSIVE  # 98% drop since t = 0: not shown to be at a minimum
    only_final = _edit(Study().evidence(), "train_loss",
                       lambda r, e, v: None if r.startswith("patch") and e < 40 else v)
    assert "cannot tell whether 6 run(s) are at a minimum" in _one(only_final, "F13").detail


# ---------------------------------------------------------------------------- F14
def _merged(naive: float, matched: float, points: int = 21) -> Study:
    st = Study()
    for anchor in ("base-s0@4000", "base-s0@4000", "base-s1@4000"):  # pairs (0,1), (0,2) at s0; (1,2) at s1
        st.metric("cross_init_loss_barrier_test", anchor, naive)
        st.metric("matched_loss_barrier_test", anchor, matched)
    st.path_points["merge"] = points
    return st


def test_f14_reads_the_merge_probe():
    f14 = _one(_merged(0.5, 0.1).evidence(), "F14")
    assert f14.verdict == HOLDS and f14.label == HOLDS and "matched/naive 0.2 ± 0 (2 seeds)" in f14.measured
    f14 = _one(_merged(0.5, 0.4).evidence(), "F14")
    assert f14.verdict == FAILS and "fails on: weight matching across inits" in f14.detail
    coarse = _one(_merged(0.5, 0.1, points=11).evidence(), "F14")
    assert coarse.verdict == INCONCLUSIVE and "11 α points" in coarse.detail and "points = 21" in coarse.detail


def test_f14_advice_names_the_merge_probe_outside_part_names(holding):
    f14 = holding["F14"]
    assert f14.unmeasured == ["weight matching across inits"] and "[probes.merge]" in f14.detail
    assert "no probe" not in f14.detail
    f14 = _one(Study(False).evidence(), "F14")
    assert "fails on: averaging late children;" in f14.detail


def test_f14_path_points_come_from_a_real_store(tmp_path):
    store, _ = _merged(0.5, 0.1, points=11).write(tmp_path / "s")
    got = findings(Session.open(store), ["F14"])
    assert got["verdict"][0] == INCONCLUSIVE and "11 α points" in got["detail"][0]
