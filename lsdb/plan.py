"""``plan``: a pure function of (spec, store) → what is missing.

Runs, checkpoints and probe jobs all have content-derived ids, so the plan can name every
checkpoint a finished study will hold before any training happens, and rerunning a finished spec
plans nothing. This module also loads specs with every registry lsdb knows (``load_spec``), and
refuses specs that ask for more work than could ever finish.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lsdb import spec as specmod
from lsdb.errors import SpecError
from lsdb.ids import checkpoint_id, child_data_seed, child_run_id, job_id, non_default, params_hash, parent_run_id
from lsdb.probes import PARAMS, probe_module
from lsdb.probes.base import CheckpointRef, JobRequest, RunRef, Study, dataclass_from_dict
from lsdb.spec import ProbeSelection, RunConfig, Spec

MAX_ATTEMPTS = 3

# Limits on the work one spec may plan (a spec beyond them is refused with the number it needs).
MAX_STEPS_PER_RUN = 100_000_000
MAX_CHECKPOINTS_PER_RUN = 100_000
MAX_CHECKPOINTS = 10_000_000  # in all, every variant and seed together

#: The [data] keys that shape a run's weights (part of its id); the probe set and ``root`` do not.
TRAINING_DATA_KEYS = ("name", "train_subset")


def catalog() -> specmod.Catalog:
    """Every data set, model and probe a spec may name."""
    from lsdb.train.data import LOADERS
    from lsdb.train.models import MODELS

    return specmod.Catalog(datasets=tuple(LOADERS), models=tuple(MODELS), probes=PARAMS)


def load_spec(path: str | Path) -> Spec:
    """Read a spec file and check every key and value, probe params included (``SpecError``)."""
    return specmod.load_spec(path, catalog())


def parse_spec(text: str, source: str = "<spec>") -> Spec:
    """``load_spec`` for TOML text."""
    return specmod.parse_spec(text, source, catalog=catalog())


@dataclass(frozen=True)
class PlannedRun:
    id: str
    kind: str
    variant: str
    seed: int
    data_seed: int
    config: RunConfig
    steps_per_epoch: int
    total_steps: int
    save_steps: tuple[int, ...]
    parent_id: str | None = None
    spawn_step: int | None = None
    child_index: int | None = None
    lr_factor: float = 1.0

    @property
    def spawn_epoch(self):
        return None if self.spawn_step is None else self.spawn_step / self.steps_per_epoch

    @property
    def checkpoint_ids(self) -> dict[int, str]:
        return {s: checkpoint_id(self.id, s) for s in self.save_steps}

    @property
    def parent_checkpoint_id(self):
        return None if self.parent_id is None else checkpoint_id(self.parent_id, self.spawn_step)


def schedule(cfg: RunConfig, spe: int, total: int) -> list[int]:
    """Steps a run saves: step 0, the end, log-spaced early steps, every k epochs/steps, listed
    epochs and spawn times. Call ``check_work`` first: it bounds the size of this list."""
    c = cfg.checkpoints
    steps = {0, total}
    if c.log_points and c.log_until > 0:
        top = max(1.0, c.log_until * spe)
        steps |= {int(round(s)) for s in np.geomspace(1, top, c.log_points)}
    if c.every_epochs > 0:
        k = 1
        while k * c.every_epochs * spe < total:
            steps.add(int(round(k * c.every_epochs * spe)))
            k += 1
    if c.every_steps > 0:
        steps |= set(range(c.every_steps, total, c.every_steps))
    steps |= {int(round(e * spe)) for e in c.epochs}
    steps |= {int(round(t * spe)) for t in cfg.spawn.times}
    return sorted(s for s in steps if 0 <= s <= total)


def check_work(cfg: RunConfig, spe: int, where: str) -> tuple[int, float]:
    """Refuse a configuration whose training or checkpoint schedule could never finish; returns
    its total steps and a bound on the checkpoints one seed of it holds (parent and children)."""
    total = cfg.optim.epochs * spe
    if total > MAX_STEPS_PER_RUN:
        raise SpecError(f"{where}: optim.epochs = {cfg.optim.epochs:g} at {spe} steps per epoch needs "
                        f"{total:.3g} training steps per run; lsdb plans at most {MAX_STEPS_PER_RUN:,}")
    if int(round(total)) < 1:
        raise SpecError(f"{where}: optim.epochs = {cfg.optim.epochs:g} at {spe} steps per epoch is {total:.3g} "
                        f"training steps, which rounds to none; train for at least one step")
    total = int(round(total))
    c = cfg.checkpoints
    bound = 2 + c.log_points + len(c.epochs) + len(cfg.spawn.times)
    if c.every_epochs > 0:
        bound += total / max(c.every_epochs * spe, 1e-300)
    if c.every_steps > 0:
        bound += total / c.every_steps
    if bound > MAX_CHECKPOINTS_PER_RUN:
        raise SpecError(f"{where}: the [checkpoints] schedule asks for up to {bound:.3g} checkpoints per run "
                        f"({total:,} steps); lsdb plans at most {MAX_CHECKPOINTS_PER_RUN:,}: raise "
                        f"checkpoints.every_epochs / every_steps")
    # a parent and its children: each child keeps the schedule after its spawn (or only its end); a
    # spawn time without children still costs a pass over the schedule
    children = len(set(cfg.spawn.times)) * max(1, cfg.spawn.children + cfg.spawn.lowlr_children)
    per_seed = bound * (1 + children) if cfg.spawn.child_checkpoints == "schedule" else bound + children
    if per_seed > specmod.MAX_CHECKPOINTS_PER_SEED:
        raise SpecError(f"{where}: each seed's parent and {children:,} children would hold up to {per_seed:.3g} "
                        f"checkpoints ({bound:.3g} per run); lsdb plans at most "
                        f"{specmod.MAX_CHECKPOINTS_PER_SEED:,} per seed: raise checkpoints.every_epochs / "
                        f"every_steps, spawn fewer children or use spawn.child_checkpoints = 'final'")
    return total, per_seed


def expand_runs(spec: Spec, n_train: int) -> list[PlannedRun]:
    """Every run the spec declares: parents per (variant, seed), then their children.

    A run's id hashes what shapes its weights (data, model, optimiser, training options, seed;
    for a child also its parent, spawn step and index), never the checkpoint schedule, so adding
    checkpoints or spawn times trains only what is new."""
    if spec.data.probe_set_size > n_train:
        raise SpecError(f"{spec.source}: data.probe_set_size = {spec.data.probe_set_size} is more than the "
                        f"{n_train} training examples of {spec.data.label}; lower it")
    work = []
    for cfg in spec.run_configs():
        where = spec.source if cfg.variant == "base" else f"{spec.source} (variant {cfg.variant})"
        spe = math.ceil(n_train / cfg.optim.batch_size)
        work.append((cfg, spe, *check_work(cfg, spe, where)))
    checkpoints = sum(per_seed for *_, per_seed in work) * len(spec.experiment.seeds)
    if checkpoints > MAX_CHECKPOINTS:
        raise SpecError(f"{spec.source}: the spec's runs would hold up to {checkpoints:.3g} checkpoints "
                        f"({len(spec.experiment.seeds)} seeds × {len(work)} configurations); lsdb plans at most "
                        f"{MAX_CHECKPOINTS:,}: save less often or declare fewer seeds, spawns or variants")
    runs = []
    for cfg, spe, total, _ in work:
        steps = tuple(schedule(cfg, spe, total))
        training = {k: non_default(getattr(cfg, k)) for k in ("data", "model", "optim", "train")}
        # the probe set and where the files live do not shape the weights
        training["data"] = {k: v for k, v in training["data"].items() if k in TRAINING_DATA_KEYS}
        for seed in spec.experiment.seeds:
            parent = PlannedRun(parent_run_id(cfg.variant, seed, training), "parent", cfg.variant, seed, seed, cfg,
                                spe, total, steps)
            runs.append(parent)
            for t in sorted(set(cfg.spawn.times)):
                s = int(round(t * spe))
                later = tuple(x for x in steps if x > s) if cfg.spawn.child_checkpoints == "schedule" else (total,)
                kinds = [("child", i, 1.0) for i in range(cfg.spawn.children)]
                kinds += [("lowlr_child", i, cfg.spawn.lowlr_factor) for i in range(cfg.spawn.lowlr_children)]
                for kind, i, factor in kinds:
                    cid = child_run_id(parent.id, s, kind, i, factor)
                    runs.append(PlannedRun(cid, kind, cfg.variant, seed, child_data_seed(cid), cfg, spe, total,
                                           later, parent.id, s, i, factor))
    return runs  # at most lsdb.spec.MAX_RUNS: checked when the spec loads


def run_row(r: PlannedRun, experiment_id: str, num_params: int) -> dict:
    cfg = r.config
    return dict(
        id=r.id, experiment_id=experiment_id, variant=r.variant, kind=r.kind, seed=r.seed, data_seed=r.data_seed,
        dataset=cfg.data.label, train_subset=cfg.data.train_subset, model=cfg.model.label, width=cfg.model.width,
        depth=cfg.model.depth, kernels=",".join(map(str, cfg.model.kernels)), patches=cfg.model.patches,
        num_params=num_params, lr=cfg.optim.lr * r.lr_factor, momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay, batch_size=cfg.optim.batch_size, epochs=cfg.optim.epochs,
        lr_drops=",".join(map(str, cfg.optim.lr_drops)), lr_drop_factor=cfg.optim.lr_drop_factor,
        adversarial=cfg.train.adversarial, adv_epsilon=cfg.train.adv_epsilon, adv_steps=cfg.train.adv_steps,
        adv_mix=cfg.train.adv_mix, steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps,
        parent_run_id=r.parent_id, parent_checkpoint_id=r.parent_checkpoint_id, spawn_step=r.spawn_step,
        spawn_epoch=r.spawn_epoch, child_index=r.child_index, status="planned", diverged_step=None,
        diverged_reason=None, config_json=config_json(cfg),
    )


def config_json(cfg: RunConfig) -> str:
    return json.dumps(non_default(cfg), sort_keys=True)


# ------------------------------------------------------------------------------ the study view

class StoreStudy(Study):
    """The planner's view: runs and checkpoints as stored (or as they will be, when simulated)."""

    def __init__(self, runs: list[RunRef], results_fn=None):
        self.runs = runs
        self._runs = {r.id: r for r in runs}
        self._ckpts = {c.id: c for r in runs for c in r.checkpoints}
        self._results_fn = results_fn
        self._results_cache: dict = {}

    def run(self, run_id):
        return self._runs[run_id]

    def checkpoint(self, checkpoint_id):
        return self._ckpts[checkpoint_id]

    def results(self, table):
        import polars as pl

        if self._results_fn is None:
            return pl.DataFrame()
        if table not in self._results_cache:
            self._results_cache[table] = self._results_fn(table)
        return self._results_cache[table]


def run_ref(r: PlannedRun, status: str, checkpoints: tuple[CheckpointRef, ...]) -> RunRef:
    cfg = r.config
    return RunRef(id=r.id, kind=r.kind, seed=r.seed, variant=r.variant, status=status, parent_run_id=r.parent_id,
                  parent_checkpoint_id=r.parent_checkpoint_id, spawn_epoch=r.spawn_epoch, child_index=r.child_index,
                  epochs=cfg.optim.epochs, lr=cfg.optim.lr * r.lr_factor, batch_size=cfg.optim.batch_size,
                  momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay, data_seed=r.data_seed,
                  checkpoints=checkpoints, steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps)


def simulated_study(runs: list[PlannedRun], status: dict | None = None, stored: dict | None = None,
                    con=None, filled: dict | None = None) -> StoreStudy:
    """The study as it will be once every run has trained (for `lsdb plan`). Runs that already
    ended (finished, diverged, skipped) keep the checkpoints they actually have, plus the steps
    ``filled`` names (run id -> steps `lsdb run` will fill in)."""
    status, stored, filled = status or {}, stored or {}, filled or {}
    refs = []
    for r in runs:
        st = status.get(r.id, "planned")
        ended = st in ("finished", "diverged", "skipped")
        steps = sorted(set(stored.get(r.id, {})) | set(filled.get(r.id, ()))) if ended else r.save_steps
        cps = tuple(CheckpointRef(checkpoint_id(r.id, s), r.id, s, s / r.steps_per_epoch, "") for s in steps)
        refs.append(run_ref(r, "finished" if st not in ("diverged", "skipped") else st, cps))
    return StoreStudy(refs, results_fn=None if con is None else (lambda table: _results(con, table)))


def stored_study(runs: list[PlannedRun], con) -> StoreStudy:
    ids = [r.id for r in runs]
    status = dict(con.execute("SELECT id, status FROM run WHERE id IN (SELECT unnest(?::VARCHAR[]))", [ids]).fetchall())
    rows = con.execute(
        "SELECT id, run_id, step, epoch, sha256 FROM checkpoint WHERE run_id IN (SELECT unnest(?::VARCHAR[])) "
        "ORDER BY run_id, step", [ids]).fetchall()
    by_run: dict[str, list[CheckpointRef]] = {}
    for cid, rid, step, epoch, sha in rows:
        by_run.setdefault(rid, []).append(CheckpointRef(cid, rid, step, epoch, sha))
    refs = [run_ref(r, status.get(r.id, "planned"), tuple(by_run.get(r.id, ()))) for r in runs if r.id in status]
    return StoreStudy(refs, results_fn=lambda table: _results(con, table))


def _results(con, table: str):
    import polars as pl

    exists = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]).fetchone()[0]
    if not exists:
        return pl.DataFrame()
    return con.execute(
        f"SELECT t.*, j.probe, j.version, j.params_hash, j.role, j.state FROM {table} t "
        f"JOIN probe_job j ON j.id = t.job_id").pl()


# ------------------------------------------------------------------------------------ probes

def probe_requests(spec: Spec, study: Study) -> list[tuple[str, int, object, str, JobRequest]]:
    """(probe, version, params, params_hash, request) for every job the spec's probes ask for."""
    out = []
    for name, raw in spec.probe_params().items():
        module = probe_module(name)
        params = dataclass_from_dict(module.Params, raw)
        keep = _selector(study, dataclass_from_dict(ProbeSelection, raw))
        phash = params_hash(params)
        for req in module.plan(study, params):
            if keep(req):
                out.append((name, module.VERSION, params, phash, req))
    return out


_KINDS = {"all": None, "parents": {"parent"}, "children": {"child"}, "lowlr_children": {"lowlr_child"}}


def _selector(study: Study, sel):
    """A predicate on job requests from the spec's on_runs / on_checkpoints / on_variants keys."""
    kinds = _KINDS[sel.on_runs]

    def qualifies(cid: str) -> bool:
        c = study.checkpoint(cid)
        r = study.run(c.run_id)
        if kinds is not None and r.kind not in kinds:
            return False
        if sel.on_variants and r.variant not in sel.on_variants:
            return False
        if sel.on_checkpoints == "final":
            return c.id == r.final.id
        if sel.on_checkpoints == "init_final":
            return c.id in (r.init.id, r.final.id)
        if sel.on_checkpoints == "spawn":
            spawn_points = {k.parent_checkpoint_id for k in study.runs if k.parent_checkpoint_id}
            return c.id in spawn_points or c.id == r.final.id
        return True

    return lambda req: all(qualifies(c) for c in req.checkpoint_ids)


def probe_jobs(spec: Spec, study: StoreStudy, runs: list[PlannedRun], probe_set_sha: str,
               job_states: dict[str, tuple[str, int, str | None]]) -> list:
    from lsdb.probes.worker import JobSpec

    by_id = {r.id: r for r in runs}
    ready = []  # JobSpec
    seen = set()
    for name, version, params, phash, req in probe_requests(spec, study):
        jid = job_id(name, version, phash, req.checkpoint_ids, req.role)
        if jid in seen:
            continue
        seen.add(jid)
        state = job_states.get(jid)
        if state and state[0] in ("done", "skipped"):
            continue
        if state and state[0] == "failed" and state[1] >= MAX_ATTEMPTS:
            continue  # given up: plan() counts these
        ckpts = tuple(study.checkpoint(c) for c in req.checkpoint_ids)
        run_refs = tuple(study.run(c.run_id) for c in ckpts)
        cfg = by_id[ckpts[0].run_id].config
        ready.append(JobSpec(
            id=jid, probe=name, version=version, params=_params_dict(params), params_hash=phash, role=req.role,
            checkpoints=ckpts, runs=run_refs, anchor_checkpoint_id=req.anchor_checkpoint_id, inputs=req.inputs,
            model=cfg.model, data=cfg.data, probe_set_sha256=probe_set_sha,
            seed=int(jid[:8], 16)))
    return ready


def _params_dict(params) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(params).items()}
