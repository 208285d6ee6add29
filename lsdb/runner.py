"""``lsdb plan`` and ``lsdb run``: make the store hold everything a spec declares.

Order of work: ingest whatever an interrupted run left in the spool; record the experiment and
its runs; train parents, then children from the parents' spawn checkpoints (resuming any run
from its last stored checkpoint); then probe jobs, re-planning until no probe asks for more
(so a probe that needs another's results runs once those exist). The database is opened
read-write only for short ingest transactions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lsdb.errors import LsdbError
from lsdb.plan import (MAX_ATTEMPTS, PlannedRun, expand_runs, probe_jobs, probe_requests, run_row,
                       simulated_study, stored_study)
from lsdb.spec import Spec
from lsdb.store import Store, utcnow

INGEST_EVERY_S = 2.0


@dataclass
class PlanSummary:
    experiment_id: str
    runs_total: int
    runs_to_train: list[PlannedRun]
    checkpoints_missing: int
    jobs_missing: int
    jobs_by_probe: dict[str, int]
    jobs_given_up: int = 0

    @property
    def nothing_to_do(self) -> bool:
        return not self.runs_to_train and self.jobs_missing == 0 and self.checkpoints_missing == 0


@dataclass
class RunSummary:
    trained: int = 0
    checkpoints: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_skipped: int = 0
    failures: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    nothing_to_do: bool = False


def _n_train(spec: Spec) -> int:
    from lsdb.train.data import load_data

    return load_data(spec.data).x_train.shape[0]


def _state(store: Store, runs: list[PlannedRun]):
    """(run statuses, stored steps per run, job states) read in one short read."""
    ids = [r.id for r in runs]
    with store.read() as con:
        status = dict(con.execute("SELECT id, status FROM run WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall())
        steps: dict[str, dict[int, tuple[str, str]]] = {}
        for rid, step, cid, sha in con.execute(
            "SELECT run_id, step, id, sha256 FROM checkpoint WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
        ).fetchall():
            steps.setdefault(rid, {})[step] = (cid, sha)
        jobs = {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT id, state, attempts, error FROM probe_job").fetchall()}
    return status, steps, jobs


def plan(spec: Spec, store: Store) -> PlanSummary:
    """What `lsdb run` would do now, without doing it (a store that does not exist yet is empty)."""
    from lsdb.probes.base import job_id

    runs = expand_runs(spec, _n_train(spec))
    exists = store.db_path.exists()
    status, steps, jobs = _state(store, runs) if exists else ({}, {}, {})
    to_train = [r for r in runs if status.get(r.id) not in ("finished", "diverged", "skipped")]
    missing_ckpts = sum(len(set(r.save_steps) - set(steps.get(r.id, {}))) for r in to_train)
    if exists:
        with store.read() as con:  # stored results let dependent probes (kernel distances) plan too
            requests = probe_requests(spec, simulated_study(runs, status, steps, con))
    else:
        requests = probe_requests(spec, simulated_study(runs))
    by_probe: dict[str, int] = {}
    given_up = 0
    for name, version, _params, phash, req in requests:
        state, attempts, _error = jobs.get(job_id(name, version, phash, req.checkpoint_ids, req.role), ("", 0, None))
        if state == "failed" and attempts >= MAX_ATTEMPTS:
            given_up += 1  # `lsdb jobs --failed` shows why; rerunning would only fail again
        elif state not in ("done", "skipped"):
            by_probe[name] = by_probe.get(name, 0) + 1
    return PlanSummary(spec.identity(), len(runs), to_train, missing_ckpts, sum(by_probe.values()), by_probe,
                       given_up)


def ready_jobs(spec: Spec, store: Store, runs: list[PlannedRun] | None = None, probe_sha: str | None = None) -> list:
    """Probe jobs that can run now (their checkpoints and inputs exist): for a manifest, and for
    each pass of `lsdb run`."""
    runs = runs if runs is not None else expand_runs(spec, _n_train(spec))
    probe_sha = probe_sha or experiment_probe_set(store, spec)
    with store.read() as con:  # the study reads stored results lazily, so plan inside the read
        study = stored_study(runs, con)
        states = {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT id, state, attempts, error FROM probe_job").fetchall()}
        return probe_jobs(spec, study, runs, probe_sha, states)


def run(spec: Spec, store: Store, workers: int = 1, device: str | None = None, progress: bool = False,
        probes: bool = True) -> RunSummary:
    """Train and probe everything missing. Safe to interrupt at any point and rerun."""
    from lsdb.ingest.ingest import ingest
    from lsdb.probes.executors import make_executor

    t0 = time.perf_counter()
    summary = RunSummary()
    from lsdb.ingest.spool import clean_temporaries

    with store.lock():
        clean_temporaries(store.spool)
        ingest(store)
        if plan(spec, store).nothing_to_do:
            summary.nothing_to_do = True
            return summary
        runs = expand_runs(spec, _n_train(spec))
        _record_experiment(spec, store, runs)
        executor = make_executor(workers)
        bars = _Progress(progress)
        try:
            with bars:
                _train_all(store, runs, executor, summary, bars)
                if probes:
                    _probe_all(spec, store, runs, executor, summary, bars, device)
        finally:
            executor.close()
        ingest(store)
    summary.seconds = time.perf_counter() - t0
    return summary


# --------------------------------------------------------------------------------- recording

def _record_experiment(spec: Spec, store: Store, runs: list[PlannedRun]) -> None:
    import sqlalchemy as sa

    from lsdb.schema import Run
    from lsdb.train.data import load_data, probe_indices
    from lsdb.train.models import build_model, num_params

    data = load_data(spec.data)
    indices = probe_indices(data, spec.data.probe_set_size, spec.data.probe_set_seed)
    probe_sha = store.artifacts().put(indices.numpy())
    sizes = {}
    for r in runs:
        key = r.config.model
        if key not in sizes:
            sizes[key] = num_params(build_model(key, data.input_shape, data.num_classes))
    with store.write() as conn:
        conn.execute(sa.text("INSERT INTO experiment BY NAME SELECT * FROM (SELECT :id AS id, :name AS name, "
                             ":toml AS spec_toml, :ds AS dataset, :n AS probe_set_size, :seed AS probe_set_seed, "
                             ":sha AS probe_set_sha256, :at AS created_at) ON CONFLICT DO NOTHING"),
                     dict(id=spec.identity(), name=spec.name, toml=_spec_text(spec), ds=spec.data.name,
                          n=spec.data.probe_set_size, seed=spec.data.probe_set_seed, sha=probe_sha, at=utcnow()))
        existing = {r[0] for r in conn.execute(sa.select(Run.id)).all()}
        new = [run_row(r, spec.identity(), sizes[r.config.model]) for r in runs if r.id not in existing]
        for kind_is_parent in (True, False):  # parents first: children reference them
            rows = [r for r in new if (r["parent_run_id"] is None) == kind_is_parent]
            if rows:
                conn.execute(sa.insert(Run), rows)


def _spec_text(spec: Spec) -> str:
    src = Path(spec.source) if spec.source and not spec.source.startswith("<") else None
    if src and src.exists():
        return src.read_text()
    import json

    return json.dumps(spec.canonical(), sort_keys=True)


def experiment_probe_set(store: Store, spec: Spec) -> str:
    with store.read() as con:
        row = con.execute("SELECT probe_set_sha256 FROM experiment WHERE id = ?", [spec.identity()]).fetchone()
    if row is None:
        raise LsdbError(f"experiment {spec.name} is not recorded in {store.root}; train it first: lsdb run SPEC --no-probes")
    return row[0]


# ---------------------------------------------------------------------------------- training

def _train_all(store: Store, runs: list[PlannedRun], executor, summary: RunSummary, bars) -> None:
    task_bar = None
    for wave in range(3):  # parents, then children (whose spawn checkpoints now exist)
        status, steps, _ = _state(store, runs)
        tasks = [t for t in (_train_task(store, r, status, steps) for r in runs) if t is not None]
        if not tasks:
            break
        task_bar = bars.add_or_extend(task_bar, "training runs", len(tasks))
        for result in _drain(store, executor, _train_entry, [(t,) for t in tasks], bars, task_bar):
            summary.trained += 1
            summary.checkpoints += result["checkpoints"]
            if result["status"] == "diverged":
                summary.diverged.append(f"{result['run_id']}: {result['diverged_reason']} at step {result['diverged_step']}")
    _skip_orphans(store, runs)


def _skip_orphans(store: Store, runs: list[PlannedRun]) -> None:
    """Children whose parent diverged before their spawn time can never start: say so once."""
    status, steps, _ = _state(store, runs)
    orphans = [r.id for r in runs if r.parent_id and status.get(r.id) == "planned"
               and status.get(r.parent_id) == "diverged" and r.spawn_step not in steps.get(r.parent_id, {})]
    if orphans:
        with store.write() as conn:
            conn.connection.driver_connection.execute(
                "UPDATE run SET status = 'skipped', diverged_reason = 'parent diverged before the spawn time' "
                "WHERE id IN (SELECT unnest(?::VARCHAR[]))", [orphans])


def _train_task(store: Store, r: PlannedRun, status: dict, steps: dict):
    from lsdb.train.trainer import TrainTask

    if r.id not in status or status[r.id] in ("finished", "diverged", "skipped"):
        return None
    stored = steps.get(r.id, {})
    common = dict(store_root=str(store.root), run_id=r.id, config=r.config, seed=r.seed, data_seed=r.data_seed,
                  steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps, save_steps=r.save_steps,
                  lr_factor=r.lr_factor, checkpoint_ids=r.checkpoint_ids)
    if stored:  # resume from the last stored checkpoint
        last = max(stored)
        cid, sha = stored[last]
        return TrainTask(**common, start_step=last, start_weights=sha, start_optimizer=f"{cid}.optim.safetensors")
    if r.parent_id is None:
        return TrainTask(**common)
    parent_steps = steps.get(r.parent_id, {})
    if r.spawn_step not in parent_steps:
        return None  # the parent has not reached the spawn time (yet, or it diverged before)
    cid, sha = parent_steps[r.spawn_step]
    return TrainTask(**common, start_step=r.spawn_step, start_weights=sha, start_optimizer=f"{cid}.optim.safetensors")


def _train_entry(task) -> dict:
    from lsdb.ingest.spool import write_checkpoint_shard, write_status_shard
    from lsdb.train.trainer import run_training

    spool = Path(task.store_root) / "spool"
    count = {"n": 0}

    def emit(kind, payload):
        if kind == "checkpoint":
            count["n"] += 1
            write_checkpoint_shard(spool, payload)
        else:
            write_status_shard(spool, payload["run_id"], payload["status"], payload["diverged_step"],
                               payload["diverged_reason"])

    status = run_training(task, emit)
    return {**status, "checkpoints": count["n"]}


# ------------------------------------------------------------------------------------ probes

def _probe_all(spec, store, runs, executor, summary: RunSummary, bars, device) -> None:
    from lsdb.probes.worker import run_probe_job

    if not spec.probes:
        return
    probe_sha = experiment_probe_set(store, spec)
    job_bar = None
    attempted: set[str] = set()
    for _ in range(10):  # re-plan until no probe asks for more (dependent probes need a pass each)
        # one attempt per job per `lsdb run`
        ready = [j for j in ready_jobs(spec, store, runs, probe_sha) if j.id not in attempted]
        if not ready:
            break
        attempted.update(j.id for j in ready)
        job_bar = bars.add_or_extend(job_bar, "probe jobs", len(ready))
        for meta in _drain(store, executor, run_probe_job, [(str(store.root), j, device) for j in ready], bars, job_bar):
            if meta["state"] == "done":
                summary.jobs_done += 1
            elif meta["state"] == "skipped":
                summary.jobs_skipped += 1
            else:
                summary.jobs_failed += 1
                summary.failures.append(f"{meta['probe']} job {meta['id'][:10]}: {meta['error'].splitlines()[0]}")


def _drain(store: Store, executor, fn, tasks: list[tuple], bars, bar):
    """Yield each task's result as it completes, ingesting the spool every few seconds (short
    write transactions, so readers get in between) and once at the end."""
    from lsdb.ingest.ingest import ingest

    last = time.monotonic()
    try:
        for result in executor.map(fn, tasks):
            yield result
            bars.advance(bar)
            if time.monotonic() - last > INGEST_EVERY_S:
                ingest(store)
                last = time.monotonic()
    finally:  # also when a worker died: keep everything that finished
        ingest(store)


class _Progress:
    """Rich progress bars (runs trained, jobs done, ETA) when asked for; silent otherwise."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.progress = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                       TimeRemainingColumn)

            self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                     TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=False)
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def add_or_extend(self, task, name, more):
        """A new bar the first time, then a longer total for the same bar."""
        if self.progress is None:
            return None
        if task is None:
            return self.progress.add_task(name, total=more)
        self.progress.update(task, total=self.progress.tasks[task].total + more)
        return task

    def advance(self, task):
        if self.progress is not None:
            self.progress.advance(task)

