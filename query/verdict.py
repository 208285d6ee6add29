"""A finding's result (``Finding``) and how its verdict is formed from named parts (``Part``).

Four verdicts: "holds", "does not hold", "inconclusive", "not measured". A finding with several parts:

- any measured part failing, and settled (no ``why``) → "does not hold";
- else any measured part unsettled (``why``: too few seeds, the seeds' spread or a bootstrap interval
  straddles the threshold, a precondition fails) → "inconclusive", and ``detail`` says why;
- else all measured parts hold → "holds"; with some parts unmeasured the finding reads "holds (partly
  measured: …)" (``Finding.label``) and ``detail`` names each unmeasured part with what to add;
- nothing measured → "not measured"; ``_not_measured`` then says in ``detail`` what is missing and what to
  add to the spec (``advice``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lsdb.query.evidence import advice
from lsdb.query.stats import Check

HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED = "holds", "does not hold", "inconclusive", "not measured"
VERDICTS = (HOLDS, FAILS, INCONCLUSIVE, NOT_MEASURED)


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
    unmeasured: list[str] = field(default_factory=list)  # parts not measured (names)

    @property
    def label(self) -> str:
        """The verdict as printed: "holds (partly measured: …)" when parts of a holding finding are missing."""
        if self.verdict == HOLDS and self.unmeasured:
            return f"{HOLDS} (partly measured: {', '.join(self.unmeasured)} missing)"
        return self.verdict

    def as_row(self) -> dict:
        return {"id": self.id, "title": self.title, "verdict": self.label, "measured": self.measured,
                "expected": self.expected, "metric": self.metric, "detail": self.detail}


@dataclass(frozen=True)
class Part:
    """One tested part of a finding: ``ok`` None = not measured (``advice`` says what to add); ``why``
    non-empty = measured but not settled (the finding is then at best inconclusive)."""

    name: str
    ok: bool | None
    why: str = ""
    advice: str = ""

    @classmethod
    def of(cls, name: str, c: Check, advice: str = "") -> "Part":
        return cls(name, c.ok, c.why if c.ok is not None else "", advice)

    @classmethod
    def all_of(cls, name: str, checks: list[Check], advice: str = "", why: str = "") -> "Part":
        """Several checks that must all pass: a settled failure of one fails the part; ``why`` adds a
        precondition that failed (the part is then unsettled unless one check fails on its own)."""
        measured = [c for c in checks if c.ok is not None]
        if not measured:
            return cls(name, None, "", advice)
        if not why and any(c.ok is False and not c.why for c in measured):
            return cls(name, False, "", advice)  # one settled failure settles the part
        whys = [c.why for c in measured if c.why] + ([why] if why else [])
        return cls(name, all(c.ok for c in measured), "; ".join(whys), advice)


def _not_measured(f: Finding, missing: list[str], why: str = "") -> Finding:
    f.verdict = NOT_MEASURED
    lacks = ", ".join(missing)
    f.detail = _join(f.detail, why or (f"no {lacks} in this store: " +
                                       "; ".join(dict.fromkeys(advice(m) for m in missing))))
    return f


def _inconclusive(f: Finding, why: str) -> Finding:
    f.verdict = INCONCLUSIVE
    f.detail = _join(f.detail, f"inconclusive: {why}")
    return f


def _combine(f: Finding, parts: list) -> Finding:
    """Verdict from named parts: ``Part`` objects, or (name, ok) / (name, ok, why) tuples (ok None = not
    measured)."""
    parts = [p if isinstance(p, Part) else Part(*p) for p in parts]
    measured = [p for p in parts if p.ok is not None]
    unmeasured = [p for p in parts if p.ok is None]
    settled_fail = [p for p in measured if p.ok is False and not p.why]
    unsettled = [p for p in measured if p.why]
    if not measured:
        f.verdict = NOT_MEASURED
    elif settled_fail:
        f.verdict = FAILS
        f.detail = _join(f.detail, "fails on: " + ", ".join(p.name for p in settled_fail))
    elif unsettled:
        f.verdict = INCONCLUSIVE
        f.detail = _join(f.detail, "inconclusive: " + "; ".join(
            f"{p.name} would {'hold' if p.ok else 'fail'} but {p.why}" for p in unsettled))
    else:
        f.verdict = HOLDS
    if unmeasured and measured:
        f.unmeasured = [p.name for p in unmeasured]
        f.detail = _join(f.detail, "not measured: " + "; ".join(
            f"{p.name} ({p.advice})" if p.advice else p.name for p in unmeasured))
    return f


def _join(*parts: str) -> str:
    return "; ".join(p for p in parts if p)
