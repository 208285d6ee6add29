"""``lsdb submit --slurm``: a spec as three chained Slurm jobs, from plain templates.

1. ``train.sbatch``: ``lsdb run SPEC --no-probes`` (every run and child), then
   ``lsdb plan SPEC --manifest jobs.jsonl`` (the probe jobs, now that the checkpoints exist);
2. ``probe.sbatch``, an array of N tasks after (1) succeeds: task i runs
   ``lsdb worker jobs.jsonl --shard i/N``, writing shards to the store's spool only;
3. ``finish.sbatch`` after every task of (2) ends: ``lsdb run SPEC``, the one process that opens
   the database: it ingests the shards, then runs what is left (probes that read other probes'
   results, jobs a killed task never finished).

``submit.sh`` chains them with ``sbatch --dependency``. Every node must see the store directory
and run the same Python (the scripts call this interpreter by its absolute path). Slurm requeues
and duplicate tasks are safe: shards have unique names and ingest keeps one row per job.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from lsdb.errors import LsdbError

MAX_ARRAY = 100_000  # Slurm's own MaxArraySize is lower on most clusters; sbatch says so


@dataclass(frozen=True)
class SlurmPlan:
    spec: Path
    store: Path
    folder: Path  # where the scripts, the manifest and the logs go
    array_size: int = 4
    gpus: int = 0
    cpus: int = 2
    time: str = "04:00:00"
    partition: str | None = None


def scripts(plan: SlurmPlan) -> dict[str, str]:
    """File name -> text of every script ``submit`` writes."""
    if not 1 <= plan.array_size <= MAX_ARRAY:
        raise LsdbError(f"--array-size {plan.array_size}: must be in [1, {MAX_ARRAY}]")
    if plan.gpus < 0 or plan.cpus < 1:
        raise LsdbError("--gpus must be >= 0 and --cpus >= 1")
    lsdb = f"{shlex.quote(sys.executable)} -m lsdb"
    spec, store, folder = (shlex.quote(str(p.resolve())) for p in (plan.spec, plan.store, plan.folder))
    manifest = shlex.quote(str((plan.folder / "jobs.jsonl").resolve()))
    device = "cuda" if plan.gpus else "cpu"
    n = plan.array_size
    return {
        "train.sbatch": _job(plan, "train", [
            f"{lsdb} run {spec} --store {store} --no-probes --no-progress",
            f"{lsdb} plan {spec} --store {store} --manifest {manifest}",
        ]),
        "probe.sbatch": _job(plan, "probe", [
            f"{lsdb} worker {manifest} --store {store} --shard \"${{SLURM_ARRAY_TASK_ID}}/{n}\" --device {device}",
        ], array=n),
        "finish.sbatch": _job(plan, "finish", [f"{lsdb} run {spec} --store {store} --no-progress"]),
        "submit.sh": "\n".join([
            "#!/usr/bin/env bash",
            f"# lsdb submit: {plan.spec.name} into {plan.store} as three chained Slurm jobs (see lsdb/submit.py)",
            "set -euo pipefail",
            f"cd {folder}",
            "train=$(sbatch --parsable train.sbatch)",
            "probe=$(sbatch --parsable --dependency=afterok:${train} probe.sbatch)",
            "finish=$(sbatch --parsable --dependency=afterany:${probe} finish.sbatch)",
            'echo "submitted: train ${train}, probe ${probe} (array), finish ${finish}"',
            "",
        ]),
    }


def _job(plan: SlurmPlan, name: str, commands: list[str], array: int | None = None) -> str:
    folder = plan.folder.resolve()
    lines = ["#!/usr/bin/env bash", f"#SBATCH --job-name=lsdb-{name}-{_safe(plan.spec.stem)}",
             f"#SBATCH --output={folder}/logs/{name}-%A_%a.out" if array else
             f"#SBATCH --output={folder}/logs/{name}-%j.out",
             f"#SBATCH --cpus-per-task={plan.cpus}", f"#SBATCH --time={plan.time}"]
    if array:
        lines.append(f"#SBATCH --array=0-{array - 1}")
    if plan.gpus and name == "probe":
        lines.append(f"#SBATCH --gpus={plan.gpus}")
    if plan.partition:
        lines.append(f"#SBATCH --partition={_safe(plan.partition)}")
    lines += ["set -euo pipefail"]
    path = os.environ.get("LSDB_PATH")
    if path:  # user factories must import on every node
        lines.append(f"export LSDB_PATH={shlex.quote(path)}")
    return "\n".join(lines + commands + [""])


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)[:64]


def write(plan: SlurmPlan) -> Path:
    """Write the scripts (and a logs folder) into ``plan.folder``; returns ``submit.sh``."""
    (plan.folder / "logs").mkdir(parents=True, exist_ok=True)
    for name, text in scripts(plan).items():
        path = plan.folder / name
        path.write_text(text)
        path.chmod(0o755)
    return plan.folder / "submit.sh"


def submit(plan: SlurmPlan) -> str:
    """Write the scripts and run ``submit.sh``; returns what it printed."""
    script = write(plan)
    if shutil.which("sbatch") is None:
        raise LsdbError(f"sbatch not found on this machine; the scripts are in {plan.folder}: "
                        f"run bash {script} on the cluster's login node")
    done = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    if done.returncode != 0:
        first = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[0]
        raise LsdbError(f"sbatch refused the jobs ({first}); the scripts are in {plan.folder}")
    return done.stdout.strip()
