"""Job manifests: probe jobs as JSON lines, so any machine that sees the store directory can run
them (``lsdb worker``) and the coordinator ingests the shards (``lsdb ingest``). This is the
batch-job executor: a cluster scheduler only has to start ``lsdb worker MANIFEST --shard i/n``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lsdb.errors import LsdbError
from lsdb.probes.base import CheckpointRef, RunRef
from lsdb.probes.worker import JobSpec, run_probe_job


def job_to_dict(job: JobSpec) -> dict:
    return dataclasses.asdict(job)


def job_from_dict(d: dict) -> JobSpec:
    from lsdb.spec import DataSpec, ModelSpec
    from lsdb.probes.base import dataclass_from_dict

    d = dict(d)
    d["checkpoints"] = tuple(CheckpointRef(**c) for c in d["checkpoints"])
    d["runs"] = tuple(RunRef(**{**r, "checkpoints": tuple(CheckpointRef(**c) for c in r["checkpoints"])})
                      for r in d["runs"])
    d["model"] = dataclass_from_dict(ModelSpec, d["model"])
    d["data"] = dataclass_from_dict(DataSpec, d["data"])
    return JobSpec(**d)


def write_manifest(jobs: list[JobSpec], path: Path) -> int:
    path = Path(path)
    with open(path, "w") as fh:
        for job in jobs:
            fh.write(json.dumps(job_to_dict(job), sort_keys=True) + "\n")
    return len(jobs)


def read_manifest(path: Path) -> list[JobSpec]:
    path = Path(path)
    if not path.exists():
        raise LsdbError(f"no manifest at {path}; write one with: lsdb plan SPEC --manifest {path}")
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                jobs.append(job_from_dict(json.loads(line)))
            except (ValueError, TypeError, KeyError) as e:
                raise LsdbError(f"{path}:{number}: not a job ({e})") from None
    return jobs


def run_manifest(store_root: Path, path: Path, shard: tuple[int, int] = (0, 1), device: str | None = None,
                 on_done=None) -> dict[str, int]:
    """Run this worker's share of the manifest (every n-th job from i); returns counts by state."""
    i, n = shard
    if not 0 <= i < n:
        raise LsdbError(f"--shard {i}/{n}: need 0 <= i < n")
    done = {s.name[len("job-"):] for d in (Path(store_root) / "spool", Path(store_root) / "spool" / "ingested")
            if d.exists() for s in d.iterdir() if s.name.startswith("job-")}
    counts: dict[str, int] = {}
    for k, job in enumerate(read_manifest(path)):
        if k % n != i or job.id in done:
            continue
        meta = run_probe_job(str(store_root), job, device)
        counts[meta["state"]] = counts.get(meta["state"], 0) + 1
        if on_done:
            on_done(meta)
    return counts
