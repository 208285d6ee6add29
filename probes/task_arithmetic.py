"""``task_arithmetic``: the task vectors of fine-tunes from one base checkpoint, how they align,
and what merging them by task arithmetic (Ilharco, Ribeiro, Wortsman, Gururangan, Schmidt,
Hajishirzi, Farhadi 2023, "Editing models with task arithmetic") and by TIES-merging (Yadav,
Tam, Choshen, Raffel, Bansal 2023, "TIES-Merging") gives: the directedness of fine-tuning in
Khan et al. 2024's SoK on model merging and loss landscapes.

Jobs: one per base checkpoint that at least one finished fine-tune (``[finetunes.NAME]`` in the
spec; runs of kind "finetune") starts from. Its checkpoints are (w_0, w_1, …, w_n): the base, then
the final checkpoints of the base's finished fine-tunes ordered by fine-tune name; role "tasks",
anchored at the base. Diverged fine-tunes are left out; a fine-tune that finishes later gives the
base a new job (its id hashes every checkpoint).

**Task vectors** (Ilharco et al. 2023, §2). τ_i = w_i − w_0 over the trainable parameters (those
of ``model.named_parameters()``, flattened and concatenated into one vector of P entries; buffers
are not part of a task vector and are taken from the base), computed in float64. Per fine-tune
``norm`` = ‖τ_i‖₂; per pair i < j ``cosine`` = ⟨τ_i, τ_j⟩ / (‖τ_i‖₂ ‖τ_j‖₂) (NaN when a norm
is 0).

**Tasks' test examples.** T_i = the test examples whose label is one of task i's classes; for a task
given by ``train_fraction`` alone (a fixed part of the training split, every class) the whole test
split. On T_i the mean cross-entropy L and the error E (fraction misclassified) of w_i and of w_0.

**Task arithmetic.** w_sum(λ) = w_0 + λ·Σ_i τ_i for each λ of ``lambdas``.

**TIES-merging** (Yadav et al. 2023, §3), with k = ``ties_keep``:

1. trim: τ̂_i keeps the entries p of τ_i with |τ_i,p| ≥ the m-th largest magnitude of τ_i,
   m = max(1, round(k·P)) (more than m where magnitudes tie there), and sets the rest to 0;
2. elect: γ_p = sgn(Σ_i τ̂_i,p);
3. disjoint merge: τ_m,p = (1/|A_p|)·Σ_{i∈A_p} τ̂_i,p over A_p = {i : τ̂_i,p ≠ 0, sgn(τ̂_i,p) = γ_p},
   and 0 where A_p is empty;

w_ties(λ) = w_0 + λ·τ_m at the same λ grid. With one task vector and k = 1 nothing is trimmed and
τ_m = τ_1: TIES is plain addition.

Every merged point is evaluated on every T_i and on the whole test split: ``loss``, ``error`` and,
on T_i, ``normalised_accuracy`` = (1 − E_merged(T_i)) / (1 − E_i(T_i)), the accuracy relative to the
task's own fine-tune (Ilharco et al. 2023, §3; null when the fine-tune gets none of T_i right).

**Choosing λ.** Ilharco et al. and Yadav et al. pick λ on held-out validation data. lsdb's data sets
have a training and a test split only, so this probe stores the whole grid and picks no λ: a λ
chosen from these rows is chosen on test examples (an optimistic, oracle choice), and a finding
that uses one must say so. The metrics in ``metric_series`` read λ = 1 (plain addition).

Points are evaluated as combinations of the basis [w_0, w_1, …, w_n, τ_m] (``evaluate_combinations``):
w_sum(λ) = (1 − nλ)·w_0 + λ·Σ_i w_i and w_ties(λ) = w_0 + λ·τ_m, so λ = 0 is the base exactly, and
with one fine-tune λ = 1 is that fine-tune's stored weights exactly.

BatchNorm (``BATCHNORM`` = "refused"): a task vector of running statistics is not defined (the
papers fine-tune networks without BatchNorm), and a sum of statistics' differences can make a
variance negative; models with BatchNorm are refused before any work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import MAX_BATCH, check, positive

from . import _directions as D
from .base import JobRequest, ProbeContext, RunRef, Study

VERSION = 1
TABLES = ("task_vector", "task_vector_cosine", "task_arithmetic")
BATCHNORM = "refused"

MAX_LAMBDAS = 1001
MAX_LAMBDA = 100.0
DEFAULT_LAMBDAS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


def _lambdas_ok(v) -> bool:
    return (0 < len(v) <= MAX_LAMBDAS and len(set(v)) == len(v)
            and all(math.isfinite(x) and -MAX_LAMBDA <= x <= MAX_LAMBDA for x in v))


@dataclass(frozen=True)
class Params:
    # the λ grid of both merges (negative λ subtracts the tasks: Ilharco et al.'s negation)
    lambdas: tuple[float, ...] = field(default=DEFAULT_LAMBDAS, metadata=check(
        _lambdas_ok, f"must list 1 to {MAX_LAMBDAS} distinct values in [-{MAX_LAMBDA:g}, {MAX_LAMBDA:g}]"))
    # TIES: the fraction of each task vector's entries kept by magnitude (Yadav et al.'s k = 20%)
    ties_keep: float = field(default=0.2, metadata=check(lambda v: 0 < v <= 1, "must be in (0, 1]"))
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))


# --------------------------------------------------------------------------------------- plan

def plan(study: Study, params: Params) -> list[JobRequest]:
    """One job per base checkpoint with finished fine-tunes: (base, their finals by name)."""
    by_base: dict[str, list[RunRef]] = {}
    for r in study.runs:
        if r.kind == "finetune" and r.status == "finished" and r.parent_checkpoint_id and r.checkpoints:
            by_base.setdefault(r.parent_checkpoint_id, []).append(r)
    jobs = []
    for base, runs in by_base.items():
        runs.sort(key=lambda r: (r.finetune or "", r.id))
        jobs.append(JobRequest((base, *(r.final.id for r in runs)), base, "tasks"))
    return jobs


# ---------------------------------------------------------------------------------- the maths

def flatten(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The named tensors of ``state`` as one float64 vector, in ``names`` order."""
    return torch.cat([state[n].reshape(-1).double() for n in names])


def unflatten(vector: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """``vector`` cut into tensors shaped and typed like ``like[name]`` for each of ``names``."""
    out, start = {}, 0
    for n in names:
        t = like[n]
        out[n] = vector[start:start + t.numel()].reshape(t.shape).to(t.dtype)
        start += t.numel()
    return out


def cosine_matrix(vectors: torch.Tensor) -> torch.Tensor:
    """C[i, j] = ⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖) for the rows τ_i of ``vectors`` (n, P); NaN where a
    norm is 0."""
    v = vectors.double()
    norms = v.norm(dim=1)
    return (v @ v.T) / torch.outer(norms, norms)


def trim(vector: torch.Tensor, keep: float) -> torch.Tensor:
    """TIES step 1: ``vector`` with the entries below its m-th largest magnitude set to 0,
    m = max(1, round(keep · P)) (entries tied at the threshold are all kept)."""
    p = vector.numel()
    m = min(p, max(1, round(keep * p)))
    if m == p:
        return vector.clone()
    magnitude = vector.abs()
    threshold = torch.kthvalue(magnitude, p - m + 1).values
    return torch.where(magnitude >= threshold, vector, torch.zeros_like(vector))


def ties_merge(vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """TIES-merging of the rows of ``vectors`` (n, P) into one vector (module docstring):
    trim each row, elect the sign of the trimmed rows' sum, average the agreeing entries."""
    trimmed = torch.stack([trim(v, keep) for v in vectors])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    count = agree.sum(dim=0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def task_test_mask(y_test: torch.Tensor, classes: tuple[int, ...]) -> torch.Tensor:
    """T_i: the test examples of ``classes``; every example when no classes are given."""
    if not classes:
        return torch.ones_like(y_test, dtype=torch.bool)
    return torch.isin(y_test, torch.tensor(tuple(classes), dtype=y_test.dtype, device=y_test.device))


def merge_coefficients(n: int, lambdas: tuple[float, ...]) -> torch.Tensor:
    """Rows over the basis [w_0, w_1, …, w_n, τ_m]: w_0; each w_i; w_sum(λ) = (1 − nλ)·w_0 + λ·Σ w_i
    for each λ; w_ties(λ) = w_0 + λ·τ_m for each λ (in that order)."""
    rows = [[1.0] + [0.0] * n + [0.0]]
    rows += [[0.0] + [float(i == j) for j in range(n)] + [0.0] for i in range(n)]
    rows += [[1.0 - n * lam] + [lam] * n + [0.0] for lam in lambdas]
    rows += [[1.0] + [0.0] * n + [lam] for lam in lambdas]
    return torch.tensor(rows, dtype=torch.float64)


# ------------------------------------------------------------------------------------ compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    n = len(ctx.states) - 1
    if n < 1:
        raise ProbeError(f"task_arithmetic needs a base checkpoint and at least one fine-tune, got "
                         f"{len(ctx.states)} checkpoints")
    if len(ctx.runs) != len(ctx.states):
        raise ProbeError("task_arithmetic needs the run of every checkpoint (the fine-tunes' tasks)")
    model = ctx.model
    if D.has_batchnorm(model):
        raise ProbeError(f"task_arithmetic: {type(model).__name__} has BatchNorm, whose running statistics have no "
                         f"task vector; this probe measures BatchNorm-free models only: drop [probes.task_arithmetic] "
                         f"for this model")
    states = [D.prepare_state(model, s, ctx.device, ctx.dtype) for s in ctx.states]
    for s in states:
        if not all(bool(torch.isfinite(v).all()) for v in s.values() if v.is_floating_point()):
            raise ProbeSkipped("non-finite weights (diverged checkpoint)")
    names = D.trainable_names(model)
    floats = [D.split_float(s)[0] for s in states]
    base, fixed = floats[0], dict(D.split_float(states[0])[1])
    # float buffers are no part of a task vector: every point takes the base's
    fixed.update({k: v for k, v in base.items() if k not in names})
    basis_of = [{k: f[k] for k in names} for f in floats]

    w0 = flatten(base, names)
    taus = torch.stack([flatten(f, names) - w0 for f in floats[1:]])
    merged = ties_merge(taus, params.ties_keep)
    basis = basis_of + [unflatten(merged, base, names)]
    lambdas = tuple(float(x) for x in params.lambdas)
    coeffs = merge_coefficients(n, lambdas)
    n_lam = len(lambdas)

    tasks = ctx.runs[1:]
    data = ctx.data
    sets = [(r.finetune or r.id, task_test_mask(data.y_test, tuple(r.task_classes))) for r in tasks]
    sets.append((None, torch.ones_like(data.y_test, dtype=torch.bool)))
    evals = {}
    for name, mask in sets:
        if not bool(mask.any()):
            continue
        x, y = data.x_test[mask], data.y_test[mask]
        evals[name] = (int(mask.sum()), D.evaluate_combinations(model, basis, coeffs, fixed, x, y,
                                                                batch_size=params.batch_size))

    vectors = []
    whole = evals[None][1]
    for i, r in enumerate(tasks):
        own = evals.get(sets[i][0])
        row = {"finetune": sets[i][0], "finetune_run_id": r.id, "finetune_checkpoint_id": ctx.checkpoints[i + 1].id,
               "task_classes": ",".join(map(str, r.task_classes)) or None, "task_fraction": float(r.task_fraction),
               "n_task_test": 0 if own is None else own[0], "norm": float(taus[i].norm()),
               "finetune_test_loss": float(whole.loss[1 + i]), "finetune_test_error": float(whole.error[1 + i])}
        if own is not None:
            ev = own[1]
            row.update(finetune_task_loss=float(ev.loss[1 + i]), finetune_task_error=float(ev.error[1 + i]),
                       base_task_loss=float(ev.loss[0]), base_task_error=float(ev.error[0]))
        vectors.append(row)

    cos = cosine_matrix(taus)
    cosines = [{"finetune_a": sets[i][0], "finetune_b": sets[j][0], "checkpoint_a": ctx.checkpoints[i + 1].id,
                "checkpoint_b": ctx.checkpoints[j + 1].id, "cosine": float(cos[i, j])}
               for i in range(n) for j in range(i + 1, n)]

    merges = []
    for s, (name, _) in enumerate(sets):
        if name not in evals:
            continue
        count, ev = evals[name]
        own_error = float(ev.error[1 + s]) if name is not None else None
        for m, method in enumerate(("sum", "ties")):
            for k, lam in enumerate(lambdas):
                row = 1 + n + m * n_lam + k
                error = float(ev.error[row])
                normalised = None
                if own_error is not None and own_error < 1:
                    normalised = (1 - error) / (1 - own_error)
                merges.append({"method": method, "lam": lam,
                               "ties_keep": params.ties_keep if method == "ties" else None, "tasks": n,
                               "finetune": name, "n": count, "loss": float(ev.loss[row]), "error": error,
                               "normalised_accuracy": normalised})
    return {"task_vector": vectors, "task_vector_cosine": cosines, "task_arithmetic": merges}
