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
grid search minimising the residual sum of squares over every sample time (and, for series
of fewer than 30 samples, the midpoints between neighbouring samples), each segment spanning at least TRANSITION_MIN_SEGMENT samples
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

METHOD = (f"three-segment continuous least-squares fit in log(epoch + {LOG_TIME_OFFSET:g}); "
          f"interval: profile likelihood, n·log(RSS/RSS_min) ≤ {CHI2_1_95:.2f}")

COLUMNS = ["scope", "metric", "run_id", "variant", "seed", "n", "t_break", "t_low", "t_high", "t_std",
           "frac_break", "slope_early", "slope_late", "shape", "rss"]


def _candidates(x, min_segment: int):
    """Break candidates: samples and midpoints, with at least ``min_segment`` samples on each side."""
    # midpoints refine short series; long ones are dense enough and the grid grows as n²
    pts = np.concatenate([x, (x[:-1] + x[1:]) / 2]) if len(x) < 30 else x
    left = np.searchsorted(x, pts + 1e-12, side="right")        # samples on or before the break
    right = len(x) - np.searchsorted(x, pts - 1e-12, side="left")  # samples on or after it
    return np.unique(pts[(left >= min_segment) & (right >= min_segment)])


def segment_fit(x, y, breaks: int = 2, min_segment: int = TRANSITION_MIN_SEGMENT) -> dict | None:
    """Best continuous piecewise-linear fit of y on x with ``breaks`` (1 or 2) breaks, by grid search.

    Returns dict(knots, slopes, rss, profile) where ``knots`` are the chosen breaks, ``slopes``
    the slope of each segment, and ``profile`` maps each break position to (candidate x's,
    RSS minimised over the other break). None when the series is too short.
    """
    x, y = np.asarray(x, float), np.asarray(y, float)
    order = np.argsort(x, kind="stable")
    x, y = x[order], y[order]
    cands = _candidates(x, min_segment)
    if len(cands) == 0 or np.ptp(x) == 0:
        return None
    if breaks == 1:
        grid = cands[:, None]
    else:
        i, j = np.triu_indices(len(cands), k=1)
        inside = (np.searchsorted(x, cands[j] + 1e-12, side="right")
                  - np.searchsorted(x, cands[i] - 1e-12, side="left"))  # samples in [x_1, x_2]
        ok = inside >= min_segment
        grid = np.column_stack([cands[i[ok]], cands[j[ok]]])
        if len(grid) == 0:
            return None
    rss, coefs = _batched_lstsq(x, y, grid)
    best = int(np.argmin(rss))
    knots = grid[best]
    slopes = np.cumsum(coefs[best][1:])
    profile = []
    for k in range(grid.shape[1]):
        xs = np.unique(grid[:, k])
        profile.append((xs, np.array([rss[grid[:, k] == v].min() for v in xs])))
    return {"knots": knots, "slopes": slopes, "rss": float(rss[best]), "profile": profile}


def _batched_lstsq(x, y, grid):
    """RSS and coefficients of y ≈ a + b·x + Σ_k c_k·max(0, x − grid[:, k]) for every row of grid."""
    n, m = len(x), grid.shape[1]
    A = np.empty((len(grid), n, 2 + m))
    A[:, :, 0] = 1.0
    A[:, :, 1] = x
    for k in range(m):
        A[:, :, 2 + k] = np.maximum(0.0, x[None, :] - grid[:, k:k + 1])
    coef = np.linalg.lstsq(A[0], y, rcond=None)[0][None] if len(grid) == 1 else None
    if coef is None:
        AtA = np.einsum("bni,bnj->bij", A, A)
        Aty = np.einsum("bni,n->bi", A, y)
        coef = np.linalg.solve(AtA + 1e-12 * np.eye(2 + m), Aty[..., None])[..., 0]
    resid = np.einsum("bni,bi->bn", A, coef) - y
    return (resid**2).sum(axis=1), coef


def _interval(profile, n: int, floor: float) -> tuple[float, float]:
    xs, rss = profile
    keep = n * np.log(np.maximum(rss, floor) / floor) <= CHI2_1_95
    return float(xs[keep].min()), float(xs[keep].max())


def transition_of(epoch, value, offset: float = LOG_TIME_OFFSET,
                  min_segment: int = TRANSITION_MIN_SEGMENT) -> dict | None:
    """The transition of one series (see the module docstring); None when it cannot be fitted."""
    epoch, value = np.asarray(epoch, float), np.asarray(value, float)
    order = np.argsort(epoch, kind="stable")
    epoch, value = epoch[order], value[order]
    n = len(epoch)
    span = float(np.ptp(value)) if n else 0.0
    if span == 0 or n < 2 * min_segment - 1:
        return None
    u = (value - value.min()) / span
    breaks = 2 if n >= 3 * min_segment - 2 else 1
    fit = segment_fit(log_time(epoch, offset), u, breaks, min_segment)
    if fit is None:
        return None
    slopes, knots = np.abs(fit["slopes"]), fit["knots"]
    fast = int(np.argmax(slopes))
    last = fast == len(slopes) - 1
    k = fast - 1 if last else fast  # the break that ends the fast segment (or starts it, if last)
    floor = max(fit["rss"], 1e-12 * max(float(np.sum((u - u.mean()) ** 2)), 1e-300))
    lo, hi = _interval(fit["profile"][k], n, floor)
    back = lambda x: float(math.exp(x) - offset)  # noqa: E731
    return {"n": n, "t_break": back(knots[k]), "t_low": back(lo), "t_high": back(hi),
            "slope_early": float(fit["slopes"][fast]),
            "slope_late": math.nan if last else float(fit["slopes"][fast + 1]),
            "shape": "slow→fast" if last else "fast→slow", "rss": fit["rss"]}


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
