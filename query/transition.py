"""When does a metric's fast early phase give way to its slow late phase?

Fort et al. (2020) claim that many measures change quickly during a short early transient and
slowly afterwards, and that the transients of different measures coincide. ``transition`` puts a
number with an interval on that time, per metric and run, side by side.

Method: a continuous three-segment least-squares fit in log-time
-----------------------------------------------------------------
In log-time most measures trace an S: flat before anything has happened (the first steps), a
fast change, then a slow drift. For one run's series (epoch t_i, value y_i) take
x_i = log(t_i + LOG_TIME_OFFSET) and the normalised value u_i = (y_i − min y)/(max y − min y),
and fit, for breaks x_1 < x_2,

    u ≈ a + b·x + c·max(0, x − x_1) + d·max(0, x − x_2)

by least squares (three straight segments joined at the breaks). The breaks are chosen by a
grid search minimising the residual sum of squares over every sample time and the midpoints
between neighbouring samples, each segment spanning at least TRANSITION_MIN_SEGMENT samples
(samples at a break count for both sides). Series with fewer than 7 samples get the two-segment
version (one break). The fast phase is the segment with the steepest |slope|; the transition
t* = exp(x_end) − LOG_TIME_OFFSET is where it ends. If the steepest segment is the last one,
the series has no fast-then-slow shape: ``shape`` is "slow→fast" and t* is where the fast
segment starts.

Uncertainty: the profile-likelihood set {x : n·log(RSS(x)/RSS_min) ≤ χ²₁,₀.₉₅ = 3.84}, with
RSS(x) minimised over the other break; ``t_low``/``t_high`` are its extremes in epochs. The
likelihood-ratio statistic of a change point is not exactly χ²₁, so read it as approximate.

Slopes are in (fraction of the metric's range) per e-fold of time: ``slope_early`` is the fast
segment's, ``slope_late`` the next one's (NaN when the fast segment is last).
"""

from __future__ import annotations

import math

import numpy as np

from lsdb.errors import QueryError
from lsdb.query.correlate import check_metrics, load_series, log_time, resolve_runs
from lsdb.query.thresholds import CHI2_1_95, LOG_TIME_OFFSET, TRANSITION_MIN_SEGMENT

#: Series that are settings, not measurements: never fitted unless asked for by name.
SETTINGS = ("lr",)

METHOD = (f"two-segment continuous least-squares fit in log(epoch + {LOG_TIME_OFFSET:g}); "
          f"interval: profile likelihood, n·log(RSS/RSS_min) ≤ {CHI2_1_95:.2f}")

COLUMNS = ["scope", "metric", "run_id", "variant", "seed", "n", "t_break", "t_low", "t_high", "t_std",
           "frac_break", "slope_early", "slope_late", "shape", "rss"]


def hinge_fit(x, y, min_segment: int = TRANSITION_MIN_SEGMENT, refine: int = 4) -> dict | None:
    """Best continuous two-segment fit of y on x (x sorted ascending). None if too few points.

    Returns dict(x_break, x_low, x_high, slope_early, slope_late, rss, candidates, profile).
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    n = len(x)
    if n < 2 * min_segment - 1 or np.ptp(x) == 0:
        return None
    lo_k, hi_k = min_segment - 1, n - min_segment
    cands = [x[lo_k]]
    for k in range(lo_k, hi_k):
        step = (x[k + 1] - x[k]) / (refine + 1)
        cands += [x[k] + step * j for j in range(1, refine + 1)] + [x[k + 1]]
    cands = np.unique(np.array(cands))
    rss = np.array([_fit(x, y, xb)[1] for xb in cands])
    best = int(np.argmin(rss))
    floor = max(rss[best], 1e-12 * max(float(np.sum((y - y.mean()) ** 2)), 1e-300))
    inside = n * np.log(np.maximum(rss, floor) / floor) <= CHI2_1_95
    coef, _ = _fit(x, y, cands[best])
    return {"x_break": float(cands[best]), "x_low": float(cands[inside].min()),
            "x_high": float(cands[inside].max()), "slope_early": float(coef[1]),
            "slope_late": float(coef[1] + coef[2]), "rss": float(rss[best]), "candidates": cands,
            "profile": rss}


def _fit(x, y, xb):
    A = np.column_stack([np.ones_like(x), x, np.maximum(0.0, x - xb)])
    coef, *_ = np.linalg.lstsq(A, y, rcond=None)
    resid = y - A @ coef
    return coef, float(resid @ resid)


def transition_of(epoch, value, offset: float = LOG_TIME_OFFSET) -> dict | None:
    """The transition of one series (see the module docstring); None when it cannot be fitted."""
    epoch, value = np.asarray(epoch, float), np.asarray(value, float)
    order = np.argsort(epoch, kind="stable")
    epoch, value = epoch[order], value[order]
    span = np.ptp(value) if len(value) else 0.0
    if span == 0:
        return None
    fit = hinge_fit(log_time(epoch, offset), (value - value.min()) / span)
    if fit is None:
        return None
    back = lambda x: float(math.exp(x) - offset)  # noqa: E731
    return {"n": len(epoch), "t_break": back(fit["x_break"]), "t_low": back(fit["x_low"]),
            "t_high": back(fit["x_high"]), "slope_early": fit["slope_early"], "slope_late": fit["slope_late"],
            "shape": "fast→slow" if abs(fit["slope_late"]) < abs(fit["slope_early"]) else "slow→fast",
            "rss": fit["rss"]}


def transition(session, metrics: list[str] | None = None, runs: list[str] | None = None,
               summary: bool = True):
    """Transition time of each metric in each run, with a per-(variant, metric) summary.

    ``metrics``: names (None = every measured metric, settings such as ``lr`` left out).
    ``runs``: run ids or prefixes (None = every parent run). Returns a polars DataFrame with
    columns scope ('run' | 'pooled'), metric, run_id, variant, seed, n, t_break, t_low, t_high
    (epochs), t_std (pooled rows: std of t_break over runs), frac_break (t_break / the run's
    epochs), slope_early, slope_late, shape, rss. The method is ``transition.METHOD``.
    """
    import polars as pl

    if metrics:
        check_metrics(session, metrics)
    run_ids = resolve_runs(session, runs)
    if run_ids is None:
        run_ids = session.sql("SELECT id FROM run WHERE kind = 'parent' ORDER BY id")["id"].to_list()
    if not run_ids:
        raise QueryError(f"no runs in {session.store.root}; train some with: lsdb run SPEC")
    frame = load_series(session, metrics, run_ids)
    if not metrics:
        frame = frame.filter(~pl.col("metric").is_in(list(SETTINGS)))
    epochs = dict(session.sql("SELECT id, epochs FROM run").iter_rows())

    rows = []
    for (metric, run_id, variant, seed), part in frame.group_by(["metric", "run_id", "variant", "seed"]):
        fit = transition_of(part["epoch"].to_numpy(), part["value"].to_numpy())
        if fit is None:
            continue
        rows.append({"scope": "run", "metric": metric, "run_id": run_id, "variant": variant, "seed": seed,
                     **fit, "frac_break": fit["t_break"] / epochs[run_id] if epochs.get(run_id) else None})
    schema = {"scope": pl.Utf8, "metric": pl.Utf8, "run_id": pl.Utf8, "variant": pl.Utf8, "seed": pl.Int64,
              "n": pl.Int64, "t_break": pl.Float64, "t_low": pl.Float64, "t_high": pl.Float64,
              "t_std": pl.Float64, "frac_break": pl.Float64, "slope_early": pl.Float64,
              "slope_late": pl.Float64, "shape": pl.Utf8, "rss": pl.Float64}
    out = pl.DataFrame(rows, schema=schema, strict=False).sort("metric", "variant", "seed", "run_id")
    if summary and out.height:
        pooled = (out.group_by("metric", "variant")
                  .agg(pl.lit("pooled").alias("scope"), pl.lit("all").alias("run_id"),
                       pl.len().cast(pl.Int64).alias("n"), pl.col("t_break").mean().alias("t_mean"),
                       pl.col("t_break").std().alias("t_std"), pl.col("t_break").min().alias("t_low"),
                       pl.col("t_break").max().alias("t_high"), pl.col("frac_break").mean(),
                       pl.col("slope_early").mean(), pl.col("slope_late").mean(),
                       (pl.col("shape") == "fast→slow").mean().alias("fast_share"))
                  .with_columns(pl.col("t_mean").alias("t_break"), pl.lit(None, pl.Int64).alias("seed"),
                                pl.lit(None, pl.Float64).alias("rss"),
                                pl.when(pl.col("fast_share") >= 0.5).then(pl.lit("fast→slow"))
                                .otherwise(pl.lit("slow→fast")).alias("shape")))
        out = pl.concat([out, pooled.select(schema.keys()).cast(schema)]).sort("metric", "variant", "scope",
                                                                                "seed", "run_id",
                                                                                nulls_last=True)
    return out.select(COLUMNS)
