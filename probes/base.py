"""What every probe module provides, and what the shared worker hands it.

A probe module (``lsdb/probes/<name>.py``) holds only maths. It defines:

- ``VERSION: int`` — bump when the maths changes; new rows are written, old ones stay.
- ``Params`` — a frozen dataclass; its fields are the TOML keys of ``[probes.<name>]``.
- ``TABLES: tuple[str, ...]`` — the result tables it writes (defined in ``lsdb.schema``).
- ``Params.params`` (probes that differentiate or perturb the weights: hessian, ntk, flatness,
  kernel_accuracy) — fnmatch globs on parameter names restricting the probe to a block of the
  network (``scope_field``, ``select_params``); the empty default means every parameter.
- ``BATCHNORM: str`` — how it treats BatchNorm, one of ``BATCHNORM_MODES`` but "none" (stated in
  its docstring; the worker stores it in ``probe_job.batchnorm``, or "none" for a model without
  BatchNorm, or "running" when the probe's ``bn_recompute`` param is off). The worker hands
  ``compute`` the model in eval mode; a probe that needs train-mode passes makes and undoes them.
- ``plan(study, params) -> list[JobRequest]`` — which checkpoints (or pairs) to measure.
  Use the helpers below (``each_checkpoint``, ``sibling_final_pairs`` …). ``plan`` is called
  repeatedly until it asks for nothing new, so a probe that needs another probe's results
  (e.g. kernel distance needs stored kernels) simply asks for the jobs whose inputs exist now.
- ``compute(ctx, params) -> dict[str, list[dict]]`` — table name → rows of plain scalars.
  The worker adds the key columns (job_id, idx, checkpoint_id, other_checkpoint_id,
  anchor_checkpoint_id). Raise ``lsdb.errors.ProbeSkipped("non-finite loss")`` when the input
  makes the measurement meaningless, ``lsdb.errors.ProbeError`` for bad input.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Callable

from lsdb.artifacts import Artifacts
from lsdb.errors import ProbeError, SpecError
from lsdb.ids import job_id, params_hash  # noqa: F401  (probe modules and tests import them from here)
from lsdb.spec import check

if TYPE_CHECKING:  # torch is imported lazily so `lsdb --help` stays fast
    import torch

    from lsdb.train.data import Data


#: Values of ``probe_job.batchnorm``: what a job's numbers assume about BatchNorm.
BATCHNORM_MODES = {
    "none": "the model has no BatchNorm",
    "running": "eval mode with the checkpoint's running statistics (at a combination of checkpoints, "
               "the same combination of theirs)",
    "recomputed": "eval mode with running statistics recomputed at every evaluated point from one "
                  "train-mode pass over the probe's train subset",
    "unused": "no forward pass (BatchNorm's scale and shift count as parameters, its statistics do not)",
    "refused": "the probe refuses models with BatchNorm (the job failed)",
}


@dataclass(frozen=True)
class CheckpointRef:
    """A stored checkpoint as a job sees it."""

    id: str
    run_id: str
    step: int
    epoch: float
    sha256: str


@dataclass(frozen=True)
class RunRef:
    """A stored run as the planner sees it (hyperparameters are the run table's columns)."""

    id: str
    kind: str  # "parent" | "child" | "lowlr_child" | "finetune"
    seed: int
    variant: str
    status: str
    parent_run_id: str | None
    parent_checkpoint_id: str | None
    spawn_epoch: float | None
    child_index: int | None
    epochs: float
    lr: float
    batch_size: int
    momentum: float
    weight_decay: float
    data_seed: int
    checkpoints: tuple[CheckpointRef, ...]  # sorted by step
    steps_per_epoch: int = 0  # 0 = unknown (hand-built refs in tests)
    total_steps: int = 0
    # a fine-tune's name and task: the classes it trains on (() = every class) and the fraction of
    # their training examples (lsdb.train.data.task_indices); None, (), 1.0 for other runs
    finetune: str | None = None
    task_classes: tuple[int, ...] = ()
    task_fraction: float = 1.0

    @property
    def init(self) -> CheckpointRef:
        return self.checkpoints[0]

    @property
    def final(self) -> CheckpointRef:
        return self.checkpoints[-1]


@dataclass(frozen=True)
class JobRequest:
    """One measurement the planner wants.

    ``checkpoint_ids`` are read by the worker in order (one for a pointwise probe, two for a pair).
    ``anchor_checkpoint_id`` places the result on the time axis of ``metric_series``:
    pointwise → the checkpoint itself; velocity → the earlier checkpoint; a pair of sibling
    children → the parent's checkpoint at the spawn time. ``role`` tells pairs apart
    ("self", "init", "next", "parent", "siblings", …). ``inputs`` carries extra JSON-able inputs,
    e.g. artifact hashes of stored kernels.
    """

    checkpoint_ids: tuple[str, ...]
    anchor_checkpoint_id: str
    role: str = "self"
    inputs: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeContext:
    """Everything ``compute`` may use. Built by the worker; probes never open the database."""

    model: "torch.nn.Module"  # the architecture, on ``device``; weights come from ``states``
    states: list[dict[str, "torch.Tensor"]]  # one per checkpoint id, parameters and buffers
    checkpoints: list[CheckpointRef]
    runs: list[RunRef]  # the run of each checkpoint (hyperparameters for linearised training)
    data: "Data"  # train/test tensors on ``device`` in ``dtype``
    probe_indices: "torch.Tensor"  # the experiment's fixed probe set: indices into the train split
    device: "torch.device"
    dtype: "torch.dtype"
    artifacts: "Artifacts"
    role: str = "self"
    inputs: dict[str, Any] = field(default_factory=dict)
    seed: int = 0  # deterministic per job; seed every random draw from it


# ------------------------------------------------------------------------- planning helpers

class Study:
    """The planner's read-only view of the store: runs with their checkpoints, and stored results.

    Implemented in ``lsdb.plan``; this is the interface probes rely on.
    """

    runs: list[RunRef]

    def run(self, run_id: str) -> RunRef:
        raise NotImplementedError

    def checkpoint(self, checkpoint_id: str) -> CheckpointRef:
        raise NotImplementedError

    def results(self, table: str):
        """Stored rows of a result table joined with their job (polars DataFrame with the table's
        columns plus ``probe``, ``version``, ``params_hash``, ``role``, ``state``)."""
        raise NotImplementedError

    def children_of(self, run_id: str) -> list[RunRef]:
        return [r for r in self.runs if r.parent_run_id == run_id]

    def finished(self) -> list[RunRef]:
        return [r for r in self.runs if r.status in ("finished", "diverged")]


def each_checkpoint(study: Study) -> list[JobRequest]:
    return [JobRequest((c.id,), c.id) for r in study.runs for c in r.checkpoints]


def sibling_final_pairs(study: Study, kind: str = "child") -> list[JobRequest]:
    """Final checkpoints of each pair of sibling children (same parent, same spawn checkpoint),
    anchored at the parent's spawn checkpoint."""
    groups: dict[str, list[RunRef]] = {}
    for r in study.runs:
        if r.kind == kind and r.parent_checkpoint_id and r.status == "finished" and r.checkpoints:
            groups.setdefault(r.parent_checkpoint_id, []).append(r)
    out = []
    for anchor, sibs in groups.items():
        sibs.sort(key=lambda r: r.child_index or 0)
        for i in range(len(sibs)):
            for j in range(i + 1, len(sibs)):
                out.append(JobRequest((sibs[i].final.id, sibs[j].final.id), anchor, "siblings"))
    return out


def to_init_pairs(study: Study) -> list[JobRequest]:
    """Each checkpoint paired with the step-0 checkpoint of its trajectory (role "init"): a
    parent's own init; for a child, the init of the parent it was spawned from, since the child's
    weights continue that trajectory. The init itself is not paired with itself."""
    by_id = {r.id: r for r in study.runs}
    out = []
    for r in study.runs:
        root = r
        while root.parent_run_id is not None and root.parent_run_id in by_id:
            root = by_id[root.parent_run_id]
        if not root.checkpoints or root.init.step != 0:
            continue
        out += [JobRequest((c.id, root.init.id), c.id, "init") for c in r.checkpoints if c.id != root.init.id]
    return out


def to_next_pairs(study: Study) -> list[JobRequest]:
    """Each checkpoint paired with the next one of the same run (role "next", anchored at the first)."""
    out = []
    for r in study.runs:
        cs = r.checkpoints
        out += [JobRequest((a.id, b.id), a.id, "next") for a, b in zip(cs, cs[1:])]
    return out


def to_parent_pairs(study: Study) -> list[JobRequest]:
    """Each checkpoint of a child paired with the parent's checkpoint it was spawned from."""
    out = []
    for r in study.runs:
        if r.parent_checkpoint_id:
            out += [JobRequest((c.id, r.parent_checkpoint_id), c.id, "parent") for c in r.checkpoints]
    return out


def cross_init_groups(study: Study) -> list[list[RunRef]]:
    """Per variant, its finished parent runs with checkpoints, by seed: nets that differ in their
    initialisation (and data order), the counterpart of sibling children, which differ in data
    order only."""
    by_variant: dict[str, list[RunRef]] = {}
    for r in study.runs:
        if r.kind == "parent" and r.status == "finished" and r.checkpoints:
            by_variant.setdefault(r.variant, []).append(r)
    return [sorted(runs, key=lambda r: (r.seed, r.id)) for runs in by_variant.values()]


def cross_init_pairs(study: Study) -> list[JobRequest]:
    """The final checkpoints of every two parents of one variant with different seeds (seed_a <
    seed_b; role "cross_init", anchored at run a's final checkpoint)."""
    jobs = []
    for runs in cross_init_groups(study):
        for i, a in enumerate(runs):
            jobs += [JobRequest((a.final.id, b.final.id), a.final.id, "cross_init") for b in runs[i + 1:]
                     if a.seed < b.seed]
    return jobs


# ------------------------------------------------- checkpoints named in a spec ('RUN@STEP')

REF_HELP = "'RUN@STEP' (RUN a run id, STEP an integer, 'init' or 'final')"


def checkpoint_refs_ok(text: str, least: int, most: int) -> bool:
    """Whether ``text`` lists ``least``..``most`` checkpoints 'RUN@STEP', separated by spaces or
    commas (as ``resolve_checkpoint_refs`` reads them)."""
    parts = text.replace(",", " ").split()
    if not least <= len(parts) <= most:
        return False
    for p in parts:
        run, _, step = p.rpartition("@")
        if not run:
            return False
        if step not in ("init", "final"):
            try:
                int(step)  # as resolve_checkpoint_refs reads it ("+5" and "-1" too)
            except ValueError:
                return False
    return True


def resolve_checkpoint_refs(study: Study, text: str, where: str) -> list[CheckpointRef | None]:
    """The checkpoints ``text`` names, each None while its run has not reached it yet; SpecError
    (naming ``where``) for a run the store does not hold."""
    out = []
    for ref in text.replace(",", " ").split():
        run_id, _, step = ref.rpartition("@")
        try:
            run = study.run(run_id)
        except (KeyError, LookupError):
            raise SpecError(f"{where}: no run '{run_id}' in this store") from None
        if not run.checkpoints:
            out.append(None)
        elif step == "init":
            out.append(run.init)
        elif step == "final":
            out.append(run.final if run.status == "finished" else None)
        else:
            try:
                s = int(step)
            except ValueError:
                raise SpecError(f"{where}: step '{step}' of '{ref}' must be an integer, 'init' or 'final'") from None
            out.append(next((c for c in run.checkpoints if c.step == s), None))
    return out


def dataclass_from_dict(cls, values: dict[str, Any]):
    """``cls`` from JSON-like values: lists become tuples, nested ones too (a spec's ``kwargs``
    pairs), so the result stays hashable."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: _tuples(v) for k, v in values.items() if k in names})


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, (list, tuple)) else v


# -------------------------------------------------------------------------- parameter scope

MAX_PARAM_GLOBS = 256  # globs in one probe's ``params`` list
MAX_GLOB_LENGTH = 256


def _globs_ok(v) -> bool:
    return (isinstance(v, tuple) and len(v) <= MAX_PARAM_GLOBS
            and all(isinstance(g, str) and 0 < len(g) <= MAX_GLOB_LENGTH for g in v))


def scope_field():
    """The ``params`` field of a probe's Params: globs on parameter names, () = every parameter.
    The empty default is left out of the params hash, so writing ``params = []`` changes nothing."""
    return field(default=(), metadata=check(
        _globs_ok, f"must be a list of at most {MAX_PARAM_GLOBS} non-empty globs on parameter names "
                   f"(each at most {MAX_GLOB_LENGTH} characters), e.g. [\"layer3.*\", \"fc.weight\"]"))


def select_params(names: list[str], globs: tuple[str, ...], probe: str) -> list[str]:
    """The names (state-dict names of ``model.named_parameters()``, in model order) that match at
    least one of ``globs`` (``fnmatch`` rules, case-sensitive: ``*`` also crosses dots, so
    "layer3.*" covers "layer3.0.conv1.weight"); every name when ``globs`` is empty.

    A glob that matches nothing is an error rather than a silently smaller block. The spec loader
    cannot see it (it never builds the model); ``lsdb.plan.check_scopes`` can, and a job that gets
    one fails with the glob and the model's parameter names."""
    if not globs:
        return list(names)
    for g in globs:
        if not any(fnmatchcase(n, g) for n in names):
            shown = ", ".join(names[:8]) + (f", … ({len(names)} in all)" if len(names) > 8 else "")
            raise ProbeError(f"probes.{probe}.params: {g!r} matches no parameter of the model; "
                             f"its parameters are {shown}")
    return [n for n in names if any(fnmatchcase(n, g) for g in globs)]


PlanFn = Callable[[Study, Any], list[JobRequest]]
