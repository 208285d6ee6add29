"""Correlate metrics across training time: per run, per seed, pooled; lagged; with intervals.

    import lsdb
    db = lsdb.open("lsdb-store")
    db.correlate(["kernel_velocity", "test_loss"])            # per run + pooled
    db.correlate(by="pooled", method="kendall")               # every pair of metrics

Method
------
1. Series. ``metric_series`` rows are averaged per (run, checkpoint, metric) (a checkpoint can
   carry several rows, e.g. several sibling pairs anchored at one spawn), then restricted to
   ``since <= epoch <= until``.
2. Alignment. Two metrics of one run are often sampled at different checkpoints. Time is
   x = log(epoch + LOG_TIME_OFFSET). The grid is the sample times of the sparser of the two
   series (fewer samples; the first metric on a tie), restricted to the time span of the other
   (no extrapolation). ``align="nearest"``: the other metric's sample nearest in x;
   ``align="interp"``: linear interpolation in x. Identical schedules pair exactly.
3. Lag. ``lag = K`` pairs a_i with b_{i+K} along the aligned grid (K in grid steps, negative K
   pairs a_{i+|K|} with b_i): positive K asks whether b follows a.
4. Per group. ``by="run"``: one correlation per run; ``by="seed"``: the aligned pairs of all runs
   with one (variant, seed) pooled into one sample (runs are aligned separately first);
   ``by="pooled"``: only the pooled summary below.
5. p-value (two-sided, of no correlation). For n <= EXACT_MAX_N (8) pairs it is exact: the
   share of all n! pairings of b with a whose |r| is at least the observed |r| (a permutation
   test, valid for every method without assuming normality; tied values stay tied). So it is
   never below 1/n!, nor below 2/n! for Spearman and Kendall without ties (1/3 at n = 3).
   Above that, scipy's asymptotic p (Pearson: t-test under normality; Spearman: t approximation;
   Kendall: scipy's default), floored at 1/n!: no pairing of n samples is rarer than that, and a
   t statistic that is infinite at |r| = 1 would otherwise print p = 0. n < 3: r and p are null.
   The pairs of a time series are not independent, so read every p as optimistic.
6. Interval. Without bootstrap, a 95% interval from Fisher's z = atanh(r) with standard error
   sqrt(c / (n - d)): Pearson c = 1, d = 3; Spearman c = 1.06, d = 3; Kendall c = 0.437, d = 4
   (Fieller, Hartley & Pearson 1957). With ``bootstrap = B``, the 2.5/97.5 percentiles of r over
   B resamples of the aligned pairs (pairs resampled independently: this ignores autocorrelation
   in time, so read such intervals as optimistic).
7. Pooled. ``r_mean ± r_std`` over groups (sample std), and a Fisher-z combination
   z = Σ w_i atanh(r_i) / Σ w_i with w_i = (n_i - d) / c, r = tanh(z), interval
   tanh(z ± 1.96 / sqrt(Σ w_i)) (or, with bootstrap, percentiles over resampled groups).
   Its p combines the groups' p-values (weighted Stouffer): Z = Σ sqrt(w_i) z_i / sqrt(Σ w_i) with
   z_i = sign(r_i) Φ⁻¹(1 - p_i / 2), p = 2 Φ(-|Z|). Were every p_i the Fisher-z one, this would be
   exactly z·sqrt(Σ w_i) ~ N(0, 1); using the groups' own p keeps a perfect r in a small group at
   the evidence its exact test gives, not an infinite z. Groups with n <= d carry no weight.
"""

from __future__ import annotations

import difflib
import functools
import itertools
import math
from typing import Literal

import numpy as np

from lsdb.errors import QueryError
from lsdb.query.thresholds import LOG_TIME_OFFSET, Z95

By = Literal["run", "seed", "pooled"]
Method = Literal["spearman", "pearson", "kendall"]
Align = Literal["nearest", "interp"]

METHODS = ("spearman", "pearson", "kendall")
BYS = ("run", "seed", "pooled")
ALIGNS = ("nearest", "interp")

# Fisher-z variance c / (n - d) of each coefficient (Fieller, Hartley & Pearson 1957).
_FISHER = {"pearson": (1.0, 3), "spearman": (1.06, 3), "kendall": (0.437, 4)}

# Up to this many pairs p is an exact permutation test over all n! pairings (8! = 40320: milliseconds).
EXACT_MAX_N = 8
MIN_N = 3  # fewer pairs: r and p are null

COLUMNS = ["scope", "group", "metric_a", "metric_b", "lag", "n", "r", "p_value", "ci_low", "ci_high",
           "r_mean", "r_std", "groups", "method", "align"]


def alignment_rule(align: str = "nearest", offset: float = LOG_TIME_OFFSET) -> str:
    """The alignment rule in words (the CLI prints it above the table)."""
    how = ("the other metric's nearest sample" if align == "nearest"
           else "the other metric linearly interpolated")
    return (f"aligned on the sparser metric's checkpoints, {how} in log(epoch + {offset:g}), "
            f"no extrapolation")


# ------------------------------------------------------------------------------ reading
def resolve_runs(session, runs: list[str] | None) -> list[str] | None:
    """Full run ids for a list of ids or id prefixes (None = every run)."""
    if not runs:
        return None
    ids = session.sql("SELECT id FROM run ORDER BY id")["id"].to_list()
    out: list[str] = []
    for token in runs:
        hits = [i for i in ids if i == token] or [i for i in ids if i.startswith(token)]
        if not hits:
            raise QueryError(f"no run '{token}' in {session.store.root}; list runs with: lsdb runs")
        out.extend(h for h in hits if h not in out)
    return out


def available_metrics(session) -> list[str]:
    return session.sql("SELECT DISTINCT metric FROM metric_series ORDER BY metric")["metric"].to_list()


def check_metrics(session, metrics: list[str]) -> None:
    """Raise QueryError naming the valid metrics when one is unknown or has no rows."""
    have = available_metrics(session)
    for m in metrics:
        if m in have:
            continue
        from lsdb.schema import metric_names

        close = difflib.get_close_matches(m, have or metric_names(), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        if m in metric_names():
            raise QueryError(f"metric '{m}' has no rows in this store: its probe has not run{hint}; "
                             f"metrics with data: {', '.join(have) or 'none'}")
        raise QueryError(f"unknown metric '{m}'{hint}; metrics in this store: {', '.join(have) or 'none'}")


def load_series(session, metrics: list[str] | None = None, runs: list[str] | None = None,
                since: float | None = None, until: float | None = None):
    """metric_series averaged per (run, checkpoint, metric), with the run's variant, kind and seed.

    Columns: run_id, variant, kind, seed, checkpoint_id, step, epoch, frac, metric, value, rows.
    Non-finite values are dropped.
    """
    where, params = ["isfinite(s.value)"], []
    if metrics:
        where.append(f"s.metric IN ({', '.join('?' * len(metrics))})")
        params += list(metrics)
    if runs:
        where.append(f"s.run_id IN ({', '.join('?' * len(runs))})")
        params += list(runs)
    if since is not None:
        where.append("s.epoch >= ?")
        params.append(float(since))
    if until is not None:
        where.append("s.epoch <= ?")
        params.append(float(until))
    return session.sql(
        "SELECT s.run_id, r.variant, r.kind, r.seed, s.checkpoint_id, any_value(s.step) AS step, "
        "any_value(s.epoch) AS epoch, any_value(s.frac) AS frac, s.metric, avg(s.value) AS value, "
        "count(*) AS rows FROM metric_series s JOIN run r ON r.id = s.run_id "
        f"WHERE {' AND '.join(where)} "
        "GROUP BY s.run_id, r.variant, r.kind, r.seed, s.checkpoint_id, s.metric "
        "ORDER BY s.run_id, s.metric, epoch", params)


# ---------------------------------------------------------------------------- alignment
def log_time(epoch, offset: float = LOG_TIME_OFFSET):
    return np.log(np.asarray(epoch, dtype=float) + offset)


def align_pair(ta, ya, tb, yb, align: str = "nearest", offset: float = LOG_TIME_OFFSET):
    """Align two series of one run on a common grid (see the module docstring, step 2).

    Returns (a, b) arrays ordered by time. Inputs need not be sorted.
    """
    ta, ya, tb, yb = (np.asarray(v, dtype=float) for v in (ta, ya, tb, yb))
    oa, ob = np.argsort(ta, kind="stable"), np.argsort(tb, kind="stable")
    ta, ya, tb, yb = ta[oa], ya[oa], tb[ob], yb[ob]
    swap = len(tb) < len(ta)
    if swap:  # the grid is the sparser series
        ta, ya, tb, yb = tb, yb, ta, ya
    xa, xb = log_time(ta, offset), log_time(tb, offset)
    if len(xa) == 0 or len(xb) == 0:
        return np.empty(0), np.empty(0)
    inside = (xa >= xb[0] - 1e-12) & (xa <= xb[-1] + 1e-12)
    xa, ya = xa[inside], ya[inside]
    if align == "nearest":
        right = np.clip(np.searchsorted(xb, xa), 0, len(xb) - 1)
        left = np.clip(right - 1, 0, len(xb) - 1)
        pick = np.where(np.abs(xb[left] - xa) <= np.abs(xb[right] - xa), left, right)
        other = yb[pick]
    elif align == "interp":
        other = np.interp(xa, xb, yb)
    else:
        raise QueryError(f"unknown alignment '{align}'; valid: {', '.join(ALIGNS)}")
    return (other, ya) if swap else (ya, other)


def apply_lag(a, b, lag: int):
    """Pairs (a_i, b_{i+lag}); negative lag pairs (a_{i+|lag|}, b_i)."""
    if lag > 0:
        return a[: max(len(a) - lag, 0)], b[lag:]
    if lag < 0:
        return a[-lag:], b[: max(len(b) + lag, 0)]
    return a, b


# --------------------------------------------------------------------------- statistics
def coefficient(x, y, method: str = "spearman") -> float:
    """r alone (no p-value: cheap); nan for n < 3 or a constant input."""
    return _coefficient(np.asarray(x, dtype=float), np.asarray(y, dtype=float), method)[0]


def corr(x, y, method: str = "spearman") -> tuple[float, float]:
    """(r, two-sided p); (nan, nan) for n < 3 or a constant input.

    p is exact (``exact_p``) for n <= EXACT_MAX_N, else scipy's asymptotic p floored at 1/n!
    (the module docstring, step 5, says why)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    r, p = _coefficient(x, y, method)
    if not np.isfinite(r):
        return r, p
    if len(x) <= EXACT_MAX_N:
        return r, exact_p(x, y, method)
    return r, float(max(p, p_floor(len(x))))


def _coefficient(x, y, method: str) -> tuple[float, float]:
    """scipy's (r, asymptotic p)."""
    from scipy import stats

    if method not in METHODS:
        raise QueryError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")
    if len(x) < MIN_N or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    res = {"spearman": stats.spearmanr, "pearson": stats.pearsonr, "kendall": stats.kendalltau}[method](x, y)
    return float(res.statistic), float(res.pvalue)


def p_floor(n: int) -> float:
    """1/n!, the chance of one given pairing of n samples (never 0, even where n! overflows)."""
    return max(math.exp(-math.lgamma(n + 1)), np.finfo(float).tiny)


def exact_p(x, y, method: str) -> float:
    """Two-sided permutation p: the share of the n! pairings of y with x whose |r| >= the observed |r|.

    Only r's numerator changes under a pairing (the spreads of x and y do not), so it alone is
    compared: sum (rx - mean)(ry - mean) over ranks (Spearman) or values (Pearson), and the sum of
    sign products over pairs of samples (Kendall's tau-b numerator, concordant minus discordant)."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    perms = _all_pairings(len(x))  # row 0 is the identity: the observed pairing
    if method == "kendall":
        i, j = np.triu_indices(len(x), 1)
        yp = y[perms]
        s = np.sign(yp[:, j] - yp[:, i]) @ np.sign(x[j] - x[i])
    else:
        if method == "spearman":
            from scipy import stats

            x, y = stats.rankdata(x), stats.rankdata(y)
        s = (y - y.mean())[perms] @ (x - x.mean())
    tol = 1e-9 * max(abs(s[0]), 1.0)  # the same sum in another order may differ in its last bit
    return float(np.mean(np.abs(s) >= abs(s[0]) - tol))


@functools.lru_cache(maxsize=EXACT_MAX_N + 1)
def _all_pairings(n: int) -> np.ndarray:
    return np.array(list(itertools.permutations(range(n))), dtype=np.intp)


def _corr_rows(X, Y, method: str):
    """r for each row of X, Y (B × n), vectorised for bootstrap resamples."""
    from scipy import stats

    if method == "kendall":
        return np.array([coefficient(x, y, "kendall") for x, y in zip(X, Y)])
    if method == "spearman":
        X, Y = stats.rankdata(X, axis=1), stats.rankdata(Y, axis=1)
    Xc, Yc = X - X.mean(axis=1, keepdims=True), Y - Y.mean(axis=1, keepdims=True)
    den = np.sqrt((Xc**2).sum(axis=1) * (Yc**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (Xc * Yc).sum(axis=1) / den, np.nan)


def fisher_weight(n: int, method: str) -> float:
    c, d = _FISHER[method]
    return (n - d) / c if n > d else 0.0


def fisher_interval(r: float, n: int, method: str) -> tuple[float, float]:
    w = fisher_weight(n, method)
    if not np.isfinite(r) or w <= 0:
        return math.nan, math.nan
    z = math.atanh(_clip(r))
    h = Z95 / math.sqrt(w)
    return math.tanh(z - h), math.tanh(z + h)


def bootstrap_interval(x, y, method: str, B: int, rng) -> tuple[float, float]:
    n = len(x)
    if n < 3 or B <= 0:
        return math.nan, math.nan
    idx = rng.integers(0, n, size=(B, n))
    rs = _corr_rows(np.asarray(x, float)[idx], np.asarray(y, float)[idx], method)
    rs = rs[np.isfinite(rs)]
    if len(rs) == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(rs, [2.5, 97.5])
    return float(lo), float(hi)


def fisher_combine(rs, ns, method: str) -> tuple[float, float, float]:
    """Fisher-z combination of per-group r's → (r, ci_low, ci_high)."""
    rs, ns = np.asarray(rs, float), np.asarray(ns, int)
    w = np.array([fisher_weight(n, method) for n in ns])
    ok = np.isfinite(rs) & (w > 0)
    if not ok.any():
        return math.nan, math.nan, math.nan
    z = np.arctanh(np.clip(rs[ok], -1 + 1e-12, 1 - 1e-12))
    W = w[ok].sum()
    zbar = float((w[ok] * z).sum() / W)
    h = Z95 / math.sqrt(W)
    return math.tanh(zbar), math.tanh(zbar - h), math.tanh(zbar + h)


def stouffer_p(rs, ps, ns, method: str) -> float:
    """Pooled two-sided p from per-group (r, p): weighted Stouffer with the Fisher weights (step 7)."""
    from scipy import stats

    rs, ps = np.asarray(rs, float), np.asarray(ps, float)
    w = np.array([fisher_weight(n, method) for n in ns])
    ok = np.isfinite(rs) & np.isfinite(ps) & (w > 0)
    if not ok.any():
        return math.nan
    z = np.sign(rs[ok]) * stats.norm.isf(ps[ok] / 2)
    Z = float((np.sqrt(w[ok]) * z).sum() / math.sqrt(w[ok].sum()))
    # underflows only beyond ~37 standard errors: report the smallest float, not an impossible 0
    return max(float(2 * stats.norm.sf(abs(Z))), np.finfo(float).tiny)


def _clip(r: float) -> float:
    return min(max(r, -1 + 1e-12), 1 - 1e-12)


# ---------------------------------------------------------------------------- the query
def correlate(session, metrics: list[str] | None = None, runs: list[str] | None = None, by: By = "run",
              method: Method = "spearman", lag: int = 0, since: float | None = None,
              until: float | None = None, align: Align = "nearest", bootstrap: int = 0, seed: int = 0):
    """Correlation of metrics over training time (the module docstring states the method).

    ``metrics``: two or more names (every pair is correlated); None = every metric in the store.
    ``runs``: run ids or id prefixes (None = all runs). Returns a polars DataFrame with columns
    scope ('run' | 'seed' | 'pooled'), group, metric_a, metric_b, lag, n, r, p_value, ci_low,
    ci_high, r_mean, r_std, groups, method, align (the rule in words).
    """
    import polars as pl

    if by not in BYS:
        raise QueryError(f"unknown --by '{by}'; valid: {', '.join(BYS)}")
    if method not in METHODS:
        raise QueryError(f"unknown method '{method}'; valid: {', '.join(METHODS)}")
    if align not in ALIGNS:
        raise QueryError(f"unknown alignment '{align}'; valid: {', '.join(ALIGNS)}")
    if metrics is not None and len(metrics) == 1:
        raise QueryError("correlate needs two metrics (or none for the full matrix); "
                         f"got only '{metrics[0]}'")
    if metrics:
        check_metrics(session, metrics)
    run_ids = resolve_runs(session, runs)
    frame = load_series(session, metrics, run_ids, since, until)
    names = list(dict.fromkeys(metrics)) if metrics else sorted(frame["metric"].unique().to_list())
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
    rule = alignment_rule(align)
    rng = np.random.default_rng(seed)

    # group -> metric -> (t, y) per run; a seed group holds several runs aligned separately
    groups: dict[str, dict[str, dict[str, tuple]]] = {}
    for (run_id, variant, s, metric), part in frame.group_by(["run_id", "variant", "seed", "metric"],
                                                              maintain_order=True):
        key = run_id if by == "run" else f"{variant}/seed{s}"
        groups.setdefault(key, {}).setdefault(metric, {})[run_id] = (part["epoch"].to_numpy(),
                                                                      part["value"].to_numpy())

    rows = []
    for a, b in pairs:
        per_group = []
        for key in sorted(groups):
            sa, sb = groups[key].get(a), groups[key].get(b)
            if not sa or not sb:
                continue
            xs, ys = [], []
            for run_id in sorted(set(sa) & set(sb)):
                x, y = align_pair(*sa[run_id], *sb[run_id], align=align)
                x, y = apply_lag(x, y, lag)
                xs.append(x)
                ys.append(y)
            x = np.concatenate(xs) if xs else np.empty(0)
            y = np.concatenate(ys) if ys else np.empty(0)
            r, p = corr(x, y, method)
            lo, hi = (bootstrap_interval(x, y, method, bootstrap, rng) if bootstrap
                      else fisher_interval(r, len(x), method))
            per_group.append({"scope": "seed" if by == "seed" else "run", "group": key, "n": len(x),
                              "r": r, "p_value": p, "ci_low": lo, "ci_high": hi, "groups": 1})
        if not per_group:
            continue
        if by != "pooled":
            rows += [{**g, "metric_a": a, "metric_b": b} for g in per_group]
        rows.append({**_pooled(per_group, method, bootstrap, rng), "metric_a": a, "metric_b": b})

    out = pl.DataFrame(rows, schema={"scope": pl.Utf8, "group": pl.Utf8, "metric_a": pl.Utf8,
                                     "metric_b": pl.Utf8, "n": pl.Int64, "r": pl.Float64,
                                     "p_value": pl.Float64, "ci_low": pl.Float64, "ci_high": pl.Float64,
                                     "r_mean": pl.Float64, "r_std": pl.Float64, "groups": pl.Int64},
                       strict=False)
    return out.with_columns(pl.lit(lag, dtype=pl.Int64).alias("lag"), pl.lit(method).alias("method"),
                            pl.lit(rule).alias("align")).select(COLUMNS)


def _pooled(per_group: list[dict], method: str, bootstrap: int, rng) -> dict:
    rs = np.array([g["r"] for g in per_group], float)
    ns = np.array([g["n"] for g in per_group], int)
    finite = rs[np.isfinite(rs)]
    r, lo, hi = fisher_combine(rs, ns, method)
    p = stouffer_p(rs, [g["p_value"] for g in per_group], ns, method)
    if bootstrap and len(per_group) > 1:
        picks = rng.integers(0, len(per_group), size=(bootstrap, len(per_group)))
        boot = np.array([fisher_combine(rs[i], ns[i], method)[0] for i in picks])
        boot = boot[np.isfinite(boot)]
        if len(boot):
            lo, hi = (float(v) for v in np.percentile(boot, [2.5, 97.5]))
    return {"scope": "pooled", "group": "all", "n": int(ns.sum()), "r": r, "p_value": p, "ci_low": lo,
            "ci_high": hi, "r_mean": float(finite.mean()) if len(finite) else math.nan,
            "r_std": float(finite.std(ddof=1)) if len(finite) > 1 else math.nan,
            "groups": int(len(finite))}


def matrix(df, value: str = "r", scope: str = "pooled"):
    """Square matrix (polars) of ``value`` from a correlate result, both triangles filled."""
    import polars as pl

    part = df.filter(pl.col("scope") == scope)
    names = sorted(set(part["metric_a"]) | set(part["metric_b"]))
    vals = {(a, b): v for a, b, v in part.select("metric_a", "metric_b", value).iter_rows()}
    data = {"metric": names}
    for b in names:
        data[b] = [1.0 if a == b else vals.get((a, b), vals.get((b, a))) for a in names]
    return pl.DataFrame(data)
