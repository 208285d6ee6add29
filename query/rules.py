"""The published findings F1–F14 (../shared/PAPERS.md) as rules over a store's ``Evidence``.

One function per finding, ``f1`` … ``f14``; each docstring states the rule and names its thresholds, all of
which live in ``lsdb.query.thresholds`` (``T`` here). They were fixed before looking at data and are never
tuned to it. ``FINDINGS`` maps an id to its rule; ``lsdb.query.findings`` evaluates and prints them.

Conventions shared by every finding
-----------------------------------
- Population: parent runs (kind 'parent') of variant 'base' unless the finding compares variants;
  diverged runs are left out. "Seed" = one parent run.
- Time: ``frac`` = step / total steps of the parent (transfers across data sets); spawn-indexed
  metrics (barriers, disagreement, sibling distances) sit at the parent's checkpoint at the spawn
  time; linearised-model metrics at the expansion checkpoint.
- Errors are fractions (one point = 0.01). "Falls" = Spearman with time ≤ FALLS_SPEARMAN_MAX.
- A finding with several parts: any measured part failing → "does not hold"; all measured parts
  holding with some unmeasured → "holds", and ``detail`` names the unmeasured part.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lsdb.query import thresholds as T
from lsdb.query.evidence import (MERGE_MATCHED, MERGE_NAIVE, NONLINEAR_ADVANTAGE, NUM_CLASSES, Evidence,
                                  _clean_error, _variant_final, advice)
from lsdb.query.stats import Stat, _first_frac, _nearest, _ratio, _rolling_median, spearman
from lsdb.query.verdict import FAILS, Finding, _combine, _not_measured


def onsets(ev: Evidence) -> dict[str, dict]:
    """Per base parent: Spearman(barrier, spawn time), onset t* (fraction) and stability at init."""
    eb, lb = ev.base_series("error_barrier_test"), ev.base_series("loss_barrier_test")
    out = {}
    for rid, e in eb.items():
        l = lb.get(rid)
        if l is None:
            continue
        loss = dict(zip(l["checkpoint_id"], l["value"]))
        keep = [i for i, c in enumerate(e["checkpoint_id"]) if c in loss]
        if not keep:
            continue
        frac, epoch, err = e["frac"][keep], e["epoch"][keep], e["value"][keep]
        lval = np.array([loss[c] for c in e["checkpoint_id"][keep]])
        below = (err < T.F1_ERROR_BARRIER_MAX) & (lval < T.F1_LOSS_BARRIER_MAX)
        out[rid] = {"rho": spearman(epoch, err) if len(set(epoch)) >= T.MIN_TIMES else math.nan,
                    "onset": _first_frac(frac, below), "stable_at_init": bool(epoch[0] == 0 and below[0]),
                    "times": len(set(epoch))}
    return out


def f1(ev: Evidence) -> Finding:
    """F1, the basin is fixed early: the barrier between children falls with spawn time and vanishes early.

    Per seed (``onsets``): Spearman of error_barrier_test with the spawn epoch (≥ MIN_TIMES spawn times) and
    the onset t* = first spawn with error barrier < F1_ERROR_BARRIER_MAX and loss barrier < F1_LOSS_BARRIER_MAX.
    Holds when the mean Spearman ≤ F1_SPEARMAN_MAX and every seed has an onset, mean t*/T ≤ F1_ONSET_FRAC_MAX.
    "Stable at initialisation" (does not hold) when at least SEED_MAJORITY of the seeds are below both barrier
    thresholds already at spawn epoch 0.
    """
    f = Finding("F1", "The basin is fixed early", "error_barrier_test, loss_barrier_test vs spawn time",
                f"barrier between children falls with spawn time (Spearman ≤ {T.F1_SPEARMAN_MAX}); onset t* "
                f"(first spawn with error barrier < {T.F1_ERROR_BARRIER_MAX:g} and loss barrier < "
                f"{T.F1_LOSS_BARRIER_MAX:g}) ≤ {T.F1_ONSET_FRAC_MAX:.0%} of training")
    if miss := ev.missing(["error_barrier_test", "loss_barrier_test"]):
        return _not_measured(f, miss)
    per = onsets(ev)
    if not per or max(p["times"] for p in per.values()) < T.MIN_TIMES:
        return _not_measured(f, [], f"fewer than {T.MIN_TIMES} spawn times per seed; add more to [spawn] times")
    rho, onset = Stat.of(p["rho"] for p in per.values()), Stat.of(p["onset"] for p in per.values())
    never = sum(1 for p in per.values() if math.isnan(p["onset"]))
    stable = sum(p["stable_at_init"] for p in per.values())
    f.numbers = {"spearman": rho.as_dict(), "onset_frac": onset.as_dict(), "seeds_without_onset": never,
                 "seeds_stable_at_init": stable}
    f.measured = f"Spearman {rho}; onset t*/T {onset}" + (f"; {never} seed(s) never reach the onset" if never else "")
    if stable and stable >= T.SEED_MAJORITY * len(per):
        f.verdict = FAILS
        f.measured = "stable at initialisation: " + f.measured
        f.detail = ("the barrier is already below threshold at spawn time 0 (as Frankle et al. saw on MNIST): "
                    "nothing to fix early; use a harder setting (e.g. data.name = \"mnist1d\", a larger lr)")
        return f
    return _combine(f, [("Spearman", rho.mean <= T.F1_SPEARMAN_MAX),
                        ("onset", never == 0 and onset.mean <= T.F1_ONSET_FRAC_MAX)])


F2_MEASURES = ("loss_barrier_test", "child_disagreement", "sibling_kernel_distance", "relative_sibling_distance",
               NONLINEAR_ADVANTAGE)


def f2(ev: Evidence) -> Finding:
    """F2, many measures evolve together: the measures of F2_MEASURES all fall with spawn time, in step.

    Needs at least F2_MIN_MEASURES of them. Per seed: each measure's Spearman with the spawn epoch, and each
    pair's Spearman over the spawn times both have (each over ≥ MIN_TIMES times). Holds when every measure's
    mean Spearman with time ≤ FALLS_SPEARMAN_MAX ("all fall") and at least F2_PAIR_FRACTION_MIN of the measured
    pairs have a mean Spearman ≥ F2_PAIR_SPEARMAN_MIN ("pairs correlated").
    """
    f = Finding("F2", "Many measures evolve together", ", ".join(F2_MEASURES) + " vs spawn time",
                f"all fall with spawn time; pairwise Spearman ≥ {T.F2_PAIR_SPEARMAN_MIN} for ≥ "
                f"{T.F2_PAIR_FRACTION_MIN:.0%} of pairs")
    missing = ev.missing(F2_MEASURES)
    present = [m for m in F2_MEASURES if m not in missing]
    if len(present) < T.F2_MIN_MEASURES:
        return _not_measured(f, missing, f"only {len(present)} of {len(F2_MEASURES)} measures present "
                                         f"(need {T.F2_MIN_MEASURES}); missing: " +
                             "; ".join(f"{m}: {advice(m)}" for m in missing))
    series = {m: ev.base_series(m) for m in present}
    falls = {m: Stat.of(spearman(s["epoch"], s["value"]) for s in series[m].values()
                        if len(set(s["epoch"])) >= T.MIN_TIMES) for m in present}
    pairs = {}
    for i, a in enumerate(present):
        for b in present[i + 1:]:
            rs = []
            for rid, sa in series[a].items():
                sb = series[b].get(rid)
                if sb is None:
                    continue
                vb = dict(zip(sb["checkpoint_id"], sb["value"]))
                keep = [k for k, c in enumerate(sa["checkpoint_id"]) if c in vb]
                if len(keep) >= T.MIN_TIMES:
                    rs.append(spearman(sa["value"][keep], [vb[c] for c in sa["checkpoint_id"][keep]]))
            pairs[(a, b)] = Stat.of(rs)
    good = [p for p, s in pairs.items() if s.n and s.mean >= T.F2_PAIR_SPEARMAN_MIN]
    measured_pairs = [p for p, s in pairs.items() if s.n]
    share = len(good) / len(measured_pairs) if measured_pairs else math.nan
    f.numbers = {"falls": {m: s.as_dict() for m, s in falls.items()},
                 "pairs": {f"{a}~{b}": s.as_dict() for (a, b), s in pairs.items()}, "pair_share": share}
    f.measured = (f"{len(good)}/{len(measured_pairs)} pairs with Spearman ≥ {T.F2_PAIR_SPEARMAN_MIN}; "
                  "vs time: " + ", ".join(f"{m} {falls[m]}" for m in present))
    if missing:
        f.detail = "not measured: " + "; ".join(f"{m} ({advice(m)})" for m in missing)
    if not measured_pairs:
        return _not_measured(f, [], f"no pair of measures shares {T.MIN_TIMES} spawn times")
    return _combine(f, [("all fall", all(s.n and s.mean <= T.FALLS_SPEARMAN_MAX for s in falls.values())),
                        ("pairs correlated", share >= T.F2_PAIR_FRACTION_MIN)])


def f3(ev: Evidence) -> Finding:
    """F3, kernel velocity is fast, then roughly constant.

    Per seed: median kernel_velocity over t/T ≤ F3_EARLY_FRAC over its median over t/T ≥ F3_LATE_FRAC (≥ MIN_TIMES
    late checkpoints). The plateau is that late part, cut to the checkpoints at the learning rate of its first one
    when at least MIN_TIMES share it, smoothed by a centred rolling median of width F3_SMOOTH_WINDOW. Holds when the
    mean ratio ≥ F3_RATIO_MIN ("fast early") and no seed's smoothed plateau reaches 0 and its mean max/min
    ≤ F3_PLATEAU_MAXMIN ("flat non-zero plateau").
    """
    f = Finding("F3", "Kernel velocity is fast, then roughly constant", "kernel_velocity",
                f"median velocity over the first {T.F3_EARLY_FRAC:.0%} ≥ {T.F3_RATIO_MIN:g}× the median over the "
                f"last half; late plateau non-zero and flat (rolling-median max/min ≤ {T.F3_PLATEAU_MAXMIN:g}, "
                f"over the constant-lr part of the last half)")
    if miss := ev.missing(["kernel_velocity"]):
        return _not_measured(f, miss)
    lr = ev.base_series("lr")
    ratios, flats, zero = [], [], 0
    for rid, s in ev.base_series("kernel_velocity").items():
        early = s["value"][s["frac"] <= T.F3_EARLY_FRAC]
        late_mask = s["frac"] >= T.F3_LATE_FRAC
        late = s["value"][late_mask]
        if len(early) == 0 or len(late) < T.MIN_TIMES:
            continue
        ratios.append(np.median(early) / np.median(late) if np.median(late) > 0 else math.inf)
        plateau = late
        if rid in lr:  # the lr drop slows the kernel by design: the plateau is the constant-lr stretch
            lr_at = dict(zip(lr[rid]["checkpoint_id"], lr[rid]["value"]))
            lrs = np.array([lr_at.get(c, math.nan) for c in s["checkpoint_id"][late_mask]])
            same = lrs == lrs[0]
            if same.sum() >= T.MIN_TIMES:
                plateau = late[same]
        smooth = _rolling_median(plateau, T.F3_SMOOTH_WINDOW)
        zero += int(smooth.min() <= 0)
        flats.append(smooth.max() / smooth.min() if smooth.min() > 0 else math.inf)
    if not ratios:
        return _not_measured(f, [], "kernel velocity lacks early (first 5%) or late (last half) checkpoints; "
                                    "add checkpoints ([checkpoints] log_points, every_epochs)")
    r, fl = Stat.of(ratios), Stat.of(flats)
    f.numbers = {"early_late_ratio": r.as_dict(), "plateau_maxmin": fl.as_dict(), "zero_plateaus": zero}
    f.measured = f"early/late {r}; plateau max/min {fl}" + (f"; {zero} seed(s) with a zero plateau" if zero else "")
    return _combine(f, [("fast early", r.mean >= T.F3_RATIO_MIN),
                        ("flat non-zero plateau", zero == 0 and fl.mean <= T.F3_PLATEAU_MAXMIN)])


def f4(ev: Evidence) -> Finding:
    """F4, the kernel moves mostly early.

    Per seed: kernel_distance_to_init at the checkpoint nearest t/T = F4_EARLY_FRAC over its value at the last
    checkpoint (skipped when that nearest checkpoint is the last one or the last value is 0). Holds when the mean
    ratio ≥ F4_RATIO_MIN.
    """
    f = Finding("F4", "The kernel moves mostly early", "kernel_distance_to_init",
                f"S(Θ_0, Θ_{T.F4_EARLY_FRAC:g}T) ≥ {T.F4_RATIO_MIN:g} · S(Θ_0, Θ_T)")
    if miss := ev.missing(["kernel_distance_to_init"]):
        return _not_measured(f, miss)
    ratios, used = [], []
    for s in ev.base_series("kernel_distance_to_init").values():
        i = _nearest(s["frac"], T.F4_EARLY_FRAC)
        if s["value"][-1] > 0 and i != len(s["value"]) - 1:
            ratios.append(s["value"][i] / s["value"][-1])
            used.append(s["frac"][i])
    if not ratios:
        return _not_measured(f, [], "kernel distance to init lacks a checkpoint before the end")
    r = Stat.of(ratios)
    f.numbers = {"ratio": r.as_dict(), "early_frac_used": Stat.of(used).as_dict()}
    f.measured = f"S(0.1T)/S(T) {r} (early checkpoint at t/T = {Stat.of(used).mean:.3g})"
    return _combine(f, [("ratio", r.mean >= T.F4_RATIO_MIN)])


def f5(ev: Evidence) -> Finding:
    """F5, the learned NTK beats the initial one.

    Per seed: linearised_test_error at the first expansion over its value at the expansion nearest F1's onset t*
    (t/T = F5_DEFAULT_FRAC when the onset is not measured), and its Spearman with the expansion epoch (≥ MIN_TIMES
    times). Holds when the mean ratio ≥ F5_RATIO_MIN and, where the Spearman is measured, its mean
    ≤ FALLS_SPEARMAN_MAX ("falls").
    """
    f = Finding("F5", "The learned NTK beats the initial one", "linearised_test_error vs expansion time",
                f"falls with expansion time; err(t=0) / err(onset, else {T.F5_DEFAULT_FRAC:.0%} of training) "
                f"≥ {T.F5_RATIO_MIN:g} (paper: ~3 on CIFAR)")
    if miss := ev.missing(["linearised_test_error"]):
        return _not_measured(f, miss)
    onset = onsets(ev) if ev.has("error_barrier_test") and ev.has("loss_barrier_test") else {}
    ratios, rhos, at = [], [], []
    for rid, s in ev.base_series("linearised_test_error").items():
        if len(s["value"]) < 2:
            continue
        target = onset.get(rid, {}).get("onset", math.nan)
        target = T.F5_DEFAULT_FRAC if not np.isfinite(target) else target
        i = _nearest(s["frac"], target)
        if i == 0 or s["value"][i] <= 0:
            continue
        ratios.append(s["value"][0] / s["value"][i])
        at.append(s["frac"][i])
        if len(set(s["epoch"])) >= T.MIN_TIMES:
            rhos.append(spearman(s["epoch"], s["value"]))
    if not ratios:
        return _not_measured(f, [], "linearised models were expanded at fewer than 2 times; "
                                    "add expansion times (checkpoints) to [probes.kernel_accuracy]")
    r, rho = Stat.of(ratios), Stat.of(rhos)
    f.numbers = {"ratio": r.as_dict(), "spearman": rho.as_dict(), "compared_at_frac": Stat.of(at).as_dict()}
    f.measured = f"err(0)/err(t/T≈{Stat.of(at).mean:.2g}) {r}; Spearman vs time {rho}"
    return _combine(f, [("falls", rho.n > 0 and rho.mean <= T.FALLS_SPEARMAN_MAX if rho.n else None),
                        ("ratio", r.mean >= T.F5_RATIO_MIN)])


def f6(ev: Evidence) -> Finding:
    """F6, the linearised model catches up.

    Per seed: the first expansion time t/T with linearised_test_error ≤ final test error + max(F6_TOL_POINTS,
    F6_TOL_RELATIVE × final test error). Holds when every seed catches up and the mean time ≤ F6_FRAC_MAX.
    """
    f = Finding("F6", "The linearised model catches up", "linearised_test_error vs final test_error",
                f"smallest expansion time with err_lin(t) ≤ err_full(T) + max({T.F6_TOL_POINTS:g}, "
                f"{T.F6_TOL_RELATIVE:.0%}) is ≤ {T.F6_FRAC_MAX:.0%} of training (paper: 15–45%)")
    if miss := ev.missing(["linearised_test_error"]):
        return _not_measured(f, miss)
    fracs = []
    for rid, s in ev.base_series("linearised_test_error").items():
        fin = ev.final(rid)
        if fin is None:
            continue
        bound = fin["test_error"] + max(T.F6_TOL_POINTS, T.F6_TOL_RELATIVE * fin["test_error"])
        fracs.append(_first_frac(s["frac"], s["value"] <= bound))
    if not fracs:
        return _not_measured(f, [], "no parent run has both linearised models and a final checkpoint")
    never = sum(math.isnan(x) for x in fracs)
    st = Stat.of(fracs)
    f.numbers = {"catch_up_frac": st.as_dict(), "seeds_never": never}
    f.measured = f"catch-up at t/T {st}" + (f"; {never} seed(s) never catch up" if never else "")
    return _combine(f, [("catch-up time", never == 0 and st.mean <= T.F6_FRAC_MAX)])


def f7(ev: Evidence) -> Finding:
    """F7, the nonlinear advantage vanishes early.

    Advantage at an expansion checkpoint = linearised_test_error − the mean final test error of the low-lr children
    spawned there (``Evidence.advantage``). Per seed: the first time t/T with advantage ≤ F7_ADVANTAGE_MAX. Holds
    when every seed gets there and the mean time ≤ F7_FRAC_MAX.
    """
    f = Finding("F7", "The nonlinear advantage vanishes early",
                "linearised_test_error − final test_error of low-lr children",
                f"advantage ≤ {T.F7_ADVANTAGE_MAX:g} (1 point) by {T.F7_FRAC_MAX:.0%} of training")
    if miss := ev.missing([NONLINEAR_ADVANTAGE]):
        return _not_measured(f, miss)
    fracs = [_first_frac(s["frac"], s["value"] <= T.F7_ADVANTAGE_MAX) for s in ev.advantage().values()]
    never = sum(math.isnan(x) for x in fracs)
    st = Stat.of(fracs)
    first = Stat.of(s["value"][0] for s in ev.advantage().values())
    f.numbers = {"vanish_frac": st.as_dict(), "advantage_first": first.as_dict(), "seeds_never": never}
    f.measured = f"advantage ≤ 1 point from t/T {st}; advantage at the first expansion {first}" + (
        f"; {never} seed(s) never" if never else "")
    return _combine(f, [("vanishing time", never == 0 and st.mean <= T.F7_FRAC_MAX)])


def f8(ev: Evidence) -> Finding:
    """F8, children agree more when spawned later.

    Per seed: child_disagreement at the latest spawn over at the earliest (≥ 2 spawn times, earliest > 0). Holds
    when the mean ratio ≤ F8_RATIO_MAX; ``detail`` warns when the earliest spawn is not at epoch 0.
    """
    f = Finding("F8", "Children agree more when spawned later", "child_disagreement vs spawn time",
                f"disagreement at the latest spawn ≤ {T.F8_RATIO_MAX:g} × at spawn 0")
    if miss := ev.missing(["child_disagreement"]):
        return _not_measured(f, miss)
    ratios, first_epochs = [], []
    for s in ev.base_series("child_disagreement").values():
        if len(s["value"]) >= 2 and s["value"][0] > 0:
            ratios.append(s["value"][-1] / s["value"][0])
            first_epochs.append(s["epoch"][0])
    if not ratios:
        return _not_measured(f, [], "fewer than 2 spawn times per seed; add more to [spawn] times")
    r = Stat.of(ratios)
    f.numbers = {"ratio": r.as_dict()}
    f.measured = f"latest/earliest {r}"
    if max(first_epochs) > 0:
        f.detail = f"earliest spawn is at epoch {max(first_epochs):g}, not 0; add 0 to [spawn] times"
    return _combine(f, [("ratio", r.mean <= T.F8_RATIO_MAX)])


def f9(ev: Evidence) -> Finding:
    """F9, the final Hessian has about C outliers (C = classes of the data set, NUM_CLASSES).

    Per seed: hessian_outliers at the latest checkpoint that has it. Holds when the mean lies in
    [C − F9_BELOW, C + F9_ABOVE].
    """
    C = NUM_CLASSES.get(ev.dataset or "", None)
    f = Finding("F9", "The final Hessian has ~C outliers", "hessian_outliers at the final checkpoint",
                f"between C − {T.F9_BELOW} and C + {T.F9_ABOVE} eigenvalues above the bulk (C = {C or '?'})")
    if miss := ev.missing(["hessian_outliers"]):
        return _not_measured(f, miss)
    if C is None:
        return _not_measured(f, [], f"number of classes of data set '{ev.dataset}' unknown")
    vals, fracs = [], []
    for rid in ev.parents()["id"]:
        got = ev.final_value("hessian_outliers", rid)
        if got is not None:
            vals.append(got[0])
            fracs.append(got[1])
    if not vals:
        return _not_measured(f, ["hessian_outliers"])
    st = Stat.of(vals)
    f.numbers = {"outliers": st.as_dict(), "classes": C}
    f.measured = f"outliers {st} at t/T {Stat.of(fracs).mean:.3g}"
    if min(fracs) < 1:
        f.detail = "some seeds lack a Hessian at the final checkpoint; the latest one was used"
    return _combine(f, [("outlier count", C - T.F9_BELOW <= st.mean <= C + T.F9_ABOVE)])


def f10(ev: Evidence) -> Finding:
    """F10, the top Hessian eigenvalue rises then falls, or sits at the edge of stability 2/η.

    Per seed (≥ MIN_TIMES checkpoints), passes when hessian_top_eigenvalue is non-monotone (its peak strictly
    inside, rising from the first value and falling to the last by ≥ F10_CHANGE_MIN of the peak each) or when the
    median of λ / (2/η) over t/T ≥ F3_LATE_FRAC lies in [F10_EDGE_LOW, F10_EDGE_HIGH]. Holds when at least
    SEED_MAJORITY of the seeds pass.
    """
    f = Finding("F10", "The top Hessian eigenvalue rises then falls", "hessian_top_eigenvalue vs time",
                f"non-monotone (rises and falls by ≥ {T.F10_CHANGE_MIN:.0%} of its peak), or the last half "
                f"within [{T.F10_EDGE_LOW:g}, {T.F10_EDGE_HIGH:g}] × 2/η")
    if miss := ev.missing(["hessian_top_eigenvalue"]):
        return _not_measured(f, miss)
    lr = ev.base_series("lr")
    passed, rises, falls, edges = [], [], [], []
    for rid, s in ev.base_series("hessian_top_eigenvalue").items():
        v = s["value"]
        if len(v) < T.MIN_TIMES:
            continue
        k = int(np.argmax(v))
        rise, fall = (v[k] - v[0]) / v[k], (v[k] - v[-1]) / v[k]
        nonmono = 0 < k < len(v) - 1 and rise >= T.F10_CHANGE_MIN and fall >= T.F10_CHANGE_MIN
        edge = math.nan
        if rid in lr:
            lr_at = dict(zip(lr[rid]["checkpoint_id"], lr[rid]["value"]))
            late = s["frac"] >= T.F3_LATE_FRAC
            eta = np.array([lr_at.get(c, math.nan) for c in s["checkpoint_id"][late]])
            if late.any():
                edge = float(np.nanmedian(v[late] * eta / 2))
        passed.append(nonmono or T.F10_EDGE_LOW <= edge <= T.F10_EDGE_HIGH)
        rises.append(rise)
        falls.append(fall)
        edges.append(edge)
    if not passed:
        return _not_measured(f, [], f"fewer than {T.MIN_TIMES} checkpoints with a Hessian per seed")
    f.numbers = {"rise": Stat.of(rises).as_dict(), "fall": Stat.of(falls).as_dict(),
                 "late_lambda_over_2_eta": Stat.of(edges).as_dict(), "seeds_passing": sum(passed)}
    f.measured = (f"rise {Stat.of(rises)}, fall {Stat.of(falls)} (of the peak); late λ/(2/η) "
                  f"{Stat.of(edges)}; {sum(passed)}/{len(passed)} seeds pass")
    return _combine(f, [("shape", sum(passed) >= T.SEED_MAJORITY * len(passed))])


def f11(ev: Evidence) -> Finding:
    """F11, adversarial training is not flatter.

    sharpness_1d at each run's latest checkpoint that has it, averaged per seed, for adversarially trained parents
    (any variant) and standard base parents; σ(adv)/σ(std) per matching seed, else the ratio of means (``_ratio``).
    Holds when the mean ratio ≥ F11_RATIO_MIN; ``detail`` warns when the mean clean test errors differ by more
    than F11_MATCH_ERROR (accuracy not matched).
    """
    import polars as pl

    f = Finding("F11", "Adversarial training is not flatter", "sharpness_1d at the final checkpoint",
                f"σ_1D(adversarial) ≥ {T.F11_RATIO_MIN:g} · σ_1D(standard) at matched clean accuracy")
    adv = ev.runs.filter((pl.col("kind") == "parent") & (pl.col("adversarial") != "none"))
    if adv.height == 0:
        return _not_measured(f, [], "no adversarially trained runs in this store: add a variant, e.g. "
                                    "[variants.adversarial.train] adversarial = \"pgd\"")
    if miss := ev.missing(["sharpness_1d"]):
        return _not_measured(f, miss)
    std = ev.parents().filter(pl.col("adversarial") == "none")
    a, s = _variant_final(ev, "sharpness_1d", adv), _variant_final(ev, "sharpness_1d", std)
    if not a or not s:
        return _not_measured(f, [], "sharpness_1d lacks the adversarial or the standard runs")
    r, how = _ratio(a, s)
    gap = abs(_clean_error(ev, adv) - _clean_error(ev, std))
    f.numbers = {"ratio": r.as_dict(), "clean_error_gap": gap}
    f.measured = f"σ(adv)/σ(std) {r} ({how}); clean test error gap {gap:.3g}"
    if not gap <= T.F11_MATCH_ERROR:
        f.detail = (f"clean errors differ by {gap:.3g} > {T.F11_MATCH_ERROR:g}: not at matched accuracy "
                    f"(tune adv_epsilon / adv_mix)")
    return _combine(f, [("ratio", r.mean >= T.F11_RATIO_MIN)])


def f12(ev: Evidence) -> Finding:
    """F12, large-batch minima are sharper (filter-normalised sharpness_1d).

    Small batch: the smallest batch_size among standard base parents; large batch: standard parents of any variant
    and the same model with a larger batch_size. σ(large)/σ(small) of sharpness_1d at the latest checkpoint that
    has it, per matching seed, else the ratio of means. Holds when the mean ratio ≥ F12_RATIO_MIN.
    """
    import polars as pl

    f = Finding("F12", "Large-batch minima are sharper", "sharpness_1d at the final checkpoint",
                f"σ_1D(large batch) ≥ {T.F12_RATIO_MIN:g} · σ_1D(small batch), filter-normalised")
    base = ev.parents().filter(pl.col("adversarial") == "none")
    if base.height == 0:
        return _not_measured(f, [], "no standard base runs")
    small = int(base["batch_size"].min())
    large = ev.runs.filter((pl.col("kind") == "parent") & (pl.col("batch_size") > small)
                           & (pl.col("adversarial") == "none") & (pl.col("model") == base["model"][0]))
    if large.height == 0:
        return _not_measured(f, [], "no large-batch runs in this store: add a variant, e.g. "
                                    "[variants.large_batch.optim] batch_size = 512")
    if miss := ev.missing(["sharpness_1d"]):
        return _not_measured(f, miss)
    l, s = (_variant_final(ev, "sharpness_1d", large),
            _variant_final(ev, "sharpness_1d", base.filter(pl.col("batch_size") == small)))
    if not l or not s:
        return _not_measured(f, [], "sharpness_1d lacks the large-batch or the small-batch runs")
    r, how = _ratio(l, s)
    f.numbers = {"ratio": r.as_dict(), "batch_sizes": [small, int(large["batch_size"].max())]}
    f.measured = f"σ(batch {int(large['batch_size'].max())})/σ(batch {small}) {r} ({how})"
    return _combine(f, [("ratio", r.mean >= T.F12_RATIO_MIN)])


def f13(ev: Evidence) -> Finding:
    """F13, more patches give a smaller top Hessian eigenvalue; more parameters per patch a larger one.

    Patch networks: parents of any variant with model "patchnet", at least two patch counts. Part "patches":
    hessian_top_eigenvalue at the latest checkpoint that has it, λ(most patches)/λ(fewest) per matching seed, else
    the ratio of means; holds when the mean ≤ F13_RATIO_MAX. Part "parameters per patch", where runs at one patch
    count differ in num_params: per patch count, Spearman of num_params with the final eigenvalue and with the final
    train loss (the sign of Pearson's r under 3 runs); holds when the mean is > 0 for the eigenvalue and < 0 for
    the loss.
    """
    import polars as pl

    f = Finding("F13", "More patches, smaller top Hessian eigenvalue", "hessian_top_eigenvalue at the final "
                "checkpoint of patch networks", f"λ(most patches)/λ(fewest) ≤ {T.F13_RATIO_MAX:g}; more "
                "parameters per patch → larger λ and lower final loss")
    patch = ev.runs.filter((pl.col("kind") == "parent") & (pl.col("model") == "patchnet"))
    counts = sorted(set(patch["patches"].to_list()))
    if len(counts) < 2:
        return _not_measured(f, [], "needs patch-network runs with at least two patch counts: add variants, "
                                    "e.g. [variants.patch1.model] name = \"patchnet\", patches = 1 (and 4, 9)")
    if miss := ev.missing(["hessian_top_eigenvalue"]):
        return _not_measured(f, miss)
    lam = {n: _variant_final(ev, "hessian_top_eigenvalue", patch.filter(pl.col("patches") == n)) for n in counts}
    lo, hi = counts[0], counts[-1]
    if not lam[lo] or not lam[hi]:
        return _not_measured(f, [], "hessian_top_eigenvalue lacks the patch networks' final checkpoints")
    r, how = _ratio(lam[hi], lam[lo])
    f.numbers = {"ratio": r.as_dict(), "patches": counts}
    f.measured = f"λ({hi})/λ({lo}) {r} ({how})"
    # part 2: a width sweep at a fixed patch count
    rho_l, rho_loss = [], []
    for n in counts:
        grp = patch.filter(pl.col("patches") == n)
        if grp["num_params"].n_unique() < 2:
            continue
        lam_n, loss_n, params = [], [], []
        for r_ in grp.iter_rows(named=True):
            got, fin = ev.final_value("hessian_top_eigenvalue", r_["id"]), ev.final(r_["id"])
            if got and fin:
                lam_n.append(got[0]), loss_n.append(fin["train_loss"]), params.append(r_["num_params"])
        if len(set(params)) >= 2:
            rho_l.append(spearman(params, lam_n) if len(params) >= 3 else np.sign(np.corrcoef(params, lam_n)[0, 1]))
            rho_loss.append(spearman(params, loss_n) if len(params) >= 3 else
                            np.sign(np.corrcoef(params, loss_n)[0, 1]))
    part2 = None
    if rho_l:
        part2 = Stat.of(rho_l).mean > 0 and Stat.of(rho_loss).mean < 0
        f.measured += f"; params vs λ: Spearman {Stat.of(rho_l)}, vs final loss {Stat.of(rho_loss)}"
    return _combine(f, [("patches", r.mean <= T.F13_RATIO_MAX),
                        ("parameters per patch (add variants that differ in model.width at one patch "
                         "count)", part2)])


def f14(ev: Evidence) -> Finding:
    """F14, merging: late children average well; weight matching halves the barrier across inits.

    Part "averaging late children": loss_barrier_test at each seed's latest spawn, mean ≤ F14_AVERAGE_LOSS_MAX.
    Part "weight matching across inits" (MERGE_NAIVE, MERGE_MATCHED, latest values): naive mean
    ≥ F14_NAIVE_BARRIER_MIN and matched mean ≤ F14_MATCHED_RATIO_MAX × naive mean.
    """
    f = Finding("F14", "Merging: late children average well; matching halves cross-init barriers",
                f"loss_barrier_test at the latest spawn; {MERGE_NAIVE}, {MERGE_MATCHED}",
                f"averaging late-spawned children does not raise test loss (loss barrier ≤ "
                f"{T.F14_AVERAGE_LOSS_MAX:g}); different inits: naive barrier ≥ {T.F14_NAIVE_BARRIER_MIN:g}, "
                f"weight matching ≤ {T.F14_MATCHED_RATIO_MAX:g} × naive")
    part_a = part_b = None
    texts = []
    if ev.has("loss_barrier_test"):
        late = Stat.of(s["value"][-1] for s in ev.base_series("loss_barrier_test").values())
        if late.n:
            part_a = late.mean <= T.F14_AVERAGE_LOSS_MAX
            texts.append(f"late-spawn loss barrier {late}")
            f.numbers["late_loss_barrier"] = late.as_dict()
    if ev.has(MERGE_NAIVE) and ev.has(MERGE_MATCHED):
        naive = Stat.of(s["value"][-1] for s in ev.base_series(MERGE_NAIVE).values())
        matched = Stat.of(s["value"][-1] for s in ev.base_series(MERGE_MATCHED).values())
        if naive.n and matched.n:
            part_b = naive.mean >= T.F14_NAIVE_BARRIER_MIN and matched.mean <= T.F14_MATCHED_RATIO_MAX * naive.mean
            texts.append(f"cross-init barrier naive {naive}, matched {matched}")
    if part_a is None and part_b is None:
        return _not_measured(f, ev.missing(["loss_barrier_test"]) or ["loss_barrier_test"])
    f.measured = "; ".join(texts)
    return _combine(f, [("averaging late children", part_a),
                        (f"weight matching across inits ({advice(MERGE_NAIVE)})", part_b)])


FINDINGS: dict[str, Callable[[Evidence], Finding]] = {
    "F1": f1, "F2": f2, "F3": f3, "F4": f4, "F5": f5, "F6": f6, "F7": f7,
    "F8": f8, "F9": f9, "F10": f10, "F11": f11, "F12": f12, "F13": f13, "F14": f14,
}
