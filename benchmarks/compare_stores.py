"""Compare every stored probe value of two stores: a speed-up must not change what a study stores.

    python benchmarks/compare_stores.py BEFORE_STORE AFTER_STORE [--rtol 1e-5]

Rows are matched on their key (``job_id``, ``idx``): job ids hash the probe, its version, its
parameters and its checkpoints, so the same study run twice has the same keys. For every result
table and every numeric column the script prints the largest difference relative to the value's
magnitude, max |a − b| / max(|a|, |b|, atol) (absolute for the columns in ``ABSOLUTE``), and the
rows present in one store only. A column
fails when that exceeds its tolerance: ``--rtol`` (default 1e-5, float32 rounding of a
recomputation in another order), or the probe's own where it states one (``STATED``: the
Hessian's Lanczos tolerance ``tol`` = 1e-3 bounds its eigenvalues; its SLQ density curve is
compared relative to each job's largest value). A few flags and labels (``EXACT``) must match
exactly. Timing columns (``seconds``) are skipped. Exits 1 on any failure, so a script can gate on
it.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import duckdb

SKIP = {"seconds", "idx"}
# per table and column: the tolerance the probe states, where looser than --rtol
STATED = {
    ("hessian", "top_eigenvalue"): 1e-3,  # Lanczos stops at residual ≤ tol·|θ|max, tol = 1e-3
    ("hessian_eigenvalue", "value"): 1e-3,
    # how far below tol each run's residuals went (a diagnostic; ``converged`` is compared exactly)
    ("hessian", "max_residual"): math.inf,
    ("hessian_eigenvalue", "residual"): math.inf,
    # the SLQ density curve, relative to its job's largest |value| (a grid point near 0 has no
    # relative precision of its own; SLQ's Lanczos runs without reorthogonalisation, so float32
    # rounding moves the curve: the same code on 1 and 2 torch threads differs by up to 6.3e-6 of
    # the largest density, examples/quick.toml, 2026-11-30)
    ("hessian_density", "density"): 1e-4,
}
# per table and column: an absolute tolerance instead. An error rate counts examples: after 2,500
# steps of linearised training, float rounding can move a test input's logits across a near-tie
# and flip it (one of MNIST-1D's 1,000 test inputs: 1e-3).
ABSOLUTE = {("kernel_accuracy", "test_error"): 1e-3 + 1e-9, ("kernel_accuracy", "train_error"): 1e-3 + 1e-9}
PER_JOB = {"hessian_density"}  # differences relative to the job's largest |value|, not each value's
EXACT = {("hessian", "converged"), ("kernel_accuracy", "method"), ("hessian", "trace_method")}


def numeric_columns(con, table: str) -> list[str]:
    rows = con.execute(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_catalog = 'a' AND table_name = ? "
        "ORDER BY ordinal_position",
        [table]).fetchall()
    kinds = ("DOUBLE", "FLOAT", "REAL", "INTEGER", "BIGINT", "SMALLINT", "HUGEINT", "DECIMAL")
    return [name for name, kind in rows if kind.upper().startswith(kinds) and name not in SKIP]


def compare(before: Path, after: Path, rtol: float, atol: float = 1e-12) -> int:
    con = duckdb.connect()
    for alias, store in (("a", before), ("b", after)):  # ATTACH takes no parameters: quote the path
        path = str(store / "lsdb.duckdb").replace("'", "''")
        con.execute(f"ATTACH '{path}' AS {alias} (READ_ONLY)")
    tables = [r[0] for r in con.execute(
        "SELECT table_name FROM information_schema.columns WHERE table_catalog = 'a' AND column_name = 'job_id' "
        "AND table_name <> 'probe_job' GROUP BY table_name ORDER BY table_name").fetchall()]
    failures = 0
    print(f"{'table':<22} {'column':<30} {'rows':>7} {'max rel diff':>13} {'tolerance':>10}")
    for table in tables:
        cols = numeric_columns(con, table)
        only = con.execute(
            f'SELECT (SELECT count(*) FROM a.main."{table}" x ANTI JOIN b.main."{table}" y USING (job_id, idx)), '
            f'(SELECT count(*) FROM b.main."{table}" y ANTI JOIN a.main."{table}" x USING (job_id, idx))').fetchone()
        if only != (0, 0):
            print(f"{table:<22} {'(rows in one store only)':<30} {only[0]:>7} / {only[1]} FAIL")
            failures += 1
        for col in cols:
            scale = (f'max(greatest(abs(x."{col}"), abs(y."{col}"))) OVER (PARTITION BY job_id)' if table in PER_JOB
                     else "1.0" if (table, col) in ABSOLUTE else f'greatest(abs(x."{col}"), abs(y."{col}"))')
            n, worst, nulls = con.execute(
                f'SELECT count(*), max(d), count(*) FILTER (mismatch) FROM ('
                f'SELECT abs(x."{col}" - y."{col}") / greatest({scale}, ?) AS d, '
                f'(x."{col}" IS NULL) <> (y."{col}" IS NULL) OR isnan(x."{col}") <> isnan(y."{col}") AS mismatch '
                f'FROM a.main."{table}" x JOIN b.main."{table}" y USING (job_id, idx))', [atol]).fetchone()
            if n == 0:  # a table the study does not fill
                continue
            tol = ABSOLUTE.get((table, col)) or max(rtol, STATED.get((table, col), 0.0))
            bad = nulls or (worst is not None and not worst <= tol)
            failures += bool(bad)
            shown = "—" if worst is None else f"{worst:.2e}"
            kind = " abs" if (table, col) in ABSOLUTE else ""
            print(f"{table:<22} {col:<30} {n:>7} {shown:>13} {tol:>10.0e}{kind}{'  FAIL' if bad else ''}"
                  f"{f' ({nulls} null/NaN mismatches)' if nulls else ''}")
    for table, col in sorted(EXACT):
        if table not in tables:
            continue
        n, differ = con.execute(
            f'SELECT count(*), count(*) FILTER (x."{col}" IS DISTINCT FROM y."{col}") '
            f'FROM a.main."{table}" x JOIN b.main."{table}" y USING (job_id, idx)').fetchone()
        if n:
            failures += bool(differ)
            print(f"{table:<22} {col:<30} {n:>7} {f'{differ} differ':>13} {'exact':>10}{'  FAIL' if differ else ''}")
    print(f"{failures} column(s) out of tolerance" if failures else "every stored value within tolerance")
    return 1 if failures else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=Path)
    ap.add_argument("after", type=Path)
    ap.add_argument("--rtol", type=float, default=1e-5)
    args = ap.parse_args()
    sys.exit(compare(args.before, args.after, args.rtol))


if __name__ == "__main__":
    main()
