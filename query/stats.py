"""Statistics the findings use: seed mean ± std, rank correlation, first crossing, nearest time, ratios.

Pure functions of numbers (no store, no verdicts); ``lsdb.query.rules`` applies them per seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass
class Stat:
    """Seed mean ± sample std over the finite values."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values) -> "Stat":
        v = np.asarray([x for x in values if x is not None], dtype=float)
        v = v[np.isfinite(v)]
        return cls(float(v.mean()) if len(v) else math.nan, float(v.std(ddof=1)) if len(v) > 1 else math.nan,
                   int(len(v)))

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
    from lsdb.query.correlate import corr

    return corr(x, y, "spearman")[0]


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
