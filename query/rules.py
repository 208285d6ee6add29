"""The published findings F1–F15 (docs/findings.md) as rules over a store's ``Evidence``.

One function per finding, ``f1`` … ``f15``; each docstring states the rule and names its thresholds, all of
which live in ``lsdb.query.thresholds`` (``T`` here). They were fixed before looking at data and are never
tuned to it. ``FINDINGS`` maps an id to its rule; ``lsdb.query.findings`` evaluates and prints them.
docs/findings.md describes every finding for readers.

Conventions shared by every finding
-----------------------------------
- Population: parent runs (kind 'parent') of variant 'base' unless the finding compares variants;
  diverged runs are left out. "Seed" = one parent run.
- Time: ``frac`` = step / total steps of the parent (transfers across data sets); spawn-indexed
  metrics (barriers, disagreement, sibling distances) sit at the parent's checkpoint at the spawn
  time; linearised-model metrics at the expansion checkpoint.
- Errors are fractions (one point = 0.01). "Falls" = Spearman with time ≤ FALLS_SPEARMAN_MAX.
- Every threshold test is a ``stats.check`` on the per-seed values: it passes on the seed mean, and is
  unsettled (the finding is then "inconclusive") when fewer than MIN_SEEDS seeds were measured, or the
  seeds' spread (mean ± std) or the bootstrap interval of the mean straddles the threshold. A failed
  precondition (F11 matched accuracy, F12 matched train loss, F13 at a minimum, F14 path resolution) also
  leaves a part unsettled.
- A finding with several parts: a settled failing part → "does not hold"; else an unsettled part →
  "inconclusive"; else "holds", "holds (partly measured: …)" when some parts were not measured
  (``verdict._combine``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from lsdb.query import thresholds as T
from lsdb.query.evidence import (MERGE_MATCHED, MERGE_NAIVE, NONLINEAR_ADVANTAGE, Evidence, _clean_error,
                                  _variant_final, advice)
from lsdb.query.stats import Stat, _first_frac, _g, _nearest, _ratio, _rolling_median, check, spearman
from lsdb.query.verdict import FAILS, Finding, Part, _combine, _join, _not_measured
from lsdb.train import NUM_CLASSES

#: Where the expansion grid of the linearised model is set (F5, F6 advice).
EXPANSION_ADVICE = ("add expansion times across the run: [probes.kernel_accuracy] on_checkpoints = \"spawn\" "
                    "expands at every [spawn] time, so add spawn times (e.g. 12, 16, 20, 24, 32 epochs of 40)")


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


def _never_inf(x: float) -> float:
    """A time that never came counts as +inf against an upper bound."""
    return math.inf if math.isnan(x) else x


def _points_why(ev: Evidence, probe: str) -> str:
    """The precondition on an interpolation path's α grid (PATH_POINTS_MIN)."""
    p = ev.path_points.get(probe)
    if p is not None and p < T.PATH_POINTS_MIN:
        return (f"the {probe} path has {p} α points, fewer than the {T.PATH_POINTS_MIN} of the definition, so a "
                f"barrier's peak can fall between them (set [probes.{probe}] points = {T.PATH_POINTS_MIN})")
    return ""


def f1(ev: Evidence) -> Finding:
    """F1, the basin is fixed early: the barrier between children falls with spawn time and vanishes early.

    Per seed (``onsets``): Spearman of error_barrier_test with the spawn epoch (≥ MIN_TIMES spawn times) and
    the onset t* = first spawn with error barrier < F1_ERROR_BARRIER_MAX and loss barrier < F1_LOSS_BARRIER_MAX
    (+inf when never). Holds when the Spearman check (≤ F1_SPEARMAN_MAX) and the onset check
    (t*/T ≤ F1_ONSET_FRAC_MAX) pass. "Stable at initialisation" (does not hold) when at least SEED_MAJORITY of
    the seeds are below both barrier thresholds already at spawn epoch 0.
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
    why = _points_why(ev, "barrier")
    return _combine(f, [
        Part.all_of("Spearman", [check([p["rho"] for p in per.values()], T.F1_SPEARMAN_MAX, "<=")], why=why),
        Part.all_of("onset", [check([_never_inf(p["onset"]) for p in per.values()], T.F1_ONSET_FRAC_MAX, "<=")],
                    why=why)])


F2_MEASURES = ("loss_barrier_test", "child_disagreement", "sibling_kernel_distance", "relative_sibling_distance",
               NONLINEAR_ADVANTAGE)


def f2(ev: Evidence) -> Finding:
    """F2, many measures evolve together: the measures of F2_MEASURES all fall with spawn time, in step.

    Needs at least F2_MIN_MEASURES of them. Per seed: each measure's Spearman with the spawn epoch, and each
    pair's Spearman over the spawn times both have (each over ≥ MIN_TIMES times). "All fall": every measure's
    check (Spearman with time ≤ FALLS_SPEARMAN_MAX) passes. "Pairs correlated": at least F2_PAIR_FRACTION_MIN of
    the measured pairs pass their check (pairwise Spearman ≥ F2_PAIR_SPEARMAN_MIN); unsettled when the share
    crosses F2_PAIR_FRACTION_MIN depending on how the unsettled pairs turn out.
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
    fall_values = {m: [spearman(s["epoch"], s["value"]) for s in series[m].values()
                       if len(set(s["epoch"])) >= T.MIN_TIMES] for m in present}
    falls = {m: Stat.of(v) for m, v in fall_values.items()}
    pair_values = {}
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
            pair_values[(a, b)] = rs
    pairs = {p: Stat.of(v) for p, v in pair_values.items()}
    checks = {p: check(v, T.F2_PAIR_SPEARMAN_MIN, ">=") for p, v in pair_values.items()}
    measured_pairs = [p for p, c in checks.items() if c.ok is not None]
    good = [p for p in measured_pairs if checks[p].ok and not checks[p].why]
    unsure = [p for p in measured_pairs if checks[p].why]
    share = sum(1 for p in measured_pairs if checks[p].ok) / len(measured_pairs) if measured_pairs else math.nan
    f.numbers = {"falls": {m: s.as_dict() for m, s in falls.items()},
                 "pairs": {f"{a}~{b}": s.as_dict() for (a, b), s in pairs.items()}, "pair_share": share}
    f.measured = (f"{sum(1 for p in measured_pairs if checks[p].ok)}/{len(measured_pairs)} pairs with Spearman ≥ "
                  f"{T.F2_PAIR_SPEARMAN_MIN}; vs time: " + ", ".join(f"{m} {falls[m]}" for m in present))
    if missing:
        f.detail = "not measured: " + "; ".join(f"{m} ({advice(m)})" for m in missing)
    if not measured_pairs:
        return _not_measured(f, [], f"no pair of measures shares {T.MIN_TIMES} spawn times")
    n = len(measured_pairs)
    low, high = len(good) / n, (len(good) + len(unsure)) / n  # share if every unsettled pair fails / passes
    pairs_part = Part("pairs correlated", share >= T.F2_PAIR_FRACTION_MIN,
                      "" if low >= T.F2_PAIR_FRACTION_MIN or high < T.F2_PAIR_FRACTION_MIN else
                      f"{len(unsure)} pair(s) unsettled (" + "; ".join(
                          f"{a}~{b}: {checks[(a, b)].why}" for a, b in unsure) + ")")
    return _combine(f, [Part.all_of("all fall", [check(v, T.FALLS_SPEARMAN_MAX, "<=") for v in fall_values.values()]),
                        pairs_part])


def _velocity(s: dict, lr: dict) -> dict | None:
    """One seed's velocity series: early/late median ratio, the smoothed plateau's max/min, frozen or not."""
    early = s["value"][s["frac"] <= T.F3_EARLY_FRAC]
    late_mask = s["frac"] >= T.F3_LATE_FRAC
    late = s["value"][late_mask]
    if len(early) == 0 or len(late) < T.MIN_TIMES:
        return None
    e, l = float(np.median(early)), float(np.median(late))
    plateau = late
    if lr:  # the lr drop slows the kernel by design: the plateau is the constant-lr stretch
        lrs = np.array([lr.get(c, math.nan) for c in s["checkpoint_id"][late_mask]])
        same = lrs == lrs[0]
        if same.sum() >= T.MIN_TIMES:
            plateau = late[same]
    smooth = _rolling_median(plateau, T.F3_SMOOTH_WINDOW)
    return {"ratio": e / l if l > 0 else math.inf, "late_over_early": l / e if e > 0 else math.nan,
            "flat": smooth.max() / smooth.min() if smooth.min() > 0 else math.inf,
            "zero": bool(smooth.min() <= 0), "frozen": bool(e > 0 and l < T.F3_FROZEN_FRAC * e)}


def _spacing(ev: Evidence) -> str:
    """The checkpoint spacings Δ (epochs) behind the early and the late velocities: Δ = S / (S/Δ)."""
    if not (ev.has("kernel_distance_next") and ev.has("kernel_velocity")):
        return ""
    dist, vel = ev.base_series("kernel_distance_next"), ev.base_series("kernel_velocity")
    early, late = [], []
    for rid, v in vel.items():
        d = dict(zip(dist[rid]["checkpoint_id"], dist[rid]["value"])) if rid in dist else {}
        for c, fr, x in zip(v["checkpoint_id"], v["frac"], v["value"]):
            if c in d and x > 0 and fr <= T.F3_EARLY_FRAC:
                early.append(d[c] / x)
            elif c in d and x > 0 and fr >= T.F3_LATE_FRAC:
                late.append(d[c] / x)
    if not early or not late:
        return ""

    def span(v):
        return f"{_g(min(v))}" if np.isclose(min(v), max(v)) else f"{_g(min(v))}–{_g(max(v))}"

    return f"Δ early {span(early)} ep, late {span(late)} ep"


def f3(ev: Evidence) -> Finding:
    """F3, kernel velocity is fast, then roughly constant.

    The deciding velocity is F3_DECIDING_METRIC, the angular velocity θ/Δ = arccos(1 − S)/Δ: for steady motion
    it does not depend on the checkpoint spacing Δ, while S/Δ (kernel_velocity) grows like Δ and so is not
    comparable between early checkpoints (Δ of a few steps) and late ones (Δ of epochs). S/Δ is reported next to
    it and decides only when no angular velocity is stored (``detail`` says so).

    Per seed: median velocity over t/T ≤ F3_EARLY_FRAC over its median over t/T ≥ F3_LATE_FRAC (≥ MIN_TIMES late
    checkpoints). The plateau is that late part, cut to the checkpoints at the learning rate of its first one
    when at least MIN_TIMES share it, smoothed by a centred rolling median of width F3_SMOOTH_WINDOW.
    "Frozen kernel" (does not hold, a different outcome from Fort's constant motion) when at least SEED_MAJORITY
    of the seeds have a late median below F3_FROZEN_FRAC × the early one. Otherwise holds when the ratio check
    (≥ F3_RATIO_MIN, "fast early") and the plateau check (smoothed max/min ≤ F3_PLATEAU_MAXMIN, a plateau
    reaching 0 counting as ∞; "flat non-zero plateau") pass; a minority of frozen seeds leaves the plateau
    part unsettled.
    """
    f = Finding("F3", "Kernel velocity is fast, then roughly constant", "kernel_angular_velocity (decides), "
                "kernel_velocity", f"median velocity over the first {T.F3_EARLY_FRAC:.0%} ≥ {T.F3_RATIO_MIN:g}× the "
                f"median over the last half; late plateau non-zero and flat (rolling-median max/min ≤ "
                f"{T.F3_PLATEAU_MAXMIN:g}, over the constant-lr part of the last half); late < "
                f"{T.F3_FROZEN_FRAC:.0%} of early = frozen kernel")
    deciding = T.F3_DECIDING_METRIC if ev.has(T.F3_DECIDING_METRIC) else "kernel_velocity"
    if miss := ev.missing([deciding]):
        return _not_measured(f, miss)
    lr_series = ev.base_series("lr")
    per = {}
    for metric in dict.fromkeys([deciding, "kernel_velocity"]):
        if ev.has(metric):
            got = {rid: _velocity(s, dict(zip(lr_series[rid]["checkpoint_id"], lr_series[rid]["value"]))
                                  if rid in lr_series else {})
                   for rid, s in ev.base_series(metric).items()}
            per[metric] = {rid: v for rid, v in got.items() if v is not None}
    seeds = per[deciding]
    if not seeds:
        return _not_measured(f, [], "kernel velocity lacks early (first 5%) or late (last half) checkpoints; "
                                    "add checkpoints ([checkpoints] log_points, every_epochs)")
    name = {"kernel_angular_velocity": "angular velocity θ/Δ", "kernel_velocity": "S/Δ"}
    r, fl = Stat.of(v["ratio"] for v in seeds.values()), Stat.of(v["flat"] for v in seeds.values())
    zero, frozen = sum(v["zero"] for v in seeds.values()), sum(v["frozen"] for v in seeds.values())
    f.numbers = {"early_late_ratio": r.as_dict(), "plateau_maxmin": fl.as_dict(), "zero_plateaus": zero,
                 "frozen_seeds": frozen, "deciding_metric": deciding}
    texts = [f"{name[deciding]} (decides): early/late {r}; plateau max/min {fl}"]
    if deciding != "kernel_velocity" and per.get("kernel_velocity"):
        other = Stat.of(v["ratio"] for v in per["kernel_velocity"].values())
        f.numbers["early_late_ratio_s_over_delta"] = other.as_dict()
        texts.append(f"S/Δ early/late {other} (depends on Δ)")
    if spacing := _spacing(ev):
        texts.append(spacing)
    if zero:
        texts.append(f"{zero} seed(s) with a zero plateau")
    f.measured = "; ".join(texts)
    if deciding == "kernel_velocity":
        f.detail = ("no angular velocity stored: S/Δ decides, and it grows with the checkpoint spacing Δ for steady "
                    "motion; rerun [probes.ntk_distance] for kernel_angular_velocity")
    if frozen and frozen >= T.SEED_MAJORITY * len(seeds):
        late = Stat.of(v["late_over_early"] for v in seeds.values())
        loss = Stat.of(fin["train_loss"] for rid in seeds if (fin := ev.final(rid)) is not None)
        f.verdict = FAILS
        f.measured = f"frozen kernel in {frozen}/{len(seeds)} seeds: late/early {late}; " + f.measured
        f.detail = _join(f.detail, f"the late velocity is below {T.F3_FROZEN_FRAC:.0%} of the early one: the kernel "
                                   f"stopped moving (final train loss {loss}; small nets stop once their train loss "
                                   "reaches ~0), a different outcome from Fort et al.'s constant motion; use a harder "
                                   "setting (e.g. data.name = \"mnist1d\")")
        return f
    return _combine(f, [
        Part.of("fast early", check([v["ratio"] for v in seeds.values()], T.F3_RATIO_MIN, ">=")),
        Part.all_of("flat non-zero plateau", [check([v["flat"] for v in seeds.values()], T.F3_PLATEAU_MAXMIN, "<=")],
                    why=f"{frozen} of {len(seeds)} seeds have a frozen kernel" if frozen else "")])


def f4(ev: Evidence) -> Finding:
    """F4, the kernel moves mostly early.

    Per seed: kernel_distance_to_init at the checkpoint nearest t/T = F4_EARLY_FRAC over its value at the last
    checkpoint (skipped when that nearest checkpoint is the last one or the last value is 0). Holds when the
    ratio check (≥ F4_RATIO_MIN) passes.
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
    return _combine(f, [Part.of("ratio", check(ratios, T.F4_RATIO_MIN, ">="))])


def _before_end(ev: Evidence, rid: str, s: dict) -> dict:
    """The expansions strictly before the run's final checkpoint (see thresholds, F6)."""
    fin = ev.final(rid)
    if fin is None:
        return s
    keep = s["epoch"] < fin["epoch"] - 1e-9
    return {k: v[keep] for k, v in s.items()}


def f5(ev: Evidence) -> Finding:
    """F5, the learned NTK beats the initial one.

    Expansions at the parent's final checkpoint are left out (there the linearised model trains 0 steps).
    Per seed: linearised_test_error at the first expansion over its value at the later expansion nearest the
    comparison time: F1's onset t* when it is measured and after the first expansion, else t/T = F5_DEFAULT_FRAC
    (also when the onset is at t = 0, i.e. the net is stable at initialisation). A seed with 0 error at the
    comparison time has ratio ∞. Also the Spearman of the error with the expansion epoch (≥ MIN_TIMES times).
    Holds when the ratio check (≥ F5_RATIO_MIN) and, where measured, the Spearman check (≤ FALLS_SPEARMAN_MAX,
    "falls") pass.
    """
    f = Finding("F5", "The learned NTK beats the initial one", "linearised_test_error vs expansion time",
                f"falls with expansion time; err(t=0) / err(onset, else {T.F5_DEFAULT_FRAC:.0%} of training) "
                f"≥ {T.F5_RATIO_MIN:g} (paper: ~3 on CIFAR)")
    if miss := ev.missing(["linearised_test_error"]):
        return _not_measured(f, miss)
    onset = onsets(ev) if ev.has("error_barrier_test") and ev.has("loss_barrier_test") else {}
    ratios, rhos, at, firsts = [], [], [], []
    basis = {"onset": 0, "default": 0}
    for rid, s in ev.base_series("linearised_test_error").items():
        s = _before_end(ev, rid, s)
        if len(s["value"]) < 2:
            continue
        target = onset.get(rid, {}).get("onset", math.nan)
        use_onset = np.isfinite(target) and target > s["frac"][0]
        basis["onset" if use_onset else "default"] += 1
        i = 1 + _nearest(s["frac"][1:], target if use_onset else T.F5_DEFAULT_FRAC)
        ratios.append(s["value"][0] / s["value"][i] if s["value"][i] > 0 else math.inf)
        at.append(s["frac"][i])
        firsts.append(s["frac"][0])
        if len(set(s["epoch"])) >= T.MIN_TIMES:
            rhos.append(spearman(s["epoch"], s["value"]))
    if not ratios:
        return _not_measured(f, [], "linearised models were expanded at fewer than 2 times before the final "
                                    "checkpoint; " + EXPANSION_ADVICE)
    r, rho = Stat.of(ratios), Stat.of(rhos)
    inf = sum(1 for x in ratios if x == math.inf)
    f.numbers = {"ratio": r.as_dict(), "spearman": rho.as_dict(), "compared_at_frac": Stat.of(at).as_dict(),
                 "compared_at_onset": basis["onset"], "compared_at_default": basis["default"]}
    how = ", ".join(x for x in (f"F1's onset for {basis['onset']}" if basis["onset"] else "",
                                f"{T.F5_DEFAULT_FRAC:.0%} of training for {basis['default']}"
                                if basis["default"] else "") if x)
    zero_err = f" (∞ for {inf} seed(s) with 0 error)" if inf else ""
    f.measured = (f"err(0)/err(t/T≈{Stat.of(at).mean:.2g}) {r}{zero_err}; compared at {how} seed(s); "
                  f"Spearman vs time {rho}")
    if max(firsts) > 0:
        f.detail = f"the first expansion is at t/T = {max(firsts):.3g}, not 0; add 0 to [spawn] times"
    return _combine(f, [Part.of("falls", check(rhos, T.FALLS_SPEARMAN_MAX, "<=")),
                        Part.of("ratio", check(ratios, T.F5_RATIO_MIN, ">="))])


def catch_up(ev: Evidence) -> dict[str, dict]:
    """Per base parent (F6): where the linearised model catches up on the expansion grid.

    ``placed``: the grid settles the comparison with F6_FRAC_MAX, and ``frac`` is the first expansion time
    that catches up (+inf when none does, the grid reaching past F6_FRAC_MAX); else ``bracket`` = (a, b), the
    stretch of t/T the catch-up lies in (b = 1 when no expansion before the end catches up).
    """
    out = {}
    for rid, s in ev.base_series("linearised_test_error").items():
        fin = ev.final(rid)
        if fin is None:
            continue
        s = _before_end(ev, rid, s)
        if len(s["value"]) == 0:
            continue
        bound = fin["test_error"] + max(T.F6_TOL_POINTS, T.F6_TOL_RELATIVE * fin["test_error"])
        hits = np.flatnonzero(s["value"] <= bound)
        fr = s["frac"]
        if len(hits):
            k = int(hits[0])
            t, prev = float(fr[k]), (float(fr[k - 1]) if k > 0 else 0.0)
            if t <= T.F6_FRAC_MAX or prev >= T.F6_FRAC_MAX:
                out[rid] = {"placed": True, "frac": t, "bracket": (prev, t)}
            else:
                out[rid] = {"placed": False, "frac": t, "bracket": (prev, t)}
        elif fr[-1] >= T.F6_FRAC_MAX:
            out[rid] = {"placed": True, "frac": math.inf, "bracket": (float(fr[-1]), 1.0)}
        else:
            out[rid] = {"placed": False, "frac": math.inf, "bracket": (float(fr[-1]), 1.0)}
    return out


def f6(ev: Evidence) -> Finding:
    """F6, the linearised model catches up.

    Per seed (``catch_up``): the first expansion time t/T before the final checkpoint with linearised_test_error
    ≤ final test error + max(F6_TOL_POINTS, F6_TOL_RELATIVE × final test error). The final checkpoint is left out:
    there the linearised model trains 0 steps and always "catches up". A seed is placed when its grid settles
    the comparison with F6_FRAC_MAX (it catches up at a time ≤ F6_FRAC_MAX, or not before a time ≥ F6_FRAC_MAX);
    otherwise the catch-up lies in a gap of the grid around F6_FRAC_MAX and the seed is not measured ("not
    measured" when no seed is placed). Holds when the check of the placed seeds' times (≤ F6_FRAC_MAX, never =
    +inf) passes; the fraction is reported.
    """
    f = Finding("F6", "The linearised model catches up", "linearised_test_error vs final test_error",
                f"smallest expansion time before the end with err_lin(t) ≤ err_full(T) + max({T.F6_TOL_POINTS:g}, "
                f"{T.F6_TOL_RELATIVE:.0%}) is ≤ {T.F6_FRAC_MAX:.0%} of training (paper: 15–45%)")
    if miss := ev.missing(["linearised_test_error"]):
        return _not_measured(f, miss)
    per = catch_up(ev)
    if not per:
        return _not_measured(f, [], "no parent run has both linearised models before its final checkpoint and "
                                    "a final checkpoint")
    placed = {rid: p for rid, p in per.items() if p["placed"]}
    gaps = [p["bracket"] for p in per.values() if not p["placed"]]
    gap_text = ""
    if gaps:
        spans = {f"({a:.3g}, {b:.3g}]": sum(1 for g in gaps if g == (a, b)) for a, b in gaps}
        gap_text = (f"the expansion grid cannot place the catch-up for {len(gaps)} seed(s): it lies in t/T " +
                    ", ".join(f"{k} ({n} seed{'s' if n != 1 else ''})" for k, n in spans.items()) +
                    f", across {T.F6_FRAC_MAX:g}; " + EXPANSION_ADVICE)
    if not placed:
        return _not_measured(f, [], gap_text)
    fracs = [p["frac"] for p in placed.values()]
    never = sum(1 for x in fracs if x == math.inf)
    st = Stat.of(fracs)
    f.numbers = {"catch_up_frac": st.as_dict(), "seeds_never": never, "seeds_unplaced": len(gaps)}
    f.measured = f"catch-up at t/T {st}"
    if never:
        reach = max(p["bracket"][0] for p in placed.values() if p["frac"] == math.inf)
        f.measured += f"; {never} seed(s) do not catch up before the end (grid to t/T {reach:.3g})"
    f.detail = gap_text
    return _combine(f, [Part.of("catch-up time", check(fracs, T.F6_FRAC_MAX, "<="))])


def f7(ev: Evidence) -> Finding:
    """F7, the nonlinear advantage vanishes early.

    Advantage at an expansion checkpoint = linearised_test_error − the mean final test error of the low-lr children
    spawned there (``Evidence.advantage``). Per seed: the first time t/T with advantage ≤ F7_ADVANTAGE_MAX (+inf
    when never). Holds when the check of those times (≤ F7_FRAC_MAX) passes.
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
    return _combine(f, [Part.of("vanishing time", check([_never_inf(x) for x in fracs], T.F7_FRAC_MAX, "<="))])


def f8(ev: Evidence) -> Finding:
    """F8, children agree more when spawned later.

    Per seed: child_disagreement at the latest spawn over at the earliest (≥ 2 spawn times, earliest > 0). Holds
    when the ratio check (≤ F8_RATIO_MAX) passes; ``detail`` warns when the earliest spawn is not at epoch 0.
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
    return _combine(f, [Part.of("ratio", check(ratios, T.F8_RATIO_MAX, "<="))])


def f9(ev: Evidence) -> Finding:
    """F9, the final Hessian has about C outliers (C = classes of the data set, NUM_CLASSES).

    Per seed: hessian_outliers at the latest checkpoint that has it. Holds when the checks ≥ C − F9_BELOW and
    ≤ C + F9_ABOVE both pass.
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
    return _combine(f, [Part.all_of("outlier count", [check(vals, C - T.F9_BELOW, ">="),
                                                      check(vals, C + T.F9_ABOVE, "<=")])])


def _lr_phases(lr: dict) -> list[tuple[float, float, float]]:
    """Constant-learning-rate phases of one run from its checkpoints' lr series (sorted by time): (start t/T,
    end t/T, lr). A phase starts at the first checkpoint with its lr and ends at the next phase's start (the
    last one at the run's last checkpoint)."""
    frac, value = lr["frac"], lr["value"]
    starts = [0] + [i for i in range(1, len(value)) if not np.isclose(value[i], value[i - 1], rtol=1e-9, atol=0)]
    ends = [float(frac[i]) for i in starts[1:]] + [float(frac[-1])]
    return [(float(frac[i]), e, float(value[i])) for i, e in zip(starts, ends)]


def _edge_of_stability(ev: Evidence, run: dict, metric: str) -> dict | None:
    """One run: ``metric`` (λ_max or batch sharpness) + weight decay over the threshold 2(1 + β)/η of the lr in
    force at each checkpoint, summarised per constant-lr phase as the median over its settled window (the part at
    or after start + F10_SETTLED_FRAC × length, ≥ MIN_TIMES checkpoints). ``ratio``: the longest measured phase's
    median; ``reach``: the first t/T with ratio ≥ F10_EDGE_LOW (NaN when never)."""
    s, lr = ev.by_run(metric, [run["id"]]).get(run["id"]), ev.by_run("lr", [run["id"]]).get(run["id"])
    if s is None or lr is None or len(s["value"]) == 0:
        return None
    beta, wd = float(run["momentum"]), float(run.get("weight_decay") or 0.0)
    lr_at = dict(zip(lr["checkpoint_id"], lr["value"]))
    eta = np.array([lr_at.get(c, math.nan) for c in s["checkpoint_id"]], dtype=float)
    ok = np.isfinite(eta) & (eta > 0) & np.isfinite(s["value"])
    frac, eta = s["frac"][ok], eta[ok]
    ratio = (s["value"][ok] + wd) * eta / (2 * (1 + beta))
    phases = []
    for k, (start, end, phase_lr) in enumerate(p := _lr_phases(lr)):
        inside = (frac >= start - 1e-12) & ((frac < end - 1e-12) if k < len(p) - 1 else (frac <= end + 1e-12))
        window = inside & (frac >= start + T.F10_SETTLED_FRAC * (end - start) - 1e-12)
        n = int(window.sum())
        phases.append({"start": start, "end": end, "lr": phase_lr, "n": n,
                       "ratio": float(np.median(ratio[window])) if n >= T.MIN_TIMES else math.nan})
    measured = [ph for ph in phases if np.isfinite(ph["ratio"])]
    if not measured:
        return None
    deciding = max(measured, key=lambda ph: ph["end"] - ph["start"])
    reach = _first_frac(frac, ratio >= T.F10_EDGE_LOW)
    return {"ratio": deciding["ratio"], "phase": deciding, "phases": phases, "reach": reach, "momentum": beta}


def _rise_fall(ev: Evidence) -> dict[str, tuple[float, float, bool]]:
    """Per base parent with ≥ MIN_TIMES Hessians: λ_max's rise (peak − first) and fall (peak − last) as fractions
    of the peak, and whether it rises then falls (peak strictly inside, both ≥ F10_CHANGE_MIN)."""
    out = {}
    for rid, s in ev.base_series("hessian_top_eigenvalue").items():
        v = s["value"]
        if len(v) < T.MIN_TIMES or v.max() <= 0:
            continue
        k = int(np.argmax(v))
        rise, fall = (v[k] - v[0]) / v[k], (v[k] - v[-1]) / v[k]
        out[rid] = (rise, fall, bool(0 < k < len(v) - 1 and rise >= T.F10_CHANGE_MIN and fall >= T.F10_CHANGE_MIN))
    return out


#: F10's regimes: (part name, the curvature compared, its label).
F10_REGIMES = {"full": ("edge of stability, full batch", "hessian_top_eigenvalue", "λ_max"),
               "mini": ("edge of stability, mini-batch", "batch_sharpness", "batch sharpness")}


def f10(ev: Evidence) -> Finding:
    """F10, edge of stability: the curvature rises to the optimiser's stability threshold and hovers there.

    Threshold at a checkpoint: 2(1 + β)/η with η the learning rate in force there (the checkpoint's lr, so it is
    recomputed after every drop) and β the run's heavy-ball momentum (2/η for β = 0). lsdb trains with torch's
    SGD, heavy ball without Nesterov; a run recorded from another optimiser (``lsdb.Recorder``) is judged as if
    it were heavy ball. Runs: the standard parents (the base variant's model, no adversarial training), grouped by
    variant and regime. The curvature: hessian_top_eigenvalue (λ_max on the probe's fixed batch) for full-batch
    runs (steps_per_epoch = 1, i.e. batch size ≥ training set); batch_sharpness for mini-batch runs; the run's
    weight decay is added to either. Per run (``_edge_of_stability``): the median of (curvature + wd) / threshold
    over the settled window (second half, F10_SETTLED_FRAC) of its longest constant-lr phase with ≥ MIN_TIMES
    checkpoints there. One part per group ("edge of stability, full batch (VARIANT)", "…, mini-batch (VARIANT)"):
    holds when the checks ≥ F10_EDGE_LOW and ≤ F10_EDGE_HIGH both pass over its runs. A base group whose curvature
    is missing or lacks such a window is an unmeasured part; another variant's group without a window (a sparse
    schedule) is only noted in ``detail``.
    Reported, not deciding: every phase's ratio, the first t/T at F10_EDGE_LOW, for mini-batch runs λ_max of the
    fixed batch against the threshold and the ratio to 2(1 − β)/η (the lower plateau reported with momentum and
    small batches), and whether λ_max of the base parents rises then falls (``_rise_fall``).
    """
    import polars as pl

    f = Finding("F10", "Edge of stability: the curvature hovers at the optimiser's threshold",
                "hessian_top_eigenvalue (full batch), batch_sharpness (mini-batch) vs 2(1+β)/η",
                f"(curvature + weight decay) / (2(1+β)/η) within [{T.F10_EDGE_LOW:g}, {T.F10_EDGE_HIGH:g}] (median "
                f"over the second half of the longest constant-lr phase): λ_max for full-batch runs, batch sharpness "
                f"for mini-batch runs; λ_max rise-then-fall reported")
    if miss := ev.missing(["hessian_top_eigenvalue"]):
        return _not_measured(f, miss)
    if "steps_per_epoch" not in ev.runs.columns or "momentum" not in ev.runs.columns:
        return _not_measured(f, [], "the run table lacks steps_per_epoch or momentum: cannot tell full-batch runs "
                                    "or compute the threshold 2(1+β)/η")
    base = ev.parents()
    std = ev.runs.filter(pl.col("kind") == "parent")
    if "adversarial" in std.columns:
        std = std.filter(pl.col("adversarial") == "none")
    if "model" in std.columns and base.height:
        std = std.filter(pl.col("model") == base["model"][0])
    groups: dict[tuple[str, str], object] = {}
    for variant in ["base"] + sorted(set(std["variant"].to_list()) - {"base"}):
        runs = std.filter(pl.col("variant") == variant)
        for regime, sel in (("full", runs.filter(pl.col("steps_per_epoch") == 1)),
                            ("mini", runs.filter(pl.col("steps_per_epoch") != 1))):
            if sel.height:
                groups[(variant, regime)] = sel
    parts, texts, notes = [], [], []
    for (variant, regime), runs in groups.items():
        name, metric, label = F10_REGIMES[regime]
        name = f"{name} ({variant})"
        if not ev.has(metric):
            parts.append(Part(name, None, "", f"{advice(metric)} (probe version ≥ 3, sharpness_batches > 0)"))
            continue
        per = {r["id"]: got for r in runs.iter_rows(named=True) if (got := _edge_of_stability(ev, r, metric))}
        if not per:
            why = (f"{label} lacks ≥ {T.MIN_TIMES} checkpoints in the second half of a constant-lr phase; add "
                   "checkpoints ([checkpoints] every_epochs)")
            if variant == "base":
                parts.append(Part(name, None, "", why))
            else:  # variants on a sparse schedule (the full study's) were not made for F10
                notes.append(f"{variant}: {why}")
            continue
        values = [p["ratio"] for p in per.values()]
        st, reach = Stat.of(values), Stat.of(p["reach"] for p in per.values())
        never = sum(1 for p in per.values() if math.isnan(p["reach"]))
        key = "" if variant == "base" else f"_{variant}"
        f.numbers[f"{regime}_batch_ratio{key}"] = st.as_dict()
        text = (f"{'full batch' if regime == 'full' else 'mini-batch'} ({variant}): {label}/threshold {st} at lr "
                f"{_g(next(iter(per.values()))['phase']['lr'])}; reaches {T.F10_EDGE_LOW:g}× at t/T {reach}"
                + (f" ({never} run(s) never)" if never else ""))
        others = {}
        for p in per.values():
            for ph in p["phases"]:
                if ph is not p["phase"] and np.isfinite(ph["ratio"]):
                    others.setdefault(ph["lr"], []).append(ph["ratio"])
        if others:
            text += "; other lr phases: " + ", ".join(f"lr {_g(lr)} {Stat.of(v)}" for lr, v in others.items())
        if regime == "mini":
            if max(p["momentum"] for p in per.values()) > 0:
                low = Stat.of(p["ratio"] * (1 + p["momentum"]) / (1 - p["momentum"]) for p in per.values())
                f.numbers[f"mini_batch_ratio_to_2_1_minus_beta{key}"] = low.as_dict()
                text += f"; against 2(1−β)/η {low}"
            lam = {r["id"]: got for r in runs.iter_rows(named=True)
                   if (got := _edge_of_stability(ev, r, "hessian_top_eigenvalue"))}
            if lam:
                lst = Stat.of(p["ratio"] for p in lam.values())
                f.numbers[f"mini_batch_lambda_max_ratio{key}"] = lst.as_dict()
                text += f"; λ_max of the probe batch/threshold {lst}"
        texts.append(text)
        parts.append(Part.all_of(name, [check(values, T.F10_EDGE_LOW, ">="), check(values, T.F10_EDGE_HIGH, "<=")]))
    if not any(regime == "full" for _, regime in groups):
        notes.append("no full-batch run (batch size ≥ training set) in this store; examples/edge-of-stability.toml "
                     "has one")
    rf = _rise_fall(ev)
    if rf:
        rises, falls = Stat.of(v[0] for v in rf.values()), Stat.of(v[1] for v in rf.values())
        n_rf = sum(v[2] for v in rf.values())
        f.numbers.update(rise=rises.as_dict(), fall=falls.as_dict(), seeds_rise_then_fall=n_rf)
        texts.append(f"λ_max rises then falls in {n_rf}/{len(rf)} base seeds (rise {rises}, fall {falls} of the peak)")
    f.measured = "; ".join(texts)
    f.detail = _join(*notes)
    if not any(p.ok is not None for p in parts):
        return _not_measured(f, [], "; ".join(f"{p.name}: {p.advice}" for p in parts) or
                             "no parent runs to judge")
    return _combine(f, parts)


def f11(ev: Evidence) -> Finding:
    """F11, adversarial training is not flatter.

    sharpness_1d at each run's latest checkpoint that has it, averaged per seed, for adversarially trained parents
    and standard base parents. One part per adversarial variant (FGSM and PGD runs are compared separately):
    σ(adv)/σ(std) per matching seed, else the ratio of means (``_ratio``); it holds when the ratio check (≥
    F11_RATIO_MIN) passes. Precondition per part: the variant's mean clean test error is within F11_MATCH_ERROR of
    the standard runs' (matched accuracy); otherwise that part is inconclusive and says the gap.
    """
    import polars as pl

    f = Finding("F11", "Adversarial training is not flatter", "sharpness_1d at the final checkpoint",
                f"σ_1D(adversarial) ≥ {T.F11_RATIO_MIN:g} · σ_1D(standard) at matched clean accuracy "
                f"(clean test errors within {T.F11_MATCH_ERROR:g}), per adversarial variant")
    adv = ev.runs.filter((pl.col("kind") == "parent") & (pl.col("adversarial") != "none"))
    if adv.height == 0:
        return _not_measured(f, [], "no adversarially trained runs in this store: add a variant, e.g. "
                                    "[variants.adversarial.train] adversarial = \"pgd\"")
    if miss := ev.missing(["sharpness_1d"]):
        return _not_measured(f, miss)
    std = ev.parents().filter(pl.col("adversarial") == "none")
    s = _variant_final(ev, "sharpness_1d", std)
    e_std = _clean_error(ev, std)
    parts, texts = [], []
    for variant in sorted(set(adv["variant"].to_list())):
        runs = adv.filter(pl.col("variant") == variant)
        a = _variant_final(ev, "sharpness_1d", runs)
        if not a or not s:
            continue
        r, how = _ratio(a, s)
        e_adv = _clean_error(ev, runs)
        gap = abs(e_adv - e_std)
        kind = runs["adversarial"][0]
        f.numbers[variant] = {"ratio": r.as_dict(), "clean_error": e_adv, "clean_error_gap": gap}
        texts.append(f"{variant} ({kind}): σ(adv)/σ(std) {r} ({how}), clean test error {e_adv:.3g} (gap {gap:.3g})")
        why = "" if gap <= T.F11_MATCH_ERROR else (
            f"{variant}: the clean test errors differ by {gap:.3g} > {T.F11_MATCH_ERROR:g}: not at matched accuracy "
            f"(tune [variants.{variant}.train] adv_epsilon / adv_mix, or train longer)")
        parts.append(Part.all_of(variant, [check(r.values, T.F11_RATIO_MIN, ">=")], why=why))
    if not parts:
        return _not_measured(f, [], "sharpness_1d lacks the adversarial or the standard runs")
    f.numbers["standard_clean_error"] = e_std
    f.measured = f"standard clean test error {e_std:.3g}; " + "; ".join(texts)
    return _combine(f, parts)


#: Every sharpness measure F12 reports, the deciding one (F12_DECIDING_METRIC) first.
F12_MEASURES = {"adversarial_sharpness": "worst-case sharpness", "sharpness_1d": "σ_1D", "curvature_1d": "κ_1D",
                "hessian_top_eigenvalue": "Hessian λ₁", "hessian_trace": "Hessian trace"}


def _loss_factor(a: float | None, b: float | None) -> float:
    if a is None or b is None or not (np.isfinite(a) and np.isfinite(b)):
        return math.nan
    if a <= 0 or b <= 0:
        return 1.0 if a == b else math.inf
    return max(a / b, b / a)


def _at_matched_loss(ev: Evidence, metric: str, large_id: str, small_id: str, loss: dict) -> dict | None:
    """One seed: the large-batch run's latest value of ``metric`` against the small-batch run's value at the
    checkpoint (among those with ``metric``) nearest it in train loss."""
    big, small = ev.by_run(metric, [large_id]).get(large_id), ev.by_run(metric, [small_id]).get(small_id)
    if big is None or small is None or len(big["value"]) == 0 or len(small["value"]) == 0:
        return None
    l_big = loss.get(big["checkpoint_id"][-1])
    factors = [_loss_factor(l_big, loss.get(c)) for c in small["checkpoint_id"]]
    i = int(np.nanargmin(factors)) if np.isfinite(factors).any() else len(factors) - 1
    v_small = float(small["value"][i])
    return {"ratio": float(big["value"][-1]) / v_small if v_small > 0 else math.nan, "factor": factors[i],
            "matched": bool(factors[i] <= T.F12_LOSS_MATCH_FACTOR), "loss_large": l_big,
            "loss_small": loss.get(small["checkpoint_id"][i]), "small_frac": float(small["frac"][i])}


def f12(ev: Evidence) -> Finding:
    """F12, large-batch minima are sharper, compared at matched train loss, under filter normalisation.

    Small batch: the smallest batch_size among standard base parents; large batch: standard parents of any variant
    with the same model and a larger batch_size, paired by seed. For every measure of F12_MEASURES, per seed
    (``_at_matched_loss``): the large-batch run's value at its latest checkpoint with the measure over the
    small-batch run's value at the checkpoint (among those with the measure) whose train loss is nearest; the
    losses are matched when within a factor F12_LOSS_MATCH_FACTOR. F12_DECIDING_METRIC decides: holds when its
    ratio check over the matched seeds (≥ F12_RATIO_MIN) passes; with no matched seed the unmatched ratios are
    shown and the finding is inconclusive (precondition). The other measures are reported side by side.
    """
    import polars as pl

    deciding = T.F12_DECIDING_METRIC
    f = Finding("F12", "Large-batch minima are sharper", f"{deciding} (decides), " +
                ", ".join(m for m in F12_MEASURES if m != deciding) + " at matched train loss",
                f"{F12_MEASURES[deciding]}(large batch) ≥ {T.F12_RATIO_MIN:g} · {F12_MEASURES[deciding]}(small "
                f"batch), filter-normalised, at train losses within a factor {T.F12_LOSS_MATCH_FACTOR:g}")
    base = ev.parents().filter(pl.col("adversarial") == "none")
    if base.height == 0:
        return _not_measured(f, [], "no standard base runs")
    small_bs = int(base["batch_size"].min())
    large = ev.runs.filter((pl.col("kind") == "parent") & (pl.col("batch_size") > small_bs)
                           & (pl.col("adversarial") == "none") & (pl.col("model") == base["model"][0]))
    if large.height == 0:
        return _not_measured(f, [], "no large-batch runs in this store: add a variant, e.g. "
                                    "[variants.large_batch.optim] batch_size = 512")
    if miss := ev.missing([deciding]):
        return _not_measured(f, miss)
    small_of = {r["seed"]: r["id"] for r in base.filter(pl.col("batch_size") == small_bs).iter_rows(named=True)}
    loss = ev.at_checkpoints("train_loss")
    per: dict[str, dict[int, list[dict]]] = {m: {} for m in F12_MEASURES}
    for r in large.iter_rows(named=True):
        if r["seed"] not in small_of:
            continue
        for m in F12_MEASURES:
            if ev.has(m) and (got := _at_matched_loss(ev, m, r["id"], small_of[r["seed"]], loss)) is not None:
                per[m].setdefault(r["seed"], []).append(got)
    if not per[deciding]:
        return _not_measured(f, [], f"{deciding} lacks the large-batch or the small-batch runs of one seed")

    def summary(m: str) -> tuple[list[float], list[float], str]:
        rows = [g for gs in per[m].values() for g in gs]
        matched = [g["ratio"] for g in rows if g["matched"]]
        unmatched = [g["ratio"] for g in rows if not g["matched"]]
        text = (f"{Stat.of(matched)} at matched loss" if matched else "") + (
            f"{'; ' if matched else ''}{Stat.of(unmatched)} at unmatched loss" if unmatched else "")
        return matched, unmatched, text

    big = [g for gs in per[deciding].values() for g in gs]
    matched, unmatched, text = summary(deciding)
    f.numbers = {"ratio": Stat.of(matched or unmatched).as_dict(), "matched_seeds": len(matched),
                 "batch_sizes": [small_bs, int(large["batch_size"].max())], "deciding_metric": deciding}
    bs = f"batch {int(large['batch_size'].max())} / batch {small_bs}"
    others = []
    for m, label in F12_MEASURES.items():
        if m != deciding and per[m]:
            _, _, t = summary(m)
            others.append(f"{label} {t}")
            f.numbers[f"ratio_{m}"] = Stat.of(g["ratio"] for gs in per[m].values() for g in gs).as_dict()
    f.measured = (f"{bs}: {F12_MEASURES[deciding]} (decides) {text}" + (f"; also {', '.join(others)}" if others else "")
                  + f"; train loss large {Stat.of(g['loss_large'] for g in big)}, small at the compared checkpoint "
                  f"{Stat.of(g['loss_small'] for g in big)}")
    errs = Stat.of(fin["test_error"] for rid in large["id"] if (fin := ev.final(rid)) is not None)
    f.detail = f"large-batch final test error {errs}"
    why = "" if matched else (
        f"not at matched train loss (large {Stat.of(g['loss_large'] for g in big)} vs small "
        f"{Stat.of(g['loss_small'] for g in big)}, factor > {T.F12_LOSS_MATCH_FACTOR:g}): measure the small-batch "
        "run where its train loss equals the large-batch one ([probes.flatness] on_checkpoints = \"spawn\" or "
        "\"all\") or train the large-batch variant until it gets there ([variants.large_batch.optim] epochs)")
    if matched and unmatched:
        f.detail = _join(f.detail, f"{len(unmatched)} seed(s) not at matched train loss left out")
    return _combine(f, [Part.all_of("ratio", [check(matched or unmatched, T.F12_RATIO_MIN, ">=")], why=why)])


def _not_at_minimum(ev: Evidence, runs) -> str:
    """Why some of ``runs`` are not (known to be) at a minimum: their train loss still falls by more than
    CONVERGED_LOSS_DROP_MAX over the last CONVERGED_WINDOW_FRAC of training, or it cannot be told."""
    falling: dict[str, list[tuple]] = {}
    unknown = []
    for r in runs.iter_rows(named=True):
        got = ev.loss_drop(r["id"])
        if got is None:
            unknown.append(r["id"])
        elif got[0] > T.CONVERGED_LOSS_DROP_MAX:
            falling.setdefault(r["variant"], []).append(got)
    falling = [f"{v} ({len(g)} run{'s' if len(g) != 1 else ''}): −{np.mean([x[0] for x in g]):.0%} from t/T "
               f"{min(x[1] for x in g):.2g}, final train loss {np.mean([x[2] for x in g]):.3g}"
               for v, g in falling.items()]
    texts = []
    if falling:
        texts.append(f"not at a minimum: train loss still falls by more than {T.CONVERGED_LOSS_DROP_MAX:.0%} over "
                     f"the last {T.CONVERGED_WINDOW_FRAC:.0%} of training ({'; '.join(falling)}); train them to "
                     "convergence (longer [variants.<name>.optim] epochs)")
    if unknown:
        texts.append(f"cannot tell whether {len(unknown)} run(s) are at a minimum: no checkpoint at or before t/T "
                     f"{1 - T.CONVERGED_WINDOW_FRAC:g} besides the final one with a train loss (add one, e.g. "
                     "[variants.<name>.checkpoints] epochs)")
    return "; ".join(texts)


#: The patch-network families of F13, each judged on its own: (model name, label, prefix of its part names).
F13_FAMILIES = (("patchnet", "classical", "classical "), ("qpatchnet", "quantum", "quantum "))


def f13(ev: Evidence) -> Finding:
    """F13, more patches give a smaller top Hessian eigenvalue at the minimum; more parameters per patch a larger
    one.

    Two families of patch networks, each judged on its own (``_f13_family``): the classical ones (model
    "patchnet", parts "patches" and "parameters per patch") and the quantum ones (model "qpatchnet", Kawase et
    al.'s distributed quantum neural network, parts "quantum patches" and "quantum parameters per patch").
    A family is the parents of any variant with its model; it is judged with at least two patch counts, its
    parts are not measured (with advice) at one, and a family without runs has no parts. The verdict combines
    every part (``_combine``); ``measured`` gives each family's numbers after its label.
    """
    import polars as pl

    f = Finding("F13", "More patches, smaller top Hessian eigenvalue", "hessian_top_eigenvalue at the final "
                "checkpoint of patch networks (classical patchnet, quantum qpatchnet; each family on its own)",
                f"λ(most patches)/λ(fewest) ≤ {T.F13_RATIO_MAX:g} at the minimum; "
                "more parameters per patch → larger λ and lower final loss")
    parents = ev.runs.filter(pl.col("kind") == "parent")
    families = [(model, label, prefix, parents.filter(pl.col("model") == model))
                for model, label, prefix in F13_FAMILIES]
    families = [fam for fam in families if fam[3].height]
    if not any(fam[3]["patches"].n_unique() >= 2 for fam in families):
        return _not_measured(f, [], "needs patch-network runs with at least two patch counts: add variants, "
                                    "e.g. [variants.patch1.model] name = \"patchnet\" (or \"qpatchnet\" for the "
                                    "quantum family), patches = 1 (and 4, 9)")
    if miss := ev.missing(["hessian_top_eigenvalue"]):
        return _not_measured(f, miss)
    parts, texts = [], []
    for model, label, prefix, runs in families:
        got, text, numbers = _f13_family(ev, runs, prefix)
        parts += got
        f.numbers.update(numbers)
        if text:
            texts.append(f"{label} ({model}): {text}")
    if not texts:
        return _not_measured(f, [], "; ".join(f"{p.name}: {p.advice}" for p in parts))
    f.measured = " | ".join(texts)
    return _combine(f, parts)


def _f13_family(ev: Evidence, patch, prefix: str) -> tuple[list[Part], str, dict]:
    """F13's two parts for one family's parent runs ``patch``, named with ``prefix``: (parts, measured text,
    numbers, keys prefixed likewise: "ratio", "patches" for the classical family, "quantum_ratio", ...).

    Part "patches": hessian_top_eigenvalue at the latest checkpoint that has it, per seed the mean over the
    runs at a patch count, λ(most patches)/λ(fewest) per matching seed, else the ratio of means; holds when its
    check (≤ F13_RATIO_MAX) passes. Part "parameters per patch", where runs at one patch count differ in
    num_params (model width, or depth: layers of a quantum circuit): per patch count, Spearman of num_params
    with the final eigenvalue and with the final train loss over its runs (the sign of Pearson's r under 3
    runs); holds when the mean over patch counts is > 0 for the eigenvalue and < 0 for the loss. Precondition
    for both ("at the minimum"): every network compared is converged (``_not_at_minimum``: train loss falling
    by ≤ CONVERGED_LOSS_DROP_MAX over the last CONVERGED_WINDOW_FRAC).
    """
    import polars as pl

    # numbers keep the names F13 had before the quantum family ("ratio", ...); parts say their family
    name, key = (lambda p: prefix + p), "" if prefix == "classical " else prefix.strip().replace(" ", "_") + "_"
    counts = sorted(set(patch["patches"].to_list()))
    sweep = "add variants that differ in model.width (or, for qpatchnet, model.depth) at one patch count"
    if len(counts) < 2:
        return [Part(name("patches"), None, "", f"runs at one patch count ({counts[0]}) only: add variants with "
                                                  "other patch counts, e.g. patches = 1, 4, 9")], "", {}
    lam = {n: _variant_final(ev, "hessian_top_eigenvalue", patch.filter(pl.col("patches") == n)) for n in counts}
    lo, hi = counts[0], counts[-1]
    if not lam[lo] or not lam[hi]:
        return [Part(name("patches"), None, "", "hessian_top_eigenvalue lacks these patch networks' final "
                                                  "checkpoints")], "", {}
    r, how = _ratio(lam[hi], lam[lo])
    numbers = {f"{key}ratio": r.as_dict(), f"{key}patches": counts}
    ends = []
    for n in counts:
        fins = [fin for rid in patch.filter(pl.col("patches") == n)["id"] if (fin := ev.final(rid)) is not None]
        ends.append(f"{n}: {Stat.of(x['train_loss'] for x in fins).mean:.3g} / "
                    f"{Stat.of(x['test_error'] for x in fins).mean:.3g}")
    measured = f"λ({hi})/λ({lo}) {r} ({how}); final train loss / test error by patches {', '.join(ends)}"
    # part 2: a size sweep at a fixed patch count
    rho_l, rho_loss, swept = [], [], []
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
            swept.append(n)
            rho_l.append(spearman(params, lam_n) if len(params) >= 3 else np.sign(np.corrcoef(params, lam_n)[0, 1]))
            rho_loss.append(spearman(params, loss_n) if len(params) >= 3 else
                            np.sign(np.corrcoef(params, loss_n)[0, 1]))
    part2 = None
    if rho_l:
        part2 = Stat.of(rho_l).mean > 0 and Stat.of(rho_loss).mean < 0
        measured += f"; params vs λ: Spearman {Stat.of(rho_l)}, vs final loss {Stat.of(rho_loss)}"
    why = _not_at_minimum(ev, patch.filter(pl.col("patches").is_in(sorted({lo, hi, *swept}))))
    return [Part.all_of(name("patches"), [check(r.values, T.F13_RATIO_MAX, "<=")], why=why),
            Part(name("parameters per patch"), part2, why if part2 is not None else "", sweep)], measured, numbers


def f14(ev: Evidence) -> Finding:
    """F14, merging: late children average well; weight matching halves the barrier across inits.

    Part "averaging late children": loss_barrier_test at each seed's latest spawn, check ≤ F14_AVERAGE_LOSS_MAX.
    Part "weight matching across inits" (the ``merge`` probe: MERGE_NAIVE, MERGE_MATCHED, per anchor run, latest
    values): the naive barrier's check ≥ F14_NAIVE_BARRIER_MIN and the check of matched/naive ≤
    F14_MATCHED_RATIO_MAX. Precondition for each part: its path has ≥ PATH_POINTS_MIN α points.
    """
    f = Finding("F14", "Merging: late children average well; matching halves cross-init barriers",
                f"loss_barrier_test at the latest spawn; {MERGE_NAIVE}, {MERGE_MATCHED}",
                f"averaging late-spawned children does not raise test loss (loss barrier ≤ "
                f"{T.F14_AVERAGE_LOSS_MAX:g}); different inits: naive barrier ≥ {T.F14_NAIVE_BARRIER_MIN:g}, "
                f"weight matching ≤ {T.F14_MATCHED_RATIO_MAX:g} × naive")
    part_a = Part("averaging late children", None, "", advice("loss_barrier_test"))
    part_b = Part("weight matching across inits", None, "", advice(MERGE_NAIVE))
    texts = []
    if ev.has("loss_barrier_test"):
        values = [s["value"][-1] for s in ev.base_series("loss_barrier_test").values()]
        late = Stat.of(values)
        if late.n:
            part_a = Part.all_of(part_a.name, [check(values, T.F14_AVERAGE_LOSS_MAX, "<=")],
                                 why=_points_why(ev, "barrier"))
            texts.append(f"late-spawn loss barrier {late}")
            f.numbers["late_loss_barrier"] = late.as_dict()
    if ev.has(MERGE_NAIVE) and ev.has(MERGE_MATCHED):
        naive_s, matched_s = ev.base_series(MERGE_NAIVE), ev.base_series(MERGE_MATCHED)
        both = sorted(set(naive_s) & set(matched_s))
        naive = [float(naive_s[r]["value"][-1]) for r in both]
        matched = [float(matched_s[r]["value"][-1]) for r in both]
        ratio = [m / n for m, n in zip(matched, naive) if n > 0]
        if both:
            part_b = Part.all_of(part_b.name, [check(naive, T.F14_NAIVE_BARRIER_MIN, ">="),
                                               check(ratio, T.F14_MATCHED_RATIO_MAX, "<=")],
                                 why=_points_why(ev, "merge"))
            texts.append(f"cross-init barrier naive {Stat.of(naive)}, matched {Stat.of(matched)}, matched/naive "
                         f"{Stat.of(ratio)} (per anchor run)")
            f.numbers.update(naive_barrier=Stat.of(naive).as_dict(), matched_barrier=Stat.of(matched).as_dict(),
                             matched_over_naive=Stat.of(ratio).as_dict())
    if part_a.ok is None and part_b.ok is None:
        return _not_measured(f, ev.missing(["loss_barrier_test"]) or ["loss_barrier_test"])
    f.measured = "; ".join(texts)
    return _combine(f, [part_a, part_b])


def f15(ev: Evidence) -> Finding:
    """F15, the gradient lies mostly in the top-C Hessian eigenspace after the first few percent of training
    (Gur-Ari, Roberts & Dyer 2018; C = classes of the data set, NUM_CLASSES).

    Per base parent: the median of top_subspace_grad_fraction (‖P_top-C g‖/‖g‖ on the hessian probe's fixed
    batch) over its checkpoints at t/T ≥ F15_AFTER_FRAC (≥ MIN_TIMES of them). Holds when the check of those
    medians (≥ F15_FRACTION_MIN) passes. Reported beside it: the smallest value after F15_AFTER_FRAC, the median
    before it, and top_k_grad_fraction (all k Ritz vectors) likewise.
    """
    C = NUM_CLASSES.get(ev.dataset or "", None)
    f = Finding("F15", "The gradient lies in the top-C Hessian eigenspace", "top_subspace_grad_fraction after "
                f"t/T = {T.F15_AFTER_FRAC:g}", f"‖P_top-C g‖/‖g‖ ≥ {T.F15_FRACTION_MIN:g} (median over checkpoints "
                f"after the first {T.F15_AFTER_FRAC:.0%} of training; C = {C or '?'})")
    if miss := ev.missing(["top_subspace_grad_fraction"]):
        return _not_measured(f, miss, f"no top_subspace_grad_fraction in this store: {advice(miss[0])} (probe "
                                      "version ≥ 3, top_k ≥ C)")

    def per_seed(metric: str) -> dict[str, tuple[float, float, float]]:
        out = {}
        for rid, s in ev.base_series(metric).items():
            late = s["frac"] >= T.F15_AFTER_FRAC - 1e-12
            if late.sum() >= T.MIN_TIMES:
                early = s["value"][~late]
                out[rid] = (float(np.median(s["value"][late])), float(s["value"][late].min()),
                            float(np.median(early)) if len(early) else math.nan)
        return out

    per = per_seed("top_subspace_grad_fraction")
    if not per:
        return _not_measured(f, [], f"fewer than {T.MIN_TIMES} checkpoints with the fraction after t/T = "
                                    f"{T.F15_AFTER_FRAC:g}; add checkpoints or [probes.hessian] on more of them")
    med, low, early = (Stat.of(v[i] for v in per.values()) for i in range(3))
    f.numbers = {"fraction": med.as_dict(), "min_after": low.as_dict(), "before": early.as_dict(), "classes": C}
    f.measured = f"top-C fraction {med} (lowest after t/T {T.F15_AFTER_FRAC:g}: {low}; before: {early})"
    if ev.has("top_k_grad_fraction") and (allk := per_seed("top_k_grad_fraction")):
        st = Stat.of(v[0] for v in allk.values())
        f.numbers["top_k_fraction"] = st.as_dict()
        f.measured += f"; all k Ritz vectors {st}"
    return _combine(f, [Part.of("fraction", check([v[0] for v in per.values()], T.F15_FRACTION_MIN, ">="))])


FINDINGS: dict[str, Callable[[Evidence], Finding]] = {
    "F1": f1, "F2": f2, "F3": f3, "F4": f4, "F5": f5, "F6": f6, "F7": f7,
    "F8": f8, "F9": f9, "F10": f10, "F11": f11, "F12": f12, "F13": f13, "F14": f14, "F15": f15,
}
