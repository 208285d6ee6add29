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
from lsdb.errors import ProbeError, SpecError
from lsdb.ids import (checkpoint_id, child_data_seed, child_run_id, finetune_run_id, job_id, non_default, params_hash,
                      parent_run_id)
from lsdb.probes import PARAMS, probe_module
from lsdb.probes.base import CheckpointRef, JobRequest, RunRef, Study, dataclass_from_dict
from lsdb.spec import CheckpointSpec, FinetuneSpec, ProbeSelection, RunConfig, SpawnSpec, Spec

MAX_ATTEMPTS = 3

# Limits on the work one spec may plan (a spec beyond them is refused with the number it needs).
MAX_STEPS_PER_RUN = 100_000_000
MAX_CHECKPOINTS_PER_RUN = 100_000
MAX_CHECKPOINTS = 10_000_000  # in all, every variant and seed together

#: The [data] keys that shape a run's weights (part of its id); the probe set and ``root`` do not.
TRAINING_DATA_KEYS = ("name", "train_subset")


def catalog() -> specmod.Catalog:
    """Every data set, model and probe a spec may name."""
    from lsdb.train import NUM_CLASSES
    from lsdb.train.data import LOADERS
    from lsdb.train.models import MODELS

    return specmod.Catalog(datasets=tuple(LOADERS), models=tuple(MODELS), probes=PARAMS, num_classes=NUM_CLASSES)


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
    finetune: FinetuneSpec | None = None  # what a run of kind "finetune" is
    task_examples: int = 0  # a fine-tune's training examples (its task)
    # a fine-tune's steps per epoch count its task's batches; its base step is one of its parent's
    parent_steps_per_epoch: int = 0

    @property
    def spawn_epoch(self):
        if self.spawn_step is None:
            return None
        return self.spawn_step / (self.parent_steps_per_epoch or self.steps_per_epoch)

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


def expand_runs(spec: Spec, n_train: int, labels=None) -> list[PlannedRun]:
    """Every run the spec declares: parents per (variant, seed), then their children and fine-tunes.

    A run's id hashes what shapes its weights (data, model, optimiser, training options, seed;
    for a child also its parent, spawn step and index; for a fine-tune its parent, base step, task
    and optimiser), never the checkpoint schedule, so adding checkpoints, spawn times or fine-tunes
    trains only what is new. ``labels``: the training split's labels, which size a fine-tune's
    task (loaded from the spec's data set when the spec has fine-tunes and none are given)."""
    if spec.data.probe_set_size > n_train:
        raise SpecError(f"{spec.source}: data.probe_set_size = {spec.data.probe_set_size} is more than the "
                        f"{n_train} training examples of {spec.data.label}; lower it")
    tasks = task_sizes(spec, labels)
    work = []
    for cfg in spec.run_configs():
        where = spec.source if cfg.variant == "base" else f"{spec.source} (variant {cfg.variant})"
        spe = math.ceil(n_train / cfg.optim.batch_size)
        total, per_seed = check_work(cfg, spe, where)
        finetunes = [f for f in spec.finetunes if f.variant == cfg.variant]
        # a fine-tune holds its init and final checkpoints, and may add its base to the parent's
        work.append((cfg, spe, total, finetunes, per_seed + 3 * len(finetunes)))
    checkpoints = sum(per_seed for *_, per_seed in work) * len(spec.experiment.seeds)
    if checkpoints > MAX_CHECKPOINTS:
        raise SpecError(f"{spec.source}: the spec's runs would hold up to {checkpoints:.3g} checkpoints "
                        f"({len(spec.experiment.seeds)} seeds × {len(work)} configurations); lsdb plans at most "
                        f"{MAX_CHECKPOINTS:,}: save less often or declare fewer seeds, spawns or variants")
    runs = []
    for cfg, spe, total, finetunes, _ in work:
        steps = tuple(schedule(cfg, spe, total))
        # a parent also saves its fine-tunes' bases; children keep the schedule alone, so adding a
        # fine-tune fills in at most one parent checkpoint and leaves the children as they are
        bases = {total if f.base is None else int(round(f.base * spe)) for f in finetunes}
        parent_steps = tuple(sorted(set(steps) | bases))
        training = {k: non_default(getattr(cfg, k)) for k in ("data", "model", "optim", "train")}
        # the probe set and where the files live do not shape the weights
        training["data"] = {k: v for k, v in training["data"].items() if k in TRAINING_DATA_KEYS}
        for seed in spec.experiment.seeds:
            parent = PlannedRun(parent_run_id(cfg.variant, seed, training), "parent", cfg.variant, seed, seed, cfg,
                                spe, total, parent_steps)
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
            runs += [finetune_run(parent, f, tasks[f.name]) for f in finetunes]
    return runs  # at most lsdb.spec.MAX_RUNS: checked when the spec loads


def task_sizes(spec: Spec, labels=None) -> dict[str, int]:
    """Fine-tune name → the training examples of its task (``lsdb.train.data.task_indices``).
    A class with no training example is a ``SpecError``: for a data set of your own, the loader
    could not check the classes against the data."""
    if not spec.finetunes:
        return {}
    import torch

    from lsdb.train.data import load_data, task_indices

    labels = load_data(spec.data).y_train if labels is None else torch.as_tensor(labels)
    out = {}
    for f in spec.finetunes:
        absent = [c for c in f.classes if not bool((labels == c).any())]
        if absent:
            raise SpecError(f"{spec.source}: finetunes.{f.name}.classes = {list(f.classes)}: the training split of "
                            f"{spec.data.label} has no example of class {absent[0]}")
        out[f.name] = int(task_indices(labels, f.classes, f.train_fraction, f.fraction_seed).numel())
        if f.steps > MAX_STEPS_PER_RUN:
            raise SpecError(f"{spec.source}: finetunes.{f.name}.steps = {f.steps:,}; lsdb plans at most "
                            f"{MAX_STEPS_PER_RUN:,} training steps per run")
    return out


def task_key(f: FinetuneSpec) -> dict:
    """A fine-tune's task as its run id hashes it: the fraction's seed only where a fraction is drawn."""
    key = {"classes": list(f.classes), "fraction": f.train_fraction}
    return {**key, "seed": f.fraction_seed} if f.train_fraction < 1 else key


def finetune_run(parent: PlannedRun, f: FinetuneSpec, examples: int) -> PlannedRun:
    """The run of fine-tune ``f`` from ``parent``: steps 0 (the base's weights) to ``f.steps`` at a
    constant learning rate (no drops), saving its init and final checkpoints; the parent's
    momentum and batch size unless ``f`` sets them; its data order a function of its id."""
    cfg = parent.config
    base = parent.total_steps if f.base is None else int(round(f.base * parent.steps_per_epoch))
    momentum = cfg.optim.momentum if f.momentum is None else f.momentum
    batch = cfg.optim.batch_size if f.batch_size is None else f.batch_size
    spe = math.ceil(examples / batch)
    optim = dataclasses.replace(cfg.optim, lr=f.lr, momentum=momentum, batch_size=batch, epochs=f.steps / spe,
                                lr_drops=())
    config = dataclasses.replace(cfg, optim=optim, checkpoints=CheckpointSpec(), spawn=SpawnSpec())
    rid = finetune_run_id(parent.id, base, f.name, task_key(f),
                          {"steps": f.steps, "lr": f.lr, "momentum": momentum, "batch_size": batch})
    return PlannedRun(rid, "finetune", parent.variant, parent.seed, child_data_seed(rid), config, spe, f.steps,
                      (0, f.steps), parent.id, base, finetune=f, task_examples=examples,
                      parent_steps_per_epoch=parent.steps_per_epoch)


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
        diverged_reason=None, config_json=config_json(cfg, r),
        **({} if r.finetune is None else finetune_columns(r)),
    )


def finetune_columns(r: PlannedRun) -> dict:
    """A fine-tune's task in the run table (null for other runs): its name, classes ("0,1,2";
    null = every class), the fraction of those examples it trains on, and how many that is."""
    f = r.finetune
    return dict(finetune=f.name, task_classes=",".join(map(str, f.classes)) or None, task_fraction=f.train_fraction,
                task_examples=r.task_examples)


def config_json(cfg: RunConfig, r: PlannedRun | None = None) -> str:
    out = non_default(cfg)
    if r is not None and r.finetune is not None:  # the task and the base, which the config does not say
        f = r.finetune
        out["finetune"] = {"name": f.name, "base_step": r.spawn_step, "classes": list(f.classes),
                           "train_fraction": f.train_fraction, "fraction_seed": f.fraction_seed, "steps": f.steps,
                           "examples": r.task_examples}
    return json.dumps(out, sort_keys=True)


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
                  checkpoints=checkpoints, steps_per_epoch=r.steps_per_epoch, total_steps=r.total_steps,
                  **({} if r.finetune is None else dict(finetune=r.finetune.name, task_classes=r.finetune.classes,
                                                        task_fraction=r.finetune.train_fraction)))


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


_KINDS = {"all": None, "parents": {"parent"}, "children": {"child"}, "lowlr_children": {"lowlr_child"},
          "finetunes": {"finetune"}}


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
            # children's spawn points; a fine-tune's base is not one
            spawn_points = {k.parent_checkpoint_id for k in study.runs
                            if k.parent_checkpoint_id and k.kind != "finetune"}
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


# ------------------------------------------------------------------------------------ memory

#: Probes whose jobs hold an NTK or per-input Jacobians (``memory_estimates``).
KERNEL_PROBES = ("ntk", "kernel_accuracy")
_FLOAT = 4  # bytes: workers measure in float32 (lsdb.probes.worker)
_F64 = 8  # kernel summaries run in float64
_SUMMARY_COPIES = 6  # float64 kernel-sized matrices while ntk summarises (see ntk_memory)


@dataclass(frozen=True)
class MemoryEstimate:
    """The memory one probe job needs at its peak, in bytes, and how it chunks its Jacobians.

    Every job of a probe on one model and probe set needs the same, so there is one estimate per
    probe and distinct model (``variants`` names the spec variants it covers)."""

    probe: str
    variants: tuple[str, ...]
    kernel_variant: str  # full | trace | sum_logits: the Θ the job builds
    n: int  # probe-set inputs
    classes: int  # C, logits per input
    params: int  # P, parameters differentiated (after the probe's ``params`` scope)
    chunk: int  # inputs per Jacobian block
    blocks: int  # Jacobian blocks over the probe set
    block_bytes: int  # one block: chunk × C × P floats (chunk × P for sum_logits)
    cached_blocks: int  # blocks the Jacobian cache keeps (the rest are recomputed per block pair)
    cache_mb: float
    kernel_bytes: int  # Θ in the worker's float32: (n·C)² for full, n² otherwise
    jacobian_bytes: int  # Jacobian floats held at the peak
    total_bytes: int  # the estimated peak: kernel, Jacobians and working copies (docstrings below)

    def describe(self) -> str:
        """One line: the sizes, how the Jacobian is chunked, and the peak."""
        rows = self.n * (self.classes if self.kernel_variant == "full" else 1)
        if self.cache_mb <= 0:
            cache = "one at a time"
        elif self.cached_blocks >= self.blocks:
            cache = f"all cached; cache_mb = {self.cache_mb:g}"
        else:
            cache = f"{self.cached_blocks} cached, the others recomputed per block pair; cache_mb = {self.cache_mb:g}"
        where = "" if self.variants == ("base",) else f" [{', '.join(self.variants)}]"
        kernel = f"kernel {rows}×{rows} ({_size(self.kernel_bytes)}); " if self.kernel_bytes else ""
        return (f"{self.probe}{where} ({self.kernel_variant}): {self.n} inputs × {self.classes} logits × "
                f"{self.params:,} parameters; {kernel}Jacobian in {self.blocks} block{'s' if self.blocks > 1 else ''} "
                f"of {min(self.chunk, self.n)} inputs ({_size(self.block_bytes)} each, {cache}); "
                f"peak about {_size(self.total_bytes)}")


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


#: Jacobian blocks' worth of memory that building one block takes (``ntk_memory``).
BUILD_BLOCKS = 2.5


def ntk_memory(n: int, classes: int, params: int, variant: str = "trace", chunk: int = 128,
               cache_mb: float = 1024.0, implementation: str = "auto", artifact_bytes: int = _FLOAT,
               layout: tuple[int, int] | None = None) -> dict:
    """Peak memory of ``lsdb.probes._ntk_core.ntk`` followed by the ``ntk`` probe's summaries, in
    bytes, as that code allocates it (float32 throughout, B = 4 bytes):

    - kernel K: rows² · B with rows = n·C for ``full``, n otherwise (the output matrix);
    - Jacobian block: b · k · P · B with b = min(chunk, n) inputs, k = C (k = 1 for ``sum_logits``);
      blocks = ⌈n / chunk⌉. Building a block takes ``BUILD_BLOCKS`` = 2.5 blocks' worth (the block,
      its per-parameter pieces and their einsum intermediates: measured up to 2.31 on the MNIST-1D
      CNN at width 64, 2026-11-30). The cache keeps the first h = min(blocks,
      ⌊cache_mb·2²⁰ / block⌋) blocks. All cached: the peak is building the last one, (blocks − 1 +
      2.5) blocks. Otherwise it is building an uncached column block while the cached ones are held,
      (h + 2.5) blocks, or at least 3.5 (an uncached row block held while a column block is built;
      cached blocks are dropped once the row passes them). ``ntvp`` holds no Jacobian, only
      ``chunk`` parameter vectors pulled back at a time: 2 · chunk · P · B;
    - a Gram block and its symmetrised copy: 3 · (b·rows/n)² · B;
    - then the summaries (the Jacobians freed): the kernel in float64, the target kernel, centred
      copies, their product and the eigensolver's copy, 6 · rows² · 8 bytes; and the stored
      artifact when its dtype is not float32 (``artifact_bytes`` per entry).

    ``layout`` (``_ntk_core.trace_layout``: parameters kept in Jacobian form P_J, floats of
    per-layer signals S per input) is how the ``auto`` trace kernel holds a block when some layers
    take their kernel from signals: a block is then b · (C · P_J + S) · B.

    Peak = K + max(Jacobians + Gram blocks, summaries) + the artifact copy. Returns a dict of the
    MemoryEstimate fields it fixes.
    """
    per = classes if variant == "full" else 1
    k = 1 if variant == "sum_logits" else classes
    rows = n * per
    b = min(chunk, n)
    blocks = math.ceil(n / max(1, chunk))
    block = b * k * params * _FLOAT
    if layout is not None and variant == "trace" and implementation == "auto":
        block = b * (k * layout[0] + layout[1]) * _FLOAT
    kernel = rows * rows * _FLOAT
    if implementation == "ntvp":
        held, jac = 0, 2 * b * params * _FLOAT
    else:
        held = min(blocks, int(cache_mb * 2**20 // block)) if block else blocks
        jac = int(((blocks - 1 if held >= blocks else max(held, 1)) + BUILD_BLOCKS) * block)
    gram = 3 * (b * per) ** 2 * _FLOAT
    summaries = _SUMMARY_COPIES * rows * rows * _F64
    artifact = 0 if artifact_bytes == _FLOAT else rows * rows * artifact_bytes
    return dict(kernel_variant=variant, n=n, classes=classes, params=params, chunk=chunk, blocks=blocks,
                block_bytes=block, cached_blocks=held, cache_mb=cache_mb, kernel_bytes=kernel, jacobian_bytes=jac,
                total_bytes=kernel + max(jac + gram, summaries) + artifact)


def kernel_accuracy_memory(n: int, classes: int, params: int, methods=("linearised", "kernel_regression"),
                           lr_mode: str = "kernel_scaled", kernel_variant: str = "trace", chunk: int = 256) -> dict:
    """Peak NTK and Jacobian memory of a ``kernel_accuracy`` job, in bytes (float32, B = 4), with
    J = n · C · P · B the probe set's whole Jacobian and a block b · C · P · B, b = min(chunk, n):

    - when two or more uses need J (``kernel_regression``, or the kernel-scaled learning rate beside
      it) and J fits in ``KERNEL_CACHE_MB``, the job builds J once (its blocks and their
      concatenation, 2 J) and holds it; otherwise each use builds its own blocks;
    - ``linearised`` with ``kernel_scaled``: the trace-NTK diagonal, a block at a time being built
      or squared: 2 blocks. (The cached linearisation's activations are bounded by the probe's
      ``cache_mb`` and not counted.)
    - ``kernel_regression``: Θ(X, X) as ``ntk_memory`` builds it (from the held J: only its Gram
      blocks, 3 · (b·per)² · B), the solve (Θ + λI, the identity and the LU copy: 3 · rows² · B),
      then the kernel machine's M (C · C · P · B for ``trace``, P · B for ``full``) accumulated and
      used to predict a block at a time: M, one partial product and a block being built
      (``BUILD_BLOCKS`` blocks).

    Predictions go a block at a time, so the number of inputs predicted does not matter.
    Peak = the largest of these phases, with what each holds throughout.
    """
    from lsdb.probes import kernel_accuracy as ka

    per = classes if kernel_variant == "full" else 1
    rows = n * per
    b = min(chunk, n)
    block = b * classes * params * _FLOAT
    whole = n * classes * params * _FLOAT
    fit = ntk_memory(n, classes, params, kernel_variant, chunk, ka.KERNEL_CACHE_MB)
    regression = "kernel_regression" in methods
    scaled = "linearised" in methods and lr_mode == "kernel_scaled"
    shared = regression and whole <= ka.KERNEL_CACHE_MB * 2**20
    held = whole if shared else 0
    peak = 2 * whole if shared else 0
    jac = peak
    if scaled:
        jac = max(jac, block if shared else 2 * block)
        peak = max(peak, held + (block if shared else 2 * block))
    if not regression:  # the diagonal only: blocks one at a time, no kernel
        return {**fit, "kernel_variant": "trace", "cached_blocks": 0, "cache_mb": 0.0, "kernel_bytes": 0,
                "jacobian_bytes": jac, "total_bytes": peak}
    kernel = fit["kernel_bytes"]
    gram = 3 * (b * per) ** 2 * _FLOAT
    build = held + kernel + (gram if shared else fit["jacobian_bytes"] + gram)
    solve = held + kernel + 3 * rows * rows * _FLOAT
    m = (classes * classes if kernel_variant == "trace" else 1) * params * _FLOAT
    predict = held + kernel + 2 * m + int(BUILD_BLOCKS * block)
    peak = max(peak, build, solve, predict)
    jac = max(jac, held if shared else fit["jacobian_bytes"], int(BUILD_BLOCKS * block))
    extra = {"cached_blocks": fit["blocks"], "cache_mb": ka.KERNEL_CACHE_MB} if shared else {}
    return {**fit, **extra, "jacobian_bytes": jac, "total_bytes": peak}


#: Probes with a ``params`` scope (globs on parameter names), checked against the model by ``check_scopes``.
SCOPED_PROBES = ("hessian", "ntk", "flatness", "kernel_accuracy")


def _models(spec: Spec):
    """(variant config, its trainable parameter sizes by name, logits, training examples, the model,
    the input shape) for each configuration of the spec. Each model is built on the meta device where
    it can be (no weights allocated); data sets are loaded once each, for their shapes."""
    import torch

    from lsdb.train.data import load_data
    from lsdb.train.models import build_model

    shapes: dict = {}
    for cfg in spec.run_configs():
        if cfg.data not in shapes:
            data = load_data(cfg.data)
            shapes[cfg.data] = (data.input_shape, data.num_classes, data.x_train.shape[0])
        input_shape, classes, n_train = shapes[cfg.data]
        try:
            with torch.device("meta"):
                model = build_model(cfg.model, input_shape, classes)
        except Exception:  # a factory that needs real tensors while it builds
            model = build_model(cfg.model, input_shape, classes)
        sizes = {name: p.numel() for name, p in model.named_parameters() if p.requires_grad}
        yield cfg, sizes, classes, n_train, model, input_shape


def _scoped(spec: Spec, probes: tuple[str, ...]):
    """(probe, Params, variant config, differentiated parameter count, logits, training examples,
    model, differentiated names, input shape) for every probe of ``probes`` the spec runs on each
    configuration; a ``params`` glob that matches no parameter of that configuration's model is a
    ``SpecError``."""
    from lsdb.probes.base import select_params

    wanted = [(name, raw) for name, raw in spec.probe_params().items() if name in probes]
    if not wanted:
        return
    for cfg, sizes, classes, n_train, model, input_shape in _models(spec):
        for name, raw in wanted:
            sel = dataclass_from_dict(ProbeSelection, raw)
            if sel.on_variants and cfg.variant not in sel.on_variants:
                continue
            params = dataclass_from_dict(PARAMS[name], raw)
            try:
                chosen = select_params(list(sizes), params.params, name)
            except ProbeError as e:
                where = "" if cfg.variant == "base" else f" (variant {cfg.variant})"
                raise SpecError(f"{spec.source}{where}: {e}") from None
            yield name, params, cfg, sum(sizes[p] for p in chosen), classes, n_train, model, chosen, input_shape


def check_scopes(spec: Spec) -> None:
    """Refuse (``SpecError``) a probe ``params`` glob that matches no parameter of the spec's model,
    before any job runs (a job would fail the same way, naming it)."""
    for _ in _scoped(spec, SCOPED_PROBES):
        pass


def memory_estimates(spec: Spec) -> list[MemoryEstimate]:
    """The peak NTK and Jacobian memory of every ``ntk`` and ``kernel_accuracy`` job the spec
    declares (``ntk_memory``, ``kernel_accuracy_memory``), one estimate per probe and distinct
    model, from the model's parameter count (within the probe's ``params`` scope), the number of
    logits and the probe-set size. Builds the models and loads the data sets (``_models``); runs
    no probe."""
    from lsdb.probes._ntk_core import trace_layout

    found: dict[tuple, dict] = {}
    for name, params, cfg, count, classes, n_train, model, chosen, input_shape in _scoped(spec, KERNEL_PROBES):
        n = min(spec.data.probe_set_size, n_train)
        if name == "ntk":
            layout = None
            if params.variant == "trace" and params.implementation == "auto":
                layout = trace_layout(model, chosen, input_shape, classes)
            fields = ntk_memory(n, classes, count, params.variant, params.chunk, params.cache_mb,
                                params.implementation, _F64 if params.dtype == "float64" else _FLOAT, layout)
        else:
            fields = kernel_accuracy_memory(n, classes, count, params.methods, params.lr_mode,
                                            params.kernel_variant, params.chunk)
        key = (name, tuple(sorted(fields.items())))
        if key in found:
            found[key]["variants"] += (cfg.variant,)
        else:
            found[key] = {"probe": name, "variants": (cfg.variant,), **fields}
    return [MemoryEstimate(**f) for f in found.values()]


def available_memory(device: str | None = None) -> tuple[int | None, str]:
    """(bytes a job may still allocate, where): free memory of the CUDA device a worker would pick
    (``torch.cuda.mem_get_info``), else ``MemAvailable`` of /proc/meminfo; None where neither is
    known (then nothing is refused)."""
    import torch

    if (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device or "cuda"))
        return int(free), f"free on {device or 'cuda'}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024, "MemAvailable"
    except (OSError, ValueError, IndexError):
        pass
    return None, "unknown"


def check_memory(estimates: list[MemoryEstimate], device: str | None = None,
                 available: int | None = None) -> None:
    """Refuse (``SpecError``) the first estimate whose peak exceeds the memory available now
    (``available_memory``, or ``available`` bytes when given), naming the probe, the size it
    needs, the size available and what to lower."""
    where = "given"
    if available is None:
        available, where = available_memory(device)
    if available is None:
        return
    for e in estimates:
        if e.total_bytes > available:
            fix = _FIXES[e.probe].format(p=e.probe)
            where_v = "" if e.variants == ("base",) else f" (variants {', '.join(e.variants)})"
            raise SpecError(f"probe {e.probe}{where_v} needs about {_size(e.total_bytes)} per job (kernel "
                            f"{_size(e.kernel_bytes)}, Jacobians {_size(e.jacobian_bytes)} in blocks of "
                            f"{min(e.chunk, e.n)} inputs), but {_size(available)} is available ({where}): {fix}")


_FIXES = {
    "ntk": "lower data.probe_set_size, probes.{p}.chunk or probes.{p}.cache_mb, use variant = 'trace', "
           "or restrict probes.{p}.params to a block of the network",
    "kernel_accuracy": "lower data.probe_set_size or probes.{p}.chunk, use kernel_variant = 'trace', or "
                       "restrict probes.{p}.params to a block of the network",
}
