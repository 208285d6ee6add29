"""Probe throughput of one job list on each executor: inline, the process pool and Ray, at 1 and
2 workers, as ratios to inline measured in the same run; and Ray's overhead per job.

    python benchmarks/scale.py [--spec examples/quick.toml] [--probes eval,weights,ntk] [--noops 200]
                               [--setups process:2,ray:2]

The spec's runs are trained once (inline, ``--no-probes``); every executor then computes the same
ready probe jobs (the first pass: jobs that depend on other probes' results wait for a later one)
into its own copy of that store, on the CPU. Each executor is started and warmed (every worker has
imported torch and lsdb's worker) before the clock starts, so jobs/s is steady-state throughput;
start-up is printed on its own. Ingest is not timed: it is the same for every executor.

Ray's overhead per job: the wall time per no-op task through the Ray executor at one CPU (submit,
schedule, run, return, fetch), beside the same through the process pool; inline's is ~0. Ray
worker processes run torch on one thread (Ray sets OMP_NUM_THREADS from the task's CPUs), as the
2-worker pool does; inline and the 1-worker pool use torch's default.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from lsdb import runner
from lsdb.plan import load_spec
from lsdb.probes.executors import make_executor
from lsdb.probes.worker import run_probe_job
from lsdb.store import Store

SETUPS = (("inline", 1), ("process", 1), ("process", 2), ("ray", 1), ("ray", 2))


def _warm(seconds: float) -> None:
    """Import what a probe job imports, then hold the worker so the next warm-up lands elsewhere."""
    import lsdb.probes.worker  # noqa: F401
    import torch  # noqa: F401

    time.sleep(seconds)


def noop() -> None:
    return None


def throughput(kind: str, workers: int, base: Path, where: Path, jobs: list) -> tuple[float, float]:
    """(seconds to start and warm the executor, jobs per second)."""
    root = shutil.copytree(base, where)
    t0 = time.perf_counter()
    ex = make_executor(workers, kind)
    try:
        list(ex.map(_warm, [(0.5,)] * workers))
        started = time.perf_counter() - t0
        t0 = time.perf_counter()
        metas = list(ex.map(run_probe_job, [(str(root), j, "cpu") for j in jobs]))
        seconds = time.perf_counter() - t0
    finally:
        ex.close()
    failed = [m for m in metas if m["state"] == "failed"]
    if failed:
        raise SystemExit(f"{kind} x{workers}: {len(failed)} jobs failed: {failed[0]['error']}")
    return started, len(jobs) / seconds


def per_task_ms(kind: str, n: int) -> float:
    ex = make_executor(1, kind)
    try:
        list(ex.map(_warm, [(0.0,)]))
        t0 = time.perf_counter()
        list(ex.map(noop, [()] * n))
        return (time.perf_counter() - t0) / n * 1000
    finally:
        ex.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", type=Path, default=Path(__file__).resolve().parents[1] / "examples" / "quick.toml")
    ap.add_argument("--probes", default="", help="only these probes' jobs (comma-separated; default all ready)")
    ap.add_argument("--noops", type=int, default=200, help="no-op tasks for the overhead figure")
    ap.add_argument("--setups", default=",".join(f"{k}:{w}" for k, w in SETUPS),
                    help="executor:workers pairs to time (inline:1, the baseline, always runs first)")
    args = ap.parse_args(argv)
    spec = load_spec(args.spec)
    with tempfile.TemporaryDirectory() as tmp:
        base = Store.init(Path(tmp) / "base")
        t0 = time.perf_counter()
        assert runner.run(spec, base, probes=False).ok
        print(f"{args.spec.name}: trained in {time.perf_counter() - t0:.1f} s (inline)")
        jobs = runner.ready_jobs(spec, base)
        if args.probes:
            jobs = [j for j in jobs if j.probe in set(args.probes.split(","))]
        counts: dict[str, int] = {}
        for j in jobs:
            counts[j.probe] = counts.get(j.probe, 0) + 1
        print(f"{len(jobs)} probe jobs: " + ", ".join(f"{n} {p}" for p, n in sorted(counts.items())))
        rates = {}
        print(f"{'executor':<12}{'start s':>9}{'jobs/s':>9}{'× inline':>10}")
        setups = [("inline", 1)] + [(k, int(w)) for k, w in (x.split(":") for x in args.setups.split(","))
                                     if (k, int(w)) != ("inline", 1)]
        for kind, workers in setups:
            started, rate = throughput(kind, workers, base.root, Path(tmp) / f"{kind}-{workers}", jobs)
            rates[(kind, workers)] = rate
            ratio = rate / rates[("inline", 1)]
            print(f"{kind + ' x' + str(workers):<12}{started:>9.1f}{rate:>9.2f}{ratio:>10.2f}")
    ray_ms, pool_ms = per_task_ms("ray", args.noops), per_task_ms("process", args.noops)
    print(f"overhead per job ({args.noops} no-op tasks, 1 worker): Ray {ray_ms:.2f} ms, process pool {pool_ms:.2f} ms")


if __name__ == "__main__":
    main()
