"""Statistics the findings use: seed mean ± std, rank correlation, first crossing, nearest time, ratios,
and whether per-seed values settle a threshold (``check``).

Pure functions of numbers (no store, no verdicts); ``lsdb.query.rules`` applies them per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lsdb.query import thresholds as T


@dataclass
class Stat:
    """Seed mean ± sample std over the finite values."""

    mean: float
    std: float
    n: int
    values: tuple = field(default=(), repr=False, compare=False)  # the finite per-seed values

    @classmethod
    def of(cls, values) -> "Stat":
        v = np.asarray([x for x in values if x is not None], dtype=float)
        v = v[np.isfinite(v)]
        return cls(float(v.mean()) if len(v) else math.nan, float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                   int(len(v)), tuple(float(x) for x in v))

    def __str__(self) -> str:
        if self.n == 0:
            return "n/a"
        seeds = f"{self.n} seed{'s' if self.n != 1 else ''}"
        if self.n == 1:
            return f"{_g(self.mean)} ({seeds})"
        std = 0.0 if abs(self.std) <= 1e-9 * max(abs(self.mean), 1e-300) else self.std  # float dust
        return f"{_g(self.mean)} ± {_g(std)} ({seeds})"

    def as_dict(self) -> dict:
        return {"mean": self.mean, "std": self.std, "n": self.n}


def _g(x: float) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.3g}"


def spearman(x, y) -> float:
    """Spearman's rho alone: the findings need no p-value, and an exact one costs n! pairings."""
    from lsdb.query.correlate import coefficient

    return coefficient(x, y, "spearman")


def _first_frac(frac, ok) -> float:
    """The first time (fraction of training) where ``ok`` holds; NaN when it never does."""
    hits = np.flatnonzero(ok)
    return float(frac[hits[0]]) if len(hits) else math.nan


def _nearest(frac, target: float) -> int:
    return int(np.argmin(np.abs(np.asarray(frac) - target)))


def _rolling_median(v, w: int):
    v = np.asarray(v, float)
    h = w // 2
    return np.array([np.median(v[max(0, i - h): i + h + 1]) for i in range(len(v))])


def _ratio(num: dict[int, float], den: dict[int, float]) -> tuple[Stat, str]:
    """Per-seed ratios where seeds match; otherwise the ratio of means (reported as 1 value)."""
    common = sorted(set(num) & set(den))
    if common:
        return Stat.of(num[s] / den[s] for s in common if den[s] != 0), "per seed"
    return Stat.of([np.mean(list(num.values())) / np.mean(list(den.values()))]), "ratio of means"


def bootstrap_interval(values, level: float = T.BOOTSTRAP_LEVEL, resamples: int = T.BOOTSTRAP_RESAMPLES,
                       seed: int = T.BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (finite floats); (nan, nan) under 2 values."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return math.nan, math.nan
    means = v[np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))].mean(axis=1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def too_few_seeds(n: int, min_seeds: int = T.MIN_SEEDS) -> str:
    """Why a verdict over ``n`` seeds is unsettled, or "" when there are enough."""
    return f"only {n} seed{'s' if n != 1 else ''} measured (minimum {min_seeds})" if n < min_seeds else ""


@dataclass(frozen=True)
class Check:
    """Whether per-seed values pass a threshold: ``ok`` (None = nothing measured) from their mean, and
    ``why`` (non-empty) when that outcome is not settled: too few seeds, seeds on both sides, or the
    seeds' spread (mean ± std) or the bootstrap interval of the mean straddling the threshold."""

    ok: bool | None
    why: str = ""
    interval: tuple[float, float] = (math.nan, math.nan)  # the bootstrap interval of the mean


def check(values, threshold: float, sense: str, min_seeds: int = T.MIN_SEEDS) -> Check:
    """``sense`` "<=" or ">=": does the seed mean of ``values`` lie on the passing side of ``threshold``?

    ``values``: one number per seed; None/NaN = not measured there (left out), ±inf = "never" (a seed
    whose time never comes counts as +inf against an upper bound). With infinities the mean is decided
    by them and the straddle test is whether some seeds pass and others do not.
    """
    if sense not in ("<=", ">="):
        raise ValueError(f"sense must be '<=' or '>=', got {sense!r}")
    v = np.asarray([x for x in values if x is not None], dtype=float)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return Check(None)
    passes = v <= threshold if sense == "<=" else v >= threshold
    finite = v[np.isfinite(v)]
    mean = float(v.mean()) if np.isfinite(v).all() else (math.inf if (v == math.inf).any() and not
                                                          (v == -math.inf).any() else -math.inf)
    ok = bool(mean <= threshold if sense == "<=" else mean >= threshold)
    lo, hi = bootstrap_interval(finite) if len(finite) == len(v) else (math.nan, math.nan)
    if len(v) < min_seeds:
        return Check(ok, too_few_seeds(len(v), min_seeds), (lo, hi))
    if len(finite) < len(v):
        why = "" if passes.all() or not passes.any() else f"{int(passes.sum())} of {len(v)} seeds pass"
        return Check(ok, why, (lo, hi))
    std = float(finite.std(ddof=1))
    if mean - std < threshold < mean + std:
        return Check(ok, f"seeds' spread {Stat.of(finite)} straddles {threshold:g}", (lo, hi))
    if lo < threshold < hi:
        return Check(ok, f"{T.BOOTSTRAP_LEVEL:.0%} bootstrap interval [{_g(lo)}, {_g(hi)}] of the seed mean "
                         f"straddles {threshold:g}", (lo, hi))
    return Check(ok, "", (lo, hi))
