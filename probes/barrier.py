"""``barrier``: loss and error along the straight line between two checkpoints.

Path w(α) = (1−α)·w₁ + α·w₂ for α on a uniform grid of ``points`` values in [0, 1] (Frankle et al.
2020; Fort et al. 2020). Every floating tensor of the state is interpolated (parameters and float
buffers); integer buffers come from w₁. At each α we measure the mean cross-entropy L(α) and the
error E(α) (fraction misclassified) on

- train: a fixed subset of ``train_subset`` training examples drawn with ``subset_seed``
  (the same subset for every pair; 0 = the whole split),
- test: the first ``test_subset`` test examples (0 = the whole split).

Per split and per quantity Q ∈ {L, E}:

- Frankle/Fort barrier   B_FF = max_α Q(α) − ½(Q(0) + Q(1))
- Entezari barrier       B_E  = max_α [Q(α) − ((1−α)Q(0) + αQ(1))]
- the arg-max α of each.

Along with it: child disagreement D = (1/N) Σ_i [ŷ₁(x_i) ≠ ŷ₂(x_i)] on the test subset (Fort, Hu,
Lakshminarayanan 2019), D / (½(E₁ + E₂)) with E the endpoints' test errors (null when both are 0),
and the weight distance ‖w₁ − w₂‖₂ over trainable parameters (and relative to ‖w₁‖₂).

BatchNorm (``BATCHNORM`` = "recomputed", the ``batchnorm`` column of ``probe_job``): at every α,
endpoints included, the running statistics are recomputed from one train-mode pass over the train
subset (``n_train`` examples; reset, then a cumulative average) and L, E measured in eval mode with
them (``_directions.recompute_bn_stats``; Frankle et al. 2020), because interpolated weights and
interpolated statistics do not match. ``bn_recompute = false`` evaluates the interpolated stored
statistics instead ("running"). A no-op for BatchNorm-free models ("none").

Pairs: the final checkpoints of every two sibling children (role "siblings", anchored at the
parent's spawn checkpoint), init ↔ final of every finished parent run (role "init_final",
anchored at the init), with ``cross_init`` the final checkpoints of every two parents of one variant
with different seeds (role "cross_init", anchored at the lower seed's final checkpoint), and any pair
named in ``pairs`` (role "pair", anchored at the first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsdb.errors import ProbeError
from lsdb.spec import MAX_BATCH, MAX_EXAMPLES, MAX_SEED, between, check, one_of, positive

from . import _directions as D
from .base import (JobRequest, ProbeContext, Study, checkpoint_refs_ok, cross_init_pairs, resolve_checkpoint_refs,
                   sibling_final_pairs)

VERSION = 1
TABLES = ("barrier", "barrier_curve")
BATCHNORM = "recomputed"  # unless bn_recompute = false


MAX_POINTS = 10_001  # α values on one path (a grid step of 1e-4)


@dataclass(frozen=True)
class Params:
    points: int = field(default=21, metadata=between(2, MAX_POINTS))
    train_subset: int = field(default=1000, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    test_subset: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    subset_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    bn_recompute: bool = True
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))
    # evaluation: "auto" | "vmap" (many α per pass) | "fused" (oneDNN, CPU) | "loop"
    mode: str = field(default="auto", metadata=one_of(*D.MODES))
    siblings: bool = True
    init_final: bool = True
    # the final checkpoints of every two parents of one variant with different seeds (role
    # "cross_init"): the same measures for nets of different initialisation as ``siblings`` gives for
    # nets of different data order (the determinism comparison, docs/merging.md)
    cross_init: bool = False
    # extra pairs, each "RUN@STEP RUN@STEP" (STEP may be "init" or "final")
    pairs: tuple[str, ...] = field(default=(), metadata=check(
        lambda v: all(checkpoint_refs_ok(p, 2, 2) for p in v),
        "must list pairs of checkpoints 'RUN@STEP RUN@STEP' (STEP an integer, 'init' or 'final')"))


# --------------------------------------------------------------------------------------- plan

def plan(study: Study, params: Params) -> list[JobRequest]:
    jobs = sibling_final_pairs(study) if params.siblings else []
    if params.init_final:
        for r in study.runs:
            if r.kind == "parent" and r.status == "finished" and len(r.checkpoints) >= 2:
                jobs.append(JobRequest((r.init.id, r.final.id), r.init.id, "init_final"))
    if params.cross_init:
        jobs += cross_init_pairs(study)
    for text in params.pairs:
        ca, cb = resolve_checkpoint_refs(study, text, "probes.barrier.pairs")
        if ca is not None and cb is not None:
            jobs.append(JobRequest((ca.id, cb.id), ca.id, "pair"))
    return jobs


# ------------------------------------------------------------------------------------ compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    if len(ctx.states) != 2:
        raise ProbeError(f"barrier needs two checkpoints, got {len(ctx.states)}")
    if params.points < 2:
        raise ProbeError(f"probes.barrier.points = {params.points} must be at least 2")
    model = ctx.model
    s1 = D.prepare_state(model, ctx.states[0], ctx.device, ctx.dtype)
    s2 = D.prepare_state(model, ctx.states[1], ctx.device, ctx.dtype)
    (f1, fixed), (f2, _) = D.split_float(s1), D.split_float(s2)

    data = ctx.data
    tr = D.fixed_subset(data.x_train.shape[0], params.train_subset, params.subset_seed, ctx.device)
    n_test = data.x_test.shape[0] if params.test_subset <= 0 else min(params.test_subset, data.x_test.shape[0])
    x_tr, y_tr = data.x_train[tr], data.y_train[tr]
    x_te, y_te = data.x_test[:n_test], data.y_test[:n_test]

    alphas = torch.linspace(0.0, 1.0, params.points, dtype=torch.float64)
    curve = interpolation_curve(model, f1, f2, fixed, alphas, (x_tr, y_tr), (x_te, y_te), params)
    D.require_finite(curve["train_loss"], "loss on the interpolation path")
    D.require_finite(curve["test_loss"], "loss on the interpolation path")

    row = {"points": params.points, "n_train": int(x_tr.shape[0]), "n_test": int(n_test),
           "bn_recomputed": bool(params.bn_recompute and D.has_batchnorm(model))}
    for split in ("train", "test"):
        for q in ("loss", "error"):
            s = barrier_stats(alphas, curve[f"{split}_{q}"])
            row[f"{q}_barrier_{split}"] = s["barrier"]
            row[f"argmax_alpha_{q}_{split}"] = s["argmax"]
            row[f"entezari_{q}_barrier_{split}"] = s["entezari"]
            row[f"entezari_argmax_alpha_{q}_{split}"] = s["entezari_argmax"]

    preds = curve["test_predictions"]
    disagreement = float((preds[0] != preds[-1]).double().mean())
    mean_err = 0.5 * (float(curve["test_error"][0]) + float(curve["test_error"][-1]))
    row["disagreement"] = disagreement
    row["disagreement_over_error"] = disagreement / mean_err if mean_err > 0 else None
    names = D.trainable_names(model)
    diff = torch.sqrt(sum(((f1[n] - f2[n]).double() ** 2).sum() for n in names))
    norm1 = torch.sqrt(sum((f1[n].double() ** 2).sum() for n in names))
    row["weight_distance"] = float(diff)
    row["relative_weight_distance"] = float(diff / norm1) if norm1 > 0 else None

    rows = [{"alpha": float(a), "train_loss": float(curve["train_loss"][i]),
             "train_error": float(curve["train_error"][i]), "test_loss": float(curve["test_loss"][i]),
             "test_error": float(curve["test_error"][i])} for i, a in enumerate(alphas)]
    return {"barrier": [row], "barrier_curve": rows}


def interpolation_curve(model, f1, f2, fixed, alphas, train, test, params: Params) -> dict[str, torch.Tensor]:
    """Loss and error at w(α) = (1−α)w₁ + αw₂ for every α, on the train and test subsets
    (plus the test predictions at every α)."""
    coeffs = torch.stack([1.0 - alphas, alphas], dim=1)
    basis = [f1, f2]
    out = {}
    for split, (x, y) in (("train", train), ("test", test)):
        ev = D.evaluate_points(model, basis, coeffs, fixed, x, y, bn_stats=train[0] if params.bn_recompute else None,
                               batch_size=params.batch_size, mode=params.mode, predictions=split == "test")
        out[f"{split}_loss"], out[f"{split}_error"] = ev.loss, ev.error
        if split == "test":
            out["test_predictions"] = ev.predictions
    return out


def barrier_stats(alphas: torch.Tensor, values: torch.Tensor) -> dict[str, float]:
    """Frankle/Fort and Entezari barriers of one curve Q(α) on the grid ``alphas`` (α₀ = 0, α₋₁ = 1)."""
    a = alphas.to(values.device, torch.float64)
    v = values.double()
    q0, q1 = v[0], v[-1]
    i = int(torch.argmax(v))
    excess = v - ((1 - a) * q0 + a * q1)
    j = int(torch.argmax(excess))
    return {"barrier": float(v[i] - 0.5 * (q0 + q1)), "argmax": float(a[i]),
            "entezari": float(excess[j]), "entezari_argmax": float(a[j])}
