"""F10 (edge of stability) and F15 (gradient in the top-C eigenspace) on hand-built studies whose answers
are known: full-batch and mini-batch runs, learning-rate drops, momentum, seeds that disagree, old stores."""

from __future__ import annotations

import math

import polars as pl
import pytest

from lsdb.query import thresholds as T
from lsdb.query.findings import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, Evidence, evaluate, findings
from lsdb.query.session import Session

from .conftest import REPO
from .conftest_query import Frames

EPOCHS = (0, 0.5, 1, 2, 3, 4, 6, 8, 10, 12, 14, 16, 20, 24, 28, 32, 36, 40)  # of 40; t/T = epoch / 40


def _per_seed(x, seed):
    return x[seed] if isinstance(x, (list, tuple)) else x


def _eos(lam=1.0, sharp=1.0, *, full=False, momentum=0.9, wd=0.0, seeds=(0, 1, 2), drop=30.0, lr2=0.01,
         variant="base") -> Frames:
    """Parents whose λ_max and batch sharpness are ``lam`` and ``sharp`` × the threshold 2(1+β)/η of the lr in
    force (0.1, then ``lr2`` from epoch ``drop``), after a rise (1 − e^(−epoch/2)); weight decay ``wd`` is taken
    off so that curvature + wd is that. Seeds differ by 3%; a list gives one ratio per seed."""
    fr = Frames()
    for seed in seeds:
        j = 1 + 0.03 * seed
        # momentum 0.9 and no weight decay are the run table's defaults (what StoreBuilder writes)
        optim = {k: v for k, v in (("momentum", momentum), ("weight_decay", wd)) if v != {"momentum": 0.9}.get(k, 0)}
        rid = fr.run(f"{variant}-s{seed}", seed, variant=variant, steps_per_epoch=1 if full else 100,
                     batch_size=4000 if full else 64, **optim)
        for e in EPOCHS:
            lr = 0.1 if e < drop else lr2
            c = fr.ckpt(rid, e, lr=lr, train_loss=0.05 + 2 * math.exp(-e / 3), test_error=0.2)
            edge = 2 * (1 + momentum) / lr * (1 - math.exp(-e / 2)) * j
            fr.metric("hessian_top_eigenvalue", c, _per_seed(lam, seed) * edge - wd)
            if sharp is not None:
                fr.metric("batch_sharpness", c, _per_seed(sharp, seed) * edge - wd)
    return fr


def _f(ev: Evidence, fid: str = "F10"):
    return evaluate(ev, [fid])[0]


def _store(fr: Frames, tmp_path, fid: str = "F10") -> dict:
    store, skipped = fr.write(tmp_path / "store")
    assert not skipped
    return findings(Session.open(store), [fid]).row(0, named=True)


# ----------------------------------------------------------------------------------------- F10
def test_f10_full_batch_runs_are_judged_on_lambda_max(tmp_path):
    held = _store(_eos(lam=1.0, sharp=0.3, full=True), tmp_path)  # a real store: runs with steps_per_epoch = 1
    assert held["verdict"] == HOLDS, held
    assert held["measured"].startswith("full batch (base): λ_max/threshold 1.03 ± 0.03 (3 seeds) at lr 0.1")
    low = _f(_eos(lam=0.5, sharp=1.0, full=True).evidence())
    assert low.verdict == FAILS and "fails on: edge of stability, full batch" in low.detail
    high = _f(_eos(lam=1.6, full=True).evidence())
    assert high.verdict == FAILS and high.numbers["full_batch_ratio"]["mean"] == pytest.approx(1.6 * 1.03, rel=1e-3)


def test_f10_mini_batch_runs_are_judged_on_batch_sharpness(tmp_path):
    held = _store(_eos(lam=0.3, sharp=1.0), tmp_path)
    assert held["verdict"] == HOLDS, held
    # full-batch λ_max sits below the threshold in mini-batch runs: reported, not deciding
    assert "λ_max of the probe batch/threshold 0.309 ± 0.009 (3 seeds)" in held["measured"]
    assert "no full-batch run" in held["detail"]
    f = _f(_eos(lam=1.0, sharp=0.4).evidence())
    assert f.verdict == FAILS and "fails on: edge of stability, mini-batch" in f.detail
    assert f.numbers["mini_batch_ratio_to_2_1_minus_beta"]["mean"] == pytest.approx(0.4 * 1.03 * 1.9 / 0.1, rel=1e-3)


def test_f10_threshold_follows_the_learning_rate_in_force():
    """lr 0.1 until epoch 14, then 0.05 for the rest (the longest phase, which decides): curvature that tracks
    2(1+β)/η at each checkpoint's lr holds; judged against the run's initial lr it would read 2×."""
    f = _f(_eos(sharp=1.0, drop=14, lr2=0.05).evidence())
    assert f.verdict == HOLDS, (f.measured, f.detail)
    assert "at lr 0.05" in f.measured and "other lr phases: lr 0.1 1.02 ± 0.0298 (3 seeds)" in f.measured
    assert f.numbers["mini_batch_ratio"]["mean"] == pytest.approx(1.03, rel=1e-3)
    # a curvature that stays at the old threshold after the drop is half the new one
    fr = _eos(sharp=1.0, drop=14, lr2=0.05)
    fr.metrics = [(m, c, v / 2 if m == "batch_sharpness" and int(c.split("@")[1]) >= 1400 else v)
                  for m, c, v in fr.metrics]
    assert _f(fr.evidence()).verdict == FAILS


def test_f10_heavy_ball_momentum_and_weight_decay_set_the_threshold():
    plain = _eos(sharp=1.0, momentum=0.0)  # sharpness at 2/η
    assert _f(plain.evidence()).verdict == HOLDS
    plain.runs = [{**r, "momentum": 0.9} for r in plain.runs]  # the same numbers, judged as heavy ball
    f = _f(plain.evidence())
    assert f.verdict == FAILS and f.numbers["mini_batch_ratio"]["mean"] == pytest.approx(1.03 / 1.9, rel=1e-3)
    with_wd = _f(_eos(sharp=1.0, wd=5.0).evidence())  # curvature + wd at the threshold
    assert with_wd.verdict == HOLDS, with_wd.detail


def test_f10_is_inconclusive_when_seeds_straddle_and_with_one_seed():
    f = _f(_eos(sharp=[0.55, 0.85, 1.05]).evidence())
    assert f.verdict == INCONCLUSIVE and "straddles 0.8" in f.detail
    one = _f(_eos(sharp=1.0, seeds=(0,)).evidence())
    assert one.verdict == INCONCLUSIVE and f"only 1 seed measured (minimum {T.MIN_SEEDS})" in one.detail


def test_f10_without_batch_sharpness_is_not_measured_and_says_which_probe_version():
    f = _f(_eos(sharp=None).evidence())
    assert f.verdict == NOT_MEASURED and "probe version ≥ 3" in f.detail
    # a full-batch variant next to base runs without batch sharpness: holds, partly measured
    fr = _eos(sharp=None)
    full = _eos(lam=1.0, full=True, variant="gd")
    fr.runs += full.runs
    fr.checkpoints += full.checkpoints
    fr.metrics += full.metrics
    both = _f(fr.evidence())
    assert both.verdict == HOLDS and both.label.startswith("holds (partly measured: edge of stability, mini-batch")
    assert both.measured.startswith("full batch (gd): λ_max/threshold")


def test_f10_reports_whether_lambda_max_rises_then_falls():
    fr = _eos(sharp=1.0)
    fr.metrics = [(m, c, v * (2 - int(c.split("@")[1]) / 4000) if m == "hessian_top_eigenvalue" else v)
                  for m, c, v in fr.metrics]  # λ_max peaks mid-run and falls by the end
    f = _f(fr.evidence())
    assert f.verdict == HOLDS and "λ_max rises then falls in 3/3 base seeds" in f.measured
    assert "λ_max rises then falls in 0/3 base seeds" in _f(_eos(sharp=1.0).evidence()).measured


def test_f10_needs_checkpoints_in_the_settled_window():
    fr = _eos(sharp=1.0)
    keep = {f"base-s{s}@{e}" for s in range(3) for e in (0, 50, 100, 200)}  # nothing after epoch 2
    fr.metrics = [m for m in fr.metrics if m[1] in keep]
    f = _f(fr.evidence())
    assert f.verdict == NOT_MEASURED and "second half of a constant-lr phase" in f.detail


# ----------------------------------------------------------------------------------------- F15
def _f15(late, early=0.3, seeds=(0, 1, 2)) -> Frames:
    """Base parents whose top-C gradient fraction is ``early`` before t/T = 0.05 and ``late`` (per seed) after."""
    fr = Frames()
    for seed in seeds:
        rid = fr.run(f"base-s{seed}", seed)
        for e in EPOCHS:
            c = fr.ckpt(rid, e)
            value = early if e / 40 < T.F15_AFTER_FRAC else _per_seed(late, seed) - 0.01 * seed
            fr.metric("top_subspace_grad_fraction", c, value)
            fr.metric("top_k_grad_fraction", c, min(1.0, value + 0.05))
    return fr


def test_f15_holds_after_the_first_percent_and_fails_below(tmp_path):
    held = _store(_f15(0.9), tmp_path, "F15")
    assert held["verdict"] == HOLDS, held
    assert held["measured"] == ("top-C fraction 0.89 ± 0.01 (3 seeds) (lowest after t/T 0.05: 0.89 ± 0.01 (3 "
                                "seeds); before: 0.3 ± 0 (3 seeds)); all k Ritz vectors 0.94 ± 0.01 (3 seeds)")
    f = _f(_f15(0.5).evidence(), "F15")
    assert f.verdict == FAILS and "fails on: fraction" in f.detail


def test_f15_inconclusive_and_not_measured():
    f = _f(_f15([0.65, 0.85, 0.95]).evidence(), "F15")
    assert f.verdict == INCONCLUSIVE and "straddles 0.8" in f.detail
    ev = _f15(0.9).evidence()
    none = Evidence(ev.runs, ev.finals, ev.series.filter(pl.col("metric") != "top_subspace_grad_fraction"))
    got = _f(none, "F15")
    assert got.verdict == NOT_MEASURED and "[probes.hessian]" in got.detail and "top_k ≥ C" in got.detail
    early_only = Evidence(ev.runs, ev.finals, ev.series.filter(pl.col("frac") < 0.09))  # 2 checkpoints after 5%
    assert _f(early_only, "F15").verdict == NOT_MEASURED


# ------------------------------------------------------------------------------ the example spec
def test_the_edge_of_stability_example_plans_a_full_batch_and_a_mini_batch_run():
    from lsdb.plan import expand_runs, load_spec, probe_requests, simulated_study

    spec = load_spec(REPO / "examples" / "edge-of-stability.toml")
    runs = expand_runs(spec, spec.data.train_subset)
    assert {r.steps_per_epoch for r in runs if r.kind == "parent"} == {1, spec.data.train_subset // 50}
    assert {req[0] for req in probe_requests(spec, simulated_study(runs))} >= {"hessian"}
