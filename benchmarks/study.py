"""Where a study's time goes: planning, training, each probe, ingest and process start-up.

    python benchmarks/study.py                 # examples/quick.toml, inline
    python benchmarks/study.py --full --workers 2
    python benchmarks/study.py --spec my.toml
    python benchmarks/study.py --store DIR     # keep the store (e.g. for benchmarks/compare_stores.py)

Runs the spec into a fresh temporary store twice over: ``lsdb run --no-probes`` (planning,
training, recording, ingest of checkpoints), then ``lsdb run`` (the probes). Wall and CPU
seconds (this process and its children, from ``getrusage``) per phase; per probe, the wall
seconds its jobs report (``probe_job.seconds``) and their share of the probe phase. Ingest
time is measured by replaying the store's log into a new database (``lsdb rebuild``). Numbers
depend on the machine and on what else runs on it: run it on a quiet box.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cpu() -> float:
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn):
    w, c = time.perf_counter(), cpu()
    out = fn()
    return out, time.perf_counter() - w, cpu() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, help="a spec file (default: examples/quick.toml)")
    ap.add_argument("--full", action="store_true", help="the embedded full study (lsdb demo)")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--store", type=Path, help="run into this new store and keep it (default: a temporary one)")
    args = ap.parse_args()

    import lsdb
    from lsdb import runner
    from lsdb.integrity import rebuild
    from lsdb.plan import load_spec, parse_spec
    from lsdb.store import Store

    if args.full:
        spec = parse_spec(resources.files("lsdb.examples").joinpath("fort2020-mnist1d.toml").read_text())
    else:
        spec = load_spec(args.spec or Path(__file__).resolve().parent.parent / "examples" / "quick.toml")

    with tempfile.TemporaryDirectory() as tmp:
        if args.store and args.store.exists():
            sys.exit(f"{args.store} exists: give a new folder")
        store = Store.init(args.store or Path(tmp) / "store")
        _, plan_w, plan_c = timed(lambda: runner.plan(spec, store))
        t, train_w, train_c = timed(lambda: runner.run(spec, store, workers=args.workers, probes=False))
        p, probe_w, probe_c = timed(lambda: runner.run(spec, store, workers=args.workers))
        _, ingest_w, ingest_c = timed(lambda: rebuild(store))
        by_probe = lsdb.open(store.root).sql(
            "SELECT probe, count(*) AS jobs, sum(seconds) AS seconds FROM probe_job GROUP BY probe "
            "ORDER BY seconds DESC").rows()

    total_w = train_w + probe_w
    print(f"{spec.name}: {t.trained} runs trained, {p.jobs_done} probe jobs, --workers {args.workers}")
    print(f"{'phase':<22}{'wall s':>9}{'cpu s':>9}{'share':>8}")
    rows = [("planning (dry)", plan_w, plan_c), ("training (+ingest)", train_w, train_c),
            ("probes (+ingest)", probe_w, probe_c), ("total", total_w, train_c + probe_c)]
    for name, w, c in rows:
        print(f"{name:<22}{w:9.1f}{c:9.1f}{w / total_w:8.1%}")
    print(f"{'ingest, whole log':<22}{ingest_w:9.1f}{ingest_c:9.1f}{ingest_w / total_w:8.1%}  (rebuild: every shard again)")
    job_total = sum(s for _, _, s in by_probe) or 1.0
    print(f"\n{'probe':<18}{'jobs':>6}{'job s':>9}{'of probe jobs':>15}")
    for probe, jobs, seconds in by_probe:
        print(f"{probe:<18}{jobs:6d}{seconds:9.1f}{seconds / job_total:15.1%}")
    overhead = probe_w * args.workers - job_total
    print(f"\nprobe phase: {job_total:.1f} s inside jobs, {probe_w:.1f} s wall × {args.workers} workers; "
          f"outside jobs (planning passes, ingest, start-up): {max(overhead, 0):.1f} s")


if __name__ == "__main__":
    main()
