"""A finding's result (``Finding``) and how its verdict is formed from named parts.

A finding with several parts: any measured part failing → "does not hold"; all measured parts holding with
some unmeasured → "holds", and ``detail`` names the unmeasured part. Nothing measured → "not measured";
``_not_measured`` then says in ``detail`` what is missing and what to add to the spec (``advice``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lsdb.query.evidence import advice

HOLDS, FAILS, NOT_MEASURED = "holds", "does not hold", "not measured"


@dataclass
class Finding:
    """One evaluated finding."""

    id: str
    title: str
    metric: str
    expected: str
    verdict: str = NOT_MEASURED
    measured: str = ""
    detail: str = ""
    numbers: dict = field(default_factory=dict)  # name -> {"mean", "std", "n"} or a scalar

    def as_row(self) -> dict:
        return {"id": self.id, "title": self.title, "verdict": self.verdict, "measured": self.measured,
                "expected": self.expected, "metric": self.metric, "detail": self.detail}


def _not_measured(f: Finding, missing: list[str], why: str = "") -> Finding:
    f.verdict = NOT_MEASURED
    lacks = ", ".join(missing)
    f.detail = why or (f"no {lacks} in this store: " + "; ".join(dict.fromkeys(advice(m) for m in missing)))
    return f


def _combine(f: Finding, parts: list[tuple[str, bool | None]]) -> Finding:
    """Verdict from named parts (None = part not measured)."""
    measured = [(n, ok) for n, ok in parts if ok is not None]
    unmeasured = [n for n, ok in parts if ok is None]
    if not measured:
        f.verdict = NOT_MEASURED
    elif all(ok for _, ok in measured):
        f.verdict = HOLDS
    else:
        f.verdict = FAILS
        f.detail = _join(f.detail, "fails on: " + ", ".join(n for n, ok in measured if not ok))
    if unmeasured and measured:
        f.detail = _join(f.detail, "not measured: " + ", ".join(unmeasured))
    return f


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
