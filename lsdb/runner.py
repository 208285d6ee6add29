"""``lsdb plan`` and ``lsdb run``: make the store hold everything a spec declares.

Order of work: take the store's lock (before the database is opened for writing); clean what
killed processes left half-written; ingest whatever an interrupted run left in the spool; record
the experiment and its runs (as a shard, so the ingested log can rebuild the database); verify
every stored checkpoint of the spec's runs against its hash; train what is missing or damaged
(parents, then children from the parents' spawn checkpoints; a run resumes from its nearest
intact checkpoint, which gives bit-identical weights); then probe jobs, re-planning until no
probe asks for more. The database is opened read-write only for short ingest transactions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from lsdb import faults
from lsdb.errors import LsdbError
from lsdb.ids import job_id
from lsdb.ingest.ingest import REASON_FILE, REJECTED, ingest
from lsdb.ingest.record import record_experiment
from lsdb.spool import clean_temporaries, write_checkpoint_shard, write_status_shard
from lsdb.plan import (MAX_ATTEMPTS, PlannedRun, check_memory, check_scopes, expand_runs, memory_estimates, probe_jobs,
                       probe_requests, simulated_study, stored_study)
from lsdb.probes.executors import make_executor
from lsdb.probes.worker import run_probe_job
from lsdb.progress import PROBE, TRAIN, Progress
from lsdb.spec import Spec
from lsdb.store import Store
from lsdb.integrity import damaged_checkpoints

INGEST_EVERY_S = 2.0
ENDED = ("finished", "diverged", "skipped")


@dataclass
class PlanSummary:
    experiment_id: str
    runs_total: int
    runs_to_train: list[PlannedRun]
    checkpoints_missing: int
    jobs_missing: int
    jobs_by_probe: dict[str, int]
    jobs_given_up: int = 0
    checkpoints_damaged: int = 0

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
    failures: list[str] = field(default_factory=list)  # probe jobs that failed in this run
    given_up: list[str] = field(default_factory=list)  # jobs that failed MAX_ATTEMPTS times, not retried
    problems: list[str] = field(default_factory=list)  # checkpoints that could not be restored
    rejected: list[str] = field(default_factory=list)  # shards set aside in spool/rejected/, with the reason
    diverged: list[str] = field(default_factory=list)
    repaired: int = 0  # stored checkpoints whose damaged or lost files were retrained
    seconds: float = 0.0
    nothing_to_do: bool = False

    @property
    def ok(self) -> bool:
        """False when any job failed or was given up, or a checkpoint could not be restored."""
        return not (self.failures or self.given_up or self.problems or self.rejected)


def _n_train(spec: Spec) -> int:
    from lsdb.train.data import load_data

    return load_data(spec.data).x_train.shape[0]


@dataclass
class _State:
    """What the store holds for a spec's runs, read in one short read."""

    status: dict[str, str]
    steps: dict[str, dict[int, tuple[str, str, str]]]  # run -> step -> (checkpoint id, sha, optimiser sha)
    jobs: dict[str, tuple[str, int, str | None]]  # job id -> (state, attempts, error)


def _state(store: Store, runs: list[PlannedRun]) -> _State:
    ids = [r.id for r in runs]
    with store.read() as con:
        status = dict(con.execute("SELECT id, status FROM run WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall())
        steps: dict[str, dict[int, tuple[str, str, str]]] = {}
        for rid, step, cid, sha, opt in con.execute(
            "SELECT run_id, step, id, sha256, optimizer_sha256 FROM checkpoint "
            "WHERE run_id IN (SELECT unnest(?::VARCHAR[]))", [ids]
        ).fetchall():
            steps.setdefault(rid, {})[step] = (cid, sha, opt)
        jobs = {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT id, state, attempts, error FROM probe_job").fetchall()}
    return _State(status, steps, jobs)


def needed_steps(r: PlannedRun, state: _State, damaged: dict[str, str]) -> list[int]:
    """Steps of ``r``'s schedule the store lacks or holds damaged. A diverged run can only fill in
    steps before it diverged; a skipped one none."""
    st = state.status.get(r.id, "planned")
    stored = state.steps.get(r.id, {})
    usable = {s for s, (cid, _, _) in stored.items() if cid not in damaged}
    need = [s for s in r.save_steps if s not in usable]
    if st == "skipped":
        return []
    if st == "diverged":
        last = max(stored, default=-1)
        need = [s for s in need if s <= last]
    return need


def plan(spec: Spec, store: Store, damaged: dict[str, str] | None = None) -> PlanSummary:
    """What `lsdb run` would do now, without doing it (a store that does not exist yet is empty)."""
    runs = expand_runs(spec, _n_train(spec))
    exists = store.db_path.exists()
    state = _state(store, runs) if exists else _State({}, {}, {})
    if damaged is None:
        damaged = damaged_checkpoints(store, [r.id for r in runs]) if exists else {}
    needs = {r.id: needed_steps(r, state, damaged) for r in runs}
    to_train = [r for r in runs if needs[r.id] or state.status.get(r.id) not in ENDED]
    missing_ckpts = sum(len(n) for n in needs.values())
    steps = {rid: {s: v[0] for s, v in by.items()} for rid, by in state.steps.items()}
    if exists:
        with store.read() as con:  # stored results let dependent probes (kernel distances) plan too
            requests = probe_requests(spec, simulated_study(runs, state.status, steps, con, needs))
    else:
        requests = probe_requests(spec, simulated_study(runs))
    missing, given_up = _sort_jobs(requests, state.jobs)
    return PlanSummary(spec.identity(), len(runs), to_train, missing_ckpts, sum(missing.values()), missing,
                       len(given_up), len(damaged))


def _sort_jobs(requests, jobs: dict) -> tuple[dict[str, int], list[str]]:
    """The requested jobs still to do, counted by probe, and those given up (failed MAX_ATTEMPTS
    times: rerunning would only fail again), each as "<probe> job <id>: <first line of its error>"."""
    missing: dict[str, int] = {}
    given_up = []
    for name, version, _params, phash, req in requests:
        jid = job_id(name, version, phash, req.checkpoint_ids, req.role)
        st, attempts, error = jobs.get(jid, ("", 0, None))
        if st == "failed" and attempts >= MAX_ATTEMPTS:
            given_up.append(f"{name} job {jid[:12]}: {error.splitlines()[0] if error else 'failed'}")
        elif st not in ("done", "skipped"):
            missing[name] = missing.get(name, 0) + 1
    return missing, given_up


def given_up_jobs(spec: Spec, store: Store, runs: list[PlannedRun]) -> list[str]:
    """The spec's jobs that were given up (see ``_sort_jobs``; `lsdb jobs --failed` shows them whole)."""
    state = _state(store, runs)
    with store.read() as con:
        return _sort_jobs(probe_requests(spec, stored_study(runs, con)), state.jobs)[1]


def ready_jobs(spec: Spec, store: Store, runs: list[PlannedRun] | None = None, probe_sha: str | None = None) -> list:
    """Probe jobs that can run now (their checkpoints and inputs exist): for a manifest, and for
    each pass of `lsdb run`."""
    runs = runs if runs is not None else expand_runs(spec, _n_train(spec))
    probe_sha = probe_sha or experiment_probe_set(store, spec)
    with store.read() as con:  # the study reads stored results lazily, so plan inside the read
        study = stored_study(runs, con)
        states = {r[0]: (r[1], r[2], r[3]) for r in con.execute("SELECT id, state, attempts, error FROM probe_job").fetchall()}
        return probe_jobs(spec, study, runs, probe_sha, states)


def run(spec: Spec, store: Store, workers: int = 1, device: str | None = None,
        progress: str | bool | None = None, probes: bool = True, executor: str | None = None,
        address: str | None = None, gpus_per_job: float | None = None) -> RunSummary:
    """Train and probe everything missing. Safe to interrupt at any point and rerun.

    ``executor``: "inline", "process" (a pool of ``workers``) or "ray" (default: inline for one
    worker, else process); ``address`` and ``gpus_per_job`` are Ray's: see
    ``lsdb.probes.ray_executor``.

    ``progress`` (on stderr): None or False is silent (the default); "bars" draws progress bars;
    "lines" prints a plain line every 10 % or 30 s and at each phase end (for logs and CI);
    "auto" or True picks bars on a terminal and lines otherwise.

    Check ``summary.ok``: failed, given-up jobs and unrestorable checkpoints are listed in the
    summary, not raised."""
    t0 = time.perf_counter()
    summary = RunSummary()
    store = Store(store.root.resolve())  # tasks carry the path: workers may start elsewhere (Ray)
    if probes and spec.probes:  # refuse now what every job would fail on, before anything trains
        check_scopes(spec)
        if executor in (None, "inline", "process"):  # a cluster's workers have their own memory
            check_memory(memory_estimates(spec), device)
    with store.lock():  # before the database is opened for writing: a second run fails at once
        store.create()
        rejected_before = _rejected(store)
        clean_temporaries(store)
        ingest(store)
        runs = expand_runs(spec, _n_train(spec))
        record_experiment(spec, store, runs)
        faults.point("recorded")
        damaged = damaged_checkpoints(store, [r.id for r in runs])
        todo = plan(spec, store, damaged)
        if todo.nothing_to_do:
            summary.nothing_to_do = True
            summary.given_up = given_up_jobs(spec, store, runs)
            summary.rejected = _newly_rejected(store, rejected_before)
            summary.seconds = time.perf_counter() - t0
            return summary
        pool = make_executor(workers, executor, address, gpus_per_job)
        bars = Progress(progress, {TRAIN: len(todo.runs_to_train), PROBE: todo.jobs_missing if probes else 0})
        try:
            with bars:
                _train_all(store, runs, pool, summary, bars, damaged)
                if probes:
                    _probe_all(spec, store, runs, pool, summary, bars, device)
        finally:
            pool.close()
        ingest(store)
        if probes:
            summary.given_up = given_up_jobs(spec, store, runs)
        summary.rejected = _newly_rejected(store, rejected_before)
    summary.seconds = time.perf_counter() - t0
    return summary


def _rejected(store: Store) -> dict[str, str]:
    """Shards set aside in spool/rejected/, with the reason each was refused."""
    folder = store.spool / REJECTED
    out = {}
    for p in folder.iterdir() if folder.exists() else ():
        try:
            out[p.name] = (p / REASON_FILE).read_text().strip()
        except OSError:
            out[p.name] = "no reason recorded"
    return out


def _newly_rejected(store: Store, before: dict[str, str]) -> list[str]:
    return [f"{name}: {why}" for name, why in sorted(_rejected(store).items()) if name not in before]


def experiment_probe_set(store: Store, spec: Spec) -> str:
    with store.read() as con:
        row = con.execute("SELECT probe_set_sha256 FROM experiment WHERE id = ?", [spec.identity()]).fetchone()
    if row is None:
        raise LsdbError(f"experiment {spec.name} is not recorded in {store.root}; train it first: lsdb run SPEC --no-probes")
    return row[0]


# ---------------------------------------------------------------------------------- training

def _train_all(store: Store, runs: list[PlannedRun], executor, summary: RunSummary, bars,
               damaged: dict[str, str]) -> None:
    damaged = dict(damaged)
    for _wave in range(3):  # parents, then children (whose spawn checkpoints now exist)
        state = _state(store, runs)
        tasks = [t for t in (_train_task(store, r, state, damaged) for r in runs) if t is not None]
        if not tasks:
            break
        bars.begin(TRAIN, len(tasks))
        for result in _drain(store, executor, _train_entry, [(t,) for t in tasks], bars, TRAIN):
            summary.trained += 1
            summary.checkpoints += len(result["saved"])
            summary.problems += result["problems"]
            summary.repaired += sum(damaged.pop(cid, None) is not None for cid in result["saved"])
            if result["status"] == "diverged" and result["emitted"]:
                summary.diverged.append(f"{result['run_id']}: {result['diverged_reason']} at step {result['diverged_step']}")
    bars.end(TRAIN)
    _skip_orphans(store, runs)


def _skip_orphans(store: Store, runs: list[PlannedRun]) -> None:
    """Children whose parent diverged before their spawn time can never start: say so once."""
    state = _state(store, runs)
    orphans = [r.id for r in runs if r.parent_id and state.status.get(r.id) == "planned"
               and state.status.get(r.parent_id) == "diverged" and r.spawn_step not in state.steps.get(r.parent_id, {})]
    for rid in orphans:
        write_status_shard(store.spool, rid, "skipped", reason="parent diverged before the spawn time")
    if orphans:
        ingest(store)


def _train_task(store: Store, r: PlannedRun, state: _State, damaged: dict[str, str]):
    """The training that brings ``r`` up to its schedule, or None (nothing to do, or waiting for
    its parent's spawn checkpoint)."""
    from lsdb.train.trainer import TrainTask

    st = state.status.get(r.id)
    if st is None:
        return None
    need = needed_steps(r, state, damaged)
    ended = st in ENDED
    if ended and not need:
        return None
    first = min(need) if need else r.total_steps
    start = _resume_point(r, state, damaged, first)
    if start is None:
        return None  # the parent has not reached the spawn time (yet, or it diverged before)
    stored = state.steps.get(r.id, {})
    expected = {s: (stored[s][1], stored[s][2]) for s in need if s in stored}
    step, weights, opt_id, opt_sha, inherited = start
    f = r.finetune
    task = {} if f is None else dict(task_classes=f.classes, task_fraction=f.train_fraction, task_seed=f.fraction_seed)
    return TrainTask(store_root=str(store.root), run_id=r.id, config=r.config, seed=r.seed, data_seed=r.data_seed,
                     steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps, save_steps=tuple(need),
                     lr_factor=r.lr_factor, checkpoint_ids=r.checkpoint_ids, start_step=step, start_weights=weights,
                     start_optimizer=opt_id, start_optimizer_sha=opt_sha, save_start=inherited,
                     stop_step=max(need) if ended else None, expected=expected, **task)


def _resume_point(r: PlannedRun, state: _State, damaged: dict[str, str], first_needed: int):
    """The latest intact point at or before ``first_needed`` to train from: (step, weights sha,
    optimiser checkpoint id, optimiser sha, inherited); weights None = a fresh initialisation at
    step 0; inherited = the weights are the parent's (a fine-tune's base), which the run saves as
    its own checkpoint at that step when its schedule has it.

    A child continues its parent's trajectory, momentum included. A fine-tune starts at its own
    step 0 from the base's weights with a fresh optimiser: it is a new task at a new learning
    rate, and the parent's momentum would first push on along the parent's task for about
    1/(1 − momentum) steps (fine-tuning starts its optimiser afresh, as in Ilharco et al. 2023)."""
    candidates = [(s, sha, cid, opt, False) for s, (cid, sha, opt) in state.steps.get(r.id, {}).items()
                  if cid not in damaged]
    if r.parent_id is None:
        candidates.append((0, None, None, None, False))
    else:
        spawn = state.steps.get(r.parent_id, {}).get(r.spawn_step)
        if spawn is not None and spawn[0] not in damaged:
            if r.kind == "finetune":
                candidates.append((0, spawn[1], None, None, True))
            else:
                candidates.append((r.spawn_step, spawn[1], spawn[0], spawn[2], True))
    candidates = [c for c in candidates if c[0] <= first_needed]
    if not candidates:
        return None
    # the run's own checkpoint before an inherited one at the same step
    return max(candidates, key=lambda c: (c[0], c[1] is not None, not c[4]))


def _train_entry(task) -> dict:
    from lsdb.train.trainer import run_training

    spool = Path(task.store_root) / "spool"
    saved: list[str] = []
    emitted = []

    def emit(kind, payload):
        if kind == "checkpoint":
            saved.append(payload["id"])
            write_checkpoint_shard(spool, payload)
            faults.point("checkpoint_shard")
        else:
            emitted.append(payload["status"])
            write_status_shard(spool, payload["run_id"], payload["status"], payload["diverged_step"],
                               payload["diverged_reason"])

    status = run_training(task, emit)
    return {**status, "saved": saved, "emitted": bool(emitted)}


# ------------------------------------------------------------------------------------ probes

def _probe_all(spec, store, runs, executor, summary: RunSummary, bars, device) -> None:
    if not spec.probes:
        return
    probe_sha = experiment_probe_set(store, spec)
    attempted: set[str] = set()
    for _ in range(10):  # re-plan until no probe asks for more (dependent probes need a pass each)
        # one attempt per job per `lsdb run`
        ready = [j for j in ready_jobs(spec, store, runs, probe_sha) if j.id not in attempted]
        if not ready:
            break
        attempted.update(j.id for j in ready)
        bars.begin(PROBE, len(ready))
        for meta in _drain(store, executor, run_probe_job, [(str(store.root), j, device) for j in ready], bars, PROBE):
            if meta["state"] == "done":
                summary.jobs_done += 1
            elif meta["state"] == "skipped":
                summary.jobs_skipped += 1
            else:
                summary.jobs_failed += 1
                summary.failures.append(f"{meta['probe']} job {meta['id'][:10]}: {meta['error'].splitlines()[0]}")
    bars.end(PROBE)


def _drain(store: Store, executor, fn, tasks: list[tuple], bars, phase: str):
    """Yield each task's result as it completes, ingesting the spool every few seconds (short
    write transactions, so readers get in between) and once at the end."""
    last = time.monotonic()
    try:
        for result in executor.map(fn, tasks):
            faults.point("task_done")
            yield result
            bars.advance(phase)
            if time.monotonic() - last > INGEST_EVERY_S:
                ingest(store)
                last = time.monotonic()
    finally:  # also when a worker died: keep everything that finished
        ingest(store)
