"""Evaluate the published findings (docs/findings.md) against a store.

    import lsdb
    from lsdb.query.findings import findings
    findings(lsdb.open("lsdb-store"))            # polars DataFrame: one row per finding
    findings(lsdb.open("lsdb-store"), only=["F1", "F3"])

Each finding states its metric, the expected shape, the measured numbers (seed mean ± std, one
value per parent run, i.e. per seed) and a verdict: "holds" ("holds (partly measured: …)" when some
of its parts were not measured), "does not hold", "inconclusive" (too few seeds, the seeds' spread or
a bootstrap interval straddles a threshold, or a stated precondition fails; ``detail`` says which) or
"not measured" (then ``detail`` says what is missing and what to add to the spec). Thresholds live in
``lsdb.query.thresholds``; they were fixed before looking at data and are never tuned to it.

This module is the public entry. The work is split, each module importing only those above it:

- ``lsdb.query.stats``: seed mean ± std (``Stat``), Spearman, the threshold check with its bootstrap
  interval (``check``) and the other statistics;
- ``lsdb.query.evidence``: the store's numbers the findings read (``Evidence``) and what to add
  to the spec when a metric is missing (``advice``);
- ``lsdb.query.verdict``: a finding's result (``Finding``) and how parts (``Part``) combine into a verdict;
- ``lsdb.query.rules``: the rules F1–F15 themselves and the conventions they share;
- ``lsdb.query.merging_rules``: the merging rules F16–F19 (``FINDINGS`` here joins both).
"""

from __future__ import annotations

from lsdb.errors import QueryError
from lsdb.query.evidence import (FINDING_METRICS, MERGE_MATCHED, MERGE_NAIVE, NONLINEAR_ADVANTAGE, PROBE_OF,
                                 SIBLING_METRICS, Evidence, advice)
from lsdb.query import merging_rules, rules
from lsdb.query.rules import F2_MEASURES, F12_MEASURES, catch_up, onsets
from lsdb.query.stats import Check, Stat, bootstrap_interval, check, spearman
from lsdb.query.verdict import FAILS, HOLDS, INCONCLUSIVE, NOT_MEASURED, VERDICTS, Finding, Part
from lsdb.train import NUM_CLASSES

#: Every finding by id, in order: the landscape findings (``rules``), then the merging ones (``merging_rules``).
FINDINGS = dict(sorted({**rules.FINDINGS, **merging_rules.FINDINGS}.items(), key=lambda kv: int(kv[0][1:])))

__all__ = [
    "evaluate", "findings_results", "findings", "to_frame", "as_text",
    "Evidence", "Finding", "Part", "Stat", "Check", "FINDINGS", "HOLDS", "FAILS", "INCONCLUSIVE", "NOT_MEASURED",
    "VERDICTS", "advice", "onsets", "catch_up", "spearman", "check", "bootstrap_interval", "F2_MEASURES",
    "F12_MEASURES", "FINDING_METRICS", "MERGE_MATCHED", "MERGE_NAIVE", "NONLINEAR_ADVANTAGE", "NUM_CLASSES",
    "PROBE_OF", "SIBLING_METRICS",
]


def evaluate(ev: Evidence, only: list[str] | None = None) -> list[Finding]:
    """Evaluate the findings named in ``only`` (default: all) on prepared evidence."""
    ids = [i.strip().upper() for i in only] if only else list(FINDINGS)
    unknown = [i for i in ids if i not in FINDINGS]
    if unknown:
        raise QueryError(f"unknown finding {', '.join(unknown)}; valid: {', '.join(FINDINGS)}")
    return [FINDINGS[i](ev) for i in ids]


def findings_results(session, only: list[str] | None = None) -> list[Finding]:
    return evaluate(Evidence.from_session(session), only)


def findings(session, only: list[str] | None = None):
    """The findings table (polars): id, title, verdict, measured, expected, metric, detail.

    ``verdict`` is ``Finding.label``: one of VERDICTS, or "holds (partly measured: … missing)"."""
    return to_frame(findings_results(session, only))


def to_frame(results: list[Finding]):
    import polars as pl

    cols = ["id", "title", "verdict", "measured", "expected", "metric", "detail"]
    return pl.DataFrame([r.as_row() for r in results], schema={c: pl.Utf8 for c in cols})


def as_text(results: list[Finding]) -> str:
    """The findings as plain text, one block per finding (what ``lsdb findings`` prints)."""
    lines = []
    for r in results:
        verdict = r.verdict.upper() + r.label[len(r.verdict):]  # + " (partly measured: … missing)"
        lines.append(f"{r.id:<4} {verdict:<14} {r.title}")
        lines.append(f"     metric:   {r.metric}")
        lines.append(f"     expected: {r.expected}")
        if r.measured:
            lines.append(f"     measured: {r.measured}")
        if r.detail:
            lines.append(f"     note:     {r.detail}")
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICTS}
    lines.append(f"{counts[HOLDS]} hold, {counts[FAILS]} do not hold, {counts[NOT_MEASURED]} not measured, "
                 f"{counts[INCONCLUSIVE]} inconclusive")
    return "\n".join(lines)
