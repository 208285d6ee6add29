"""Job manifests: probe jobs as JSON lines, so any machine that sees the store directory can run
them (``lsdb worker``) and the coordinator ingests the shards (``lsdb ingest``). This is the
batch-job executor: a cluster scheduler only has to start ``lsdb worker MANIFEST --shard i/n``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lsdb.errors import LsdbError
from lsdb.probes.base import CheckpointRef, RunRef, dataclass_from_dict
from lsdb.probes.executors import free_cores
from lsdb.probes.worker import JobSpec, run_probe_job
from lsdb.spec import DataSpec, ModelSpec
from lsdb.spool import read_meta, shard_key


def job_to_dict(job: JobSpec) -> dict:
    return dataclasses.asdict(job)


def job_from_dict(d: dict) -> JobSpec:
    d = dict(d)
    d["checkpoints"] = tuple(CheckpointRef(**c) for c in d["checkpoints"])
    d["runs"] = tuple(RunRef(**{**r, "checkpoints": tuple(CheckpointRef(**c) for c in r["checkpoints"]),
                                "task_classes": tuple(r.get("task_classes", ()))})
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


def _finished_jobs(spool: Path) -> set[str]:
    """Jobs with a done or skipped shard in the spool or its log (a failed one is retried)."""
    out = set()
    for folder in (spool, spool / "ingested"):
        if not folder.exists():
            continue
        for s in folder.iterdir():
            if s.name.startswith("job-"):
                try:
                    if read_meta(s)["job"]["state"] in ("done", "skipped"):
                        out.add(shard_key(s)[len("job-"):])
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # ingest judges a damaged shard; here it just does not count
    return out


def run_manifest(store_root: Path, path: Path, shard: tuple[int, int] = (0, 1), device: str | None = None,
                 on_done=None) -> dict[str, int]:
    """Run this worker's share of the manifest (every n-th job from i); returns counts by state."""
    i, n = shard
    if not 0 <= i < n:
        raise LsdbError(f"--shard {i}/{n}: need 0 <= i < n")
    import torch

    torch.set_num_threads(free_cores())  # as lsdb run's executors do: the cores free now
    done = _finished_jobs(Path(store_root) / "spool")
    counts: dict[str, int] = {}
    for k, job in enumerate(read_manifest(path)):
        if k % n != i or job.id in done:
            continue
        meta = run_probe_job(str(store_root), job, device)
        counts[meta["state"]] = counts.get(meta["state"], 0) + 1
        if on_done:
            on_done(meta)
    return counts
