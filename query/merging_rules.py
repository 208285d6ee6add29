"""The model-merging findings F16–F19 (docs/findings.md; Khan et al. 2024's four aspects of what
merging reveals about loss landscapes), as rules over a store's ``Evidence``.

- F16 mode convexity: the uniform soup of late-spawned children is no worse than its members;
- F17 determinism: data order decides the end point as much as the initialisation early, and
  little once the basin is fixed;
- F18 directedness: task vectors of unrelated tasks are near-orthogonal, and their sum keeps most
  of each task;
- F19 connectivity: the barrier left after weight matching falls with width.

They follow the conventions of ``lsdb.query.rules`` (population, ``check``, verdict parts);
thresholds live in ``lsdb.query.thresholds`` (``T``).
"""

from __future__ import annotations

import numpy as np

from lsdb.query import thresholds as T
from lsdb.query.evidence import Evidence
from lsdb.query.stats import Stat, check, spearman
from lsdb.query.verdict import Finding, Part, _combine, _not_measured

SOUP_LOSS, MEMBERS_LOSS = "children_soup_test_loss", "children_members_test_loss"
CROSS_SOUP, CROSS_MATCHED_SOUP, CROSS_MEMBERS = ("cross_init_soup_test_loss", "cross_init_matched_soup_test_loss",
                                                 "cross_init_members_test_loss")
CHILD_DISAGREEMENT, INIT_DISAGREEMENT = "child_disagreement", "cross_init_disagreement"
MATCHED, NAIVE = "matched_loss_barrier_test", "cross_init_loss_barrier_test"
COSINE, ADDITION, ADDITION_ERROR, TIES_ERROR = ("task_vector_cosine", "task_addition_normalised_accuracy",
                                               "task_addition_task_error", "ties_task_error")


def _latest_excess(ev: Evidence, a: str, b: str, at: int = -1) -> dict[str, tuple[float, float]]:
    """Per base parent: (a − b, frac) at its ``at``-th spawn checkpoint measured for both."""
    sa, sb = ev.base_series(a), ev.base_series(b)
    out = {}
    for rid, s in sa.items():
        other = sb.get(rid)
        if other is None:
            continue
        vb = dict(zip(other["checkpoint_id"], other["value"]))
        keep = [i for i, c in enumerate(s["checkpoint_id"]) if c in vb]
        if keep:
            i = keep[at]
            out[rid] = (float(s["value"][i] - vb[s["checkpoint_id"][i]]), float(s["frac"][i]))
    return out


def f16(ev: Evidence) -> Finding:
    """F16, mode convexity: the uniform average of the children of the latest spawn has a test loss at most
    F16_SOUP_EXCESS_MAX above its members' mean (``soup`` probe, role "spawn_children", report half of the test
    split), per seed: check(children_soup_test_loss − children_members_test_loss at each seed's latest spawn ≤
    F16_SOUP_EXCESS_MAX). Reported beside it: the same excess at the earliest spawn, and for parents of different
    seeds the naive and weight-matched soups' excess over their members."""
    f = Finding("F16", "Mode convexity: late children average into a model as good as they are",
                f"{SOUP_LOSS} − {MEMBERS_LOSS} at the latest spawn",
                f"the uniform soup of late-spawned children is no worse than its members (test loss excess ≤ "
                f"{T.F16_SOUP_EXCESS_MAX:g})")
    if miss := ev.missing([SOUP_LOSS, MEMBERS_LOSS]):
        return _not_measured(f, miss)
    late, early = _latest_excess(ev, SOUP_LOSS, MEMBERS_LOSS), _latest_excess(ev, SOUP_LOSS, MEMBERS_LOSS, at=0)
    values = [v for v, _ in late.values()]
    texts = [f"soup − members test loss at the latest spawn {Stat.of(values)} (t/T "
             f"{Stat.of(t for _, t in late.values())}), at the earliest {Stat.of(v for v, _ in early.values())}"]
    f.numbers = {"late_excess": Stat.of(values).as_dict(), "early_excess": Stat.of(v for v, _ in early.values()).as_dict()}
    cross = _cross_init_soups(ev)
    if cross:
        texts.append(cross)
    f.measured = "; ".join(texts)
    return _combine(f, [Part.all_of("late children", [check(values, T.F16_SOUP_EXCESS_MAX, "<=")])])


def _cross_init_soups(ev: Evidence) -> str:
    if ev.missing([CROSS_SOUP, CROSS_MEMBERS]):
        return ""
    naive = [v for v, _ in _latest_excess(ev, CROSS_SOUP, CROSS_MEMBERS).values()]
    text = f"different seeds: naive soup − members {Stat.of(naive)}"
    if ev.has(CROSS_MATCHED_SOUP):
        matched = [v for v, _ in _latest_excess(ev, CROSS_MATCHED_SOUP, CROSS_MEMBERS).values()]
        text += f", weight-matched soup − members {Stat.of(matched)}"
    return text


def f17(ev: Evidence) -> Finding:
    """F17, determinism: how far apart two children of one spawn end (data order only), relative to two parents of
    different seeds (initialisation and data order): R(t) = child_disagreement(t) / D_init, D_init the mean
    cross_init_disagreement of the base parents' pairs (``barrier`` probe, roles "siblings" and "cross_init").

    Part "late": R at each seed's latest spawn ≤ F17_LATE_RATIO_MAX (once the basin is fixed, data order decides
    little). Part "early": R at each seed's earliest spawn ≥ F17_EARLY_RATIO_MIN, provided that spawn is at
    t/T ≤ F17_EARLY_FRAC_MAX (early on, data order decides about as much as the initialisation; Frankle et al.
    2020's instability at initialisation)."""
    f = Finding("F17", "Determinism: data order stops mattering once the basin is fixed",
                f"{CHILD_DISAGREEMENT} / mean {INIT_DISAGREEMENT}",
                f"children of a late spawn disagree ≤ {T.F17_LATE_RATIO_MAX:g} × as much as nets of different seeds; "
                f"children of an early spawn (t/T ≤ {T.F17_EARLY_FRAC_MAX:g}) ≥ {T.F17_EARLY_RATIO_MIN:g} ×")
    if miss := ev.missing([CHILD_DISAGREEMENT, INIT_DISAGREEMENT]):
        return _not_measured(f, miss)
    init = [float(v) for s in ev.base_series(INIT_DISAGREEMENT).values() for v in s["value"]]
    d_init = float(np.mean(init)) if init else float("nan")
    if not init or d_init <= 0:
        return _not_measured(f, [], f"no positive {INIT_DISAGREEMENT} among the base parents' pairs")
    series = ev.base_series(CHILD_DISAGREEMENT)
    late = [float(s["value"][-1]) / d_init for s in series.values() if len(s["value"])]
    early = [float(s["value"][0]) / d_init for s in series.values()
             if len(s["value"]) and s["frac"][0] <= T.F17_EARLY_FRAC_MAX + 1e-9]
    f.numbers = {"init_disagreement": d_init, "late_ratio": Stat.of(late).as_dict(), "early_ratio": Stat.of(early).as_dict()}
    f.measured = (f"different seeds disagree on {d_init:.3g} of the test set ({len(init)} pairs); children / that: "
                  f"earliest spawn {Stat.of(early)}, latest spawn {Stat.of(late)}")
    return _combine(f, [
        Part.all_of("late", [check(late, T.F17_LATE_RATIO_MAX, "<=")]),
        Part.all_of("early", [check(early, T.F17_EARLY_RATIO_MIN, ">=")],
                    advice=f"spawn children at t/T ≤ {T.F17_EARLY_FRAC_MAX:g} (e.g. [spawn] times = [0, …])"),
    ])


def f18(ev: Evidence) -> Finding:
    """F18, directedness: fine-tunes of one base move along nearly independent directions, and their sum keeps most
    of what each gained (Ilharco et al. 2023; ``task_arithmetic`` probe, anchored at the base checkpoint of each
    base parent; the latest base measured). Means over the base's tasks: E_base, E_ft (each fine-tune on its own
    task) and E_sum (w_base + Στ_i on each task, λ = 1).

    Part "near-orthogonal": |task_vector_cosine| (the mean cosine of the base's pairs of task vectors) ≤
    F18_COSINE_MAX. Part "addition keeps the gains": (E_base − E_sum) / (E_base − E_ft) ≥ F18_GAIN_KEPT_MIN, the
    share of the fine-tunes' error reduction the sum keeps (not Ilharco's normalised accuracy (1 − E_sum)/(1 − E_ft),
    reported beside it, which a base already good at every task passes without any gain); a base whose fine-tunes
    gained nothing (E_base ≤ E_ft) leaves the part unmeasured there. λ = 1 is the sum itself: no λ is chosen, as
    lsdb has no validation split to choose it on. TIES at λ = 1 is reported beside it."""
    f = Finding("F18", "Directedness: task vectors are near-orthogonal and their sum keeps each task's gain",
                f"{COSINE}; {ADDITION_ERROR} against base_task_error and finetune_task_error",
                f"|cosine| ≤ {T.F18_COSINE_MAX:g}; w_base + Στ keeps ≥ {T.F18_GAIN_KEPT_MIN:g} of the fine-tunes' "
                f"task-error reduction")
    if miss := ev.missing([COSINE, ADDITION_ERROR, "base_task_error", "finetune_task_error"]):
        return _not_measured(f, miss)

    def last(metric):
        return {rid: float(s["value"][-1]) for rid, s in ev.base_series(metric).items() if len(s["value"])}

    cos = [abs(v) for v in last(COSINE).values()]
    base, ft, added, tied = last("base_task_error"), last("finetune_task_error"), last(ADDITION_ERROR), last(TIES_ERROR)
    kept = [(base[r] - added[r]) / (base[r] - ft[r]) for r in added if r in base and r in ft and base[r] > ft[r]]
    kept_ties = [(base[r] - tied[r]) / (base[r] - ft[r]) for r in tied if r in base and r in ft and base[r] > ft[r]]
    norm = list(last(ADDITION).values())
    f.numbers = {"abs_cosine": Stat.of(cos).as_dict(), "gain_kept": Stat.of(kept).as_dict(),
                 "gain_kept_ties": Stat.of(kept_ties).as_dict(), "normalised_accuracy": Stat.of(norm).as_dict()}
    f.measured = (f"|mean cosine of the task vectors| {Stat.of(cos)}; task error base {Stat.of(base.values())}, "
                  f"fine-tunes {Stat.of(ft.values())}, sum (λ = 1) {Stat.of(added.values())}: gain kept {Stat.of(kept)} "
                  f"(TIES {Stat.of(kept_ties)}); normalised accuracy of the sum {Stat.of(norm)}")
    return _combine(f, [Part.all_of("near-orthogonal", [check(cos, T.F18_COSINE_MAX, "<=")]),
                        Part.all_of("addition keeps the gains", [check(kept, T.F18_GAIN_KEPT_MIN, ">=")])])


def f19(ev: Evidence) -> Finding:
    """F19, connectivity: the loss barrier between nets of different seeds left after weight matching falls with
    width (Entezari et al. 2022; Ainsworth et al. 2023). Parents of one model (the one with the most widths) in
    variants that differ in ``width``; per anchor seed, Spearman(width, matched_loss_barrier_test) over the widths
    it has, check ≤ FALLS_SPEARMAN_MAX; at least F19_MIN_WIDTHS widths. The naive barrier per width is reported
    beside it."""
    import polars as pl

    f = Finding("F19", "Connectivity: the barrier left after weight matching falls with width",
                f"{MATCHED} against model width", f"Spearman(width, matched barrier) ≤ {T.FALLS_SPEARMAN_MAX:g} "
                f"over ≥ {T.F19_MIN_WIDTHS} widths")
    if miss := ev.missing([MATCHED]):
        return _not_measured(f, miss)
    parents = ev.runs.filter(pl.col("kind") == "parent")
    models = {m: parents.filter(pl.col("model") == m)["width"].n_unique() for m in set(parents["model"].to_list())}
    model = max(sorted(models), key=lambda m: models[m]) if models else None
    runs = parents.filter(pl.col("model") == model) if model else parents
    widths = sorted(set(runs["width"].to_list()))
    if len(widths) < T.F19_MIN_WIDTHS:
        return _not_measured(f, [], f"needs parents at ≥ {T.F19_MIN_WIDTHS} widths of one model (found "
                                    f"{len(widths)}): add variants, e.g. [variants.w16.model] width = 16")
    per_seed: dict[int, list[tuple[int, float]]] = {}
    naive: dict[int, list[float]] = {}
    matched_by_width: dict[int, list[float]] = {}
    for r in runs.iter_rows(named=True):
        got = ev.final_value(MATCHED, r["id"])
        if got is not None:
            per_seed.setdefault(r["seed"], []).append((r["width"], got[0]))
            matched_by_width.setdefault(r["width"], []).append(got[0])
        n = ev.final_value(NAIVE, r["id"])
        if n is not None:
            naive.setdefault(r["width"], []).append(n[0])
    rhos = [spearman([w for w, _ in pts], [v for _, v in pts]) for pts in per_seed.values()
            if len({w for w, _ in pts}) >= T.F19_MIN_WIDTHS]
    f.numbers = {"spearman": Stat.of(rhos).as_dict(), "widths": widths}
    f.measured = (f"Spearman(width, matched barrier) {Stat.of(rhos)}; matched / naive barrier by width: "
                  + ", ".join(f"{w}: {Stat.of(matched_by_width.get(w, [])).mean:.3g} / {Stat.of(naive.get(w, [])).mean:.3g}"
                              for w in widths))
    return _combine(f, [Part.all_of("falls with width", [check(rhos, T.FALLS_SPEARMAN_MAX, "<=")])])


FINDINGS = {"F16": f16, "F17": f17, "F18": f18, "F19": f19}
