"""``soup``: averaging the weights of k networks (mode convexity), against their members and
against ensembling their outputs (Wortsman et al. 2022, "Model soups"; Khan et al. 2024, SoK on
model merging; Frankle et al. 2020 for averaging children of one spawn).

Groups (one job each, the members' checkpoints in order; ``role``, anchor):

- ``spawn_children`` (``spawn_children``): the final checkpoints of the children of one spawn,
  same start, different data order; anchored at the parent's spawn checkpoint.
- ``late_children`` (``late_from`` > 0): the final checkpoints of every child of a parent spawned
  at or after ``late_from`` × the parent's training (a fraction of its epochs), when they come from
  at least two spawn times; anchored at the earliest such spawn checkpoint.
- ``cross_init`` (``cross_init``): the final checkpoints of the finished parents of one variant
  (different seeds, so different initialisations); anchored at the lowest seed's final checkpoint.
- ``set`` (``sets``): the checkpoints each entry names ('RUN@STEP RUN@STEP …', at least two),
  anchored at the first.

Splits. The test split is shuffled once with ``seed``; its first ``select_fraction`` part is the
*selection* half (the held-out data a soup may choose members on), the rest the *report* half,
where every number in the row is measured (``n_select``, ``n_report``), so no reported number has
seen the data it was chosen on. ``select_fraction`` = 0 leaves no selection data: members are
then ranked on the report half and the greedy soup keeps them all.

With members w_1..w_k (trainable parameters and float buffers), on the report half:

- members: test loss and error of each w_i (``soup_member`` rows); their mean; the *best member*:
  the one with the lowest selection error (ties: lowest selection loss, then order), its report
  loss and error;
- uniform soup w̄ = (1/k) Σ_i w_i: its loss and error; ``mean_distance_to_average`` =
  (1/k) Σ_i ‖w_i − w̄‖₂ over trainable parameters;
- greedy soup (Wortsman et al. 2022, Recipe 1): members sorted by selection error (then loss);
  start from the first; add the next to the average if the average with it has a selection error
  no higher than without it; ``greedy_size`` members kept; its report loss and error;
- ensemble: the mean of the members' logits, f̄(x) = (1/k) Σ_i f(x; w_i); its cross-entropy and
  error;
- ``cross_init`` groups of a model weight matching can align (mlp, cnn1d, cnn2d; see
  ``lsdb.probes.merge``): every member aligned to the first by weight matching, then averaged
  (``matched_uniform_*``); null for other groups and models.

Averaging k copies of one network returns it: every number of the soup equals the member's.

BatchNorm (``BATCHNORM`` = "recomputed", the ``batchnorm`` column of ``probe_job``): every
evaluated weight vector (members and soups alike) gets its running statistics recomputed from one
train-mode pass over ``train_subset`` training examples (as the ``barrier`` probe does); the
ensemble's members use the same recomputed statistics. ``bn_recompute = false`` averages the stored
statistics instead ("running").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import MAX_BATCH, MAX_EXAMPLES, MAX_SEED, between, check, positive

from . import _directions as D
from .base import (JobRequest, ProbeContext, Study, checkpoint_refs_ok, cross_init_groups, resolve_checkpoint_refs)
from .merge import layer_chain, match_weights, permute_state

VERSION = 1
TABLES = ("soup", "soup_member")
BATCHNORM = "recomputed"  # unless bn_recompute = false

MAX_MEMBERS = 256  # checkpoints in one group
MAX_SETS = 1000


@dataclass(frozen=True)
class Params:
    spawn_children: bool = True
    # children spawned at or after this fraction of the parent's epochs form one group (0 = off)
    late_from: float = field(default=0.0, metadata=between(0.0, 1.0))
    cross_init: bool = True
    # extra groups, each 'RUN@STEP RUN@STEP …' (STEP an integer, 'init' or 'final'), 2..MAX_MEMBERS
    sets: tuple[str, ...] = field(default=(), metadata=check(
        lambda v: len(v) <= MAX_SETS and all(checkpoint_refs_ok(s, 2, MAX_MEMBERS) for s in v),
        f"must list groups of 2 to {MAX_MEMBERS} checkpoints 'RUN@STEP RUN@STEP …' (STEP an integer, 'init' "
        f"or 'final'), at most {MAX_SETS} groups"))
    select_fraction: float = field(default=0.5, metadata=between(0.0, 0.9))
    seed: int = field(default=0, metadata=between(0, MAX_SEED))  # the test split's shuffle, the train subset
    train_subset: int = field(default=1000, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    bn_recompute: bool = True
    match_sweeps: int = field(default=20, metadata=between(1, 10_000))
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))


# --------------------------------------------------------------------------------------- plan

def plan(study: Study, params: Params) -> list[JobRequest]:
    jobs = []
    if params.spawn_children:
        jobs += _spawn_groups(study)
    if params.late_from > 0:
        jobs += _late_groups(study, params.late_from)
    if params.cross_init:
        for runs in cross_init_groups(study):
            if len(runs) >= 2 and len({r.seed for r in runs}) == len(runs):
                jobs.append(JobRequest(tuple(r.final.id for r in runs), runs[0].final.id, "cross_init"))
    for text in params.sets:
        found = resolve_checkpoint_refs(study, text, "probes.soup.sets")
        if all(c is not None for c in found):
            jobs.append(JobRequest(tuple(c.id for c in found), found[0].id, "set"))
    return jobs


def _finished_children(study: Study) -> list:
    return [r for r in study.runs
            if r.kind == "child" and r.parent_checkpoint_id and r.status == "finished" and r.checkpoints]


def _spawn_groups(study: Study) -> list[JobRequest]:
    groups: dict[str, list] = {}
    for r in _finished_children(study):
        groups.setdefault(r.parent_checkpoint_id, []).append(r)
    return [JobRequest(tuple(r.final.id for r in sorted(kids, key=lambda r: r.child_index or 0)), anchor,
                       "spawn_children")
            for anchor, kids in groups.items() if len(kids) >= 2]


def _late_groups(study: Study, late_from: float) -> list[JobRequest]:
    by_parent: dict[str, list] = {}
    for r in _finished_children(study):
        if r.spawn_epoch is not None and r.epochs > 0 and r.spawn_epoch >= late_from * r.epochs - 1e-9:
            by_parent.setdefault(r.parent_run_id, []).append(r)
    jobs = []
    for kids in by_parent.values():
        kids.sort(key=lambda r: (r.spawn_epoch, r.child_index or 0))
        if len(kids) >= 2 and len({r.parent_checkpoint_id for r in kids}) >= 2:
            jobs.append(JobRequest(tuple(r.final.id for r in kids), kids[0].parent_checkpoint_id, "late_children"))
    return jobs


# ------------------------------------------------------------------------------------ compute

@dataclass
class _Split:
    x: torch.Tensor
    y: torch.Tensor


def split_test(n: int, fraction: float, seed: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(selection indices, report indices) of a test split of ``n`` examples, shuffled with ``seed``."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=g).to(device)
    k = int(fraction * n)
    return order[:k], order[k:]


def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    k = len(ctx.states)
    if k < 2:
        raise ProbeError(f"soup needs at least two checkpoints, got {k}")
    model = ctx.model
    states = [D.prepare_state(model, s, ctx.device, ctx.dtype) for s in ctx.states]
    for s in states:
        if not all(bool(torch.isfinite(v).all()) for v in s.values() if v.is_floating_point()):
            raise ProbeSkipped("non-finite weights (diverged checkpoint)")
    floats = [D.split_float(s)[0] for s in states]
    fixed = D.split_float(states[0])[1]

    data = ctx.data
    sel_idx, rep_idx = split_test(data.x_test.shape[0], params.select_fraction, params.seed, ctx.device)
    if rep_idx.numel() == 0:
        raise ProbeError("probes.soup.select_fraction leaves no test examples to report on")
    report = _Split(data.x_test[rep_idx], data.y_test[rep_idx])
    select = _Split(data.x_test[sel_idx], data.y_test[sel_idx]) if sel_idx.numel() else report
    tr = D.fixed_subset(data.x_train.shape[0], params.train_subset, params.seed, ctx.device)
    bn_x = data.x_train[tr] if params.bn_recompute else None

    def evaluate(coeffs: torch.Tensor, split: _Split) -> D.Evaluation:
        ev = D.evaluate_points(model, floats, coeffs, fixed, split.x, split.y, bn_stats=bn_x,
                               batch_size=params.batch_size)
        D.require_finite(ev.loss, "loss of a soup")
        return ev

    eye = torch.eye(k, dtype=torch.float64)
    uniform = torch.full((1, k), 1.0 / k, dtype=torch.float64)
    members_sel = evaluate(eye, select)
    rep = evaluate(torch.cat([eye, uniform]), report)
    m_loss, m_err = rep.loss[:k].double(), rep.error[:k].double()

    # members ranked by selection error, then loss, then order (a stable sort keeps the order)
    order = sorted(range(k), key=lambda i: (float(members_sel.error[i]), float(members_sel.loss[i])))
    best = order[0]
    kept = greedy_soup(order, members_sel, lambda c: evaluate(c, select), k)
    greedy = evaluate(_mean_row(kept, k), report)

    ens_loss, ens_err = ensemble(model, states, report, bn_x, params.batch_size)
    row = {
        "k": k, "n_select": int(sel_idx.numel()), "n_report": int(rep_idx.numel()),
        "members_mean_test_loss": float(m_loss.mean()), "members_mean_test_error": float(m_err.mean()),
        "best_member_test_loss": float(m_loss[best]), "best_member_test_error": float(m_err[best]),
        "uniform_test_loss": float(rep.loss[k]), "uniform_test_error": float(rep.error[k]),
        "greedy_size": len(kept), "greedy_test_loss": float(greedy.loss[0]),
        "greedy_test_error": float(greedy.error[0]),
        "ensemble_test_loss": ens_loss, "ensemble_test_error": ens_err,
        "mean_distance_to_average": _spread(floats, D.trainable_names(model)),
        "matched_uniform_test_loss": None, "matched_uniform_test_error": None,
    }
    if ctx.role == "cross_init":
        matched = matched_average(model, states, params.match_sweeps, params.seed)
        if matched is not None:
            ev = D.evaluate_points(model, [D.split_float(matched)[0]], torch.ones(1, 1, dtype=torch.float64), fixed,
                                   report.x, report.y, bn_stats=bn_x, batch_size=params.batch_size)
            row["matched_uniform_test_loss"], row["matched_uniform_test_error"] = float(ev.loss[0]), float(ev.error[0])
    members = [{"member": i, "member_checkpoint_id": ctx.checkpoints[i].id, "test_loss": float(m_loss[i]),
                "test_error": float(m_err[i]), "select_error": float(members_sel.error[i]),
                "in_greedy_soup": i in kept} for i in range(k)]
    return {"soup": [row], "soup_member": members}


def _mean_row(members: list[int], k: int) -> torch.Tensor:
    row = torch.zeros(1, k, dtype=torch.float64)
    row[0, members] = 1.0 / len(members)
    return row


def greedy_soup(order: list[int], members_sel: D.Evaluation, evaluate, k: int) -> list[int]:
    """Wortsman et al.'s greedy soup: walk the members best first, keep one when the average with
    it errs no more on the selection data than the average without it (ties broken by loss)."""
    kept = [order[0]]
    best = (float(members_sel.error[order[0]]), float(members_sel.loss[order[0]]))
    for i in order[1:]:
        ev = evaluate(_mean_row(kept + [i], k))
        score = (float(ev.error[0]), float(ev.loss[0]))
        if score[0] <= best[0]:
            kept.append(i)
            best = score
    return sorted(kept)


def ensemble(model, states, split: _Split, bn_x, batch_size: int) -> tuple[float, float]:
    """Cross-entropy and error of the members' mean logits on ``split``."""
    total = None
    for s in states:
        if bn_x is not None and D.bn_layers(model):
            floats, fixed = D.split_float(s)
            s = {**s, **D.recompute_bn_stats(model, floats, fixed, bn_x, batch_size)}
        logits = _logits(model, s, split.x, batch_size)
        total = logits if total is None else total + logits
    mean = total / len(states)
    loss = float(F.cross_entropy(mean, split.y))
    D.require_finite(loss, "loss of the ensemble")
    return loss, float((mean.argmax(-1) != split.y).double().mean())


def _logits(model, state, x, batch_size: int) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            return torch.cat([functional_call(model, state, (x[i:i + batch_size],)).double()
                              for i in range(0, x.shape[0], batch_size)])
    finally:
        model.train(was)


def matched_average(model, states, sweeps: int, seed: int):
    """The mean of the members after aligning each to the first by weight matching; None for a
    model weight matching cannot align (``lsdb.probes.merge``)."""
    try:
        chain = layer_chain(model)
    except ProbeError:
        return None
    ref = states[0]
    aligned = [ref]
    for s in states[1:]:
        perms, _ = match_weights(chain, ref, s, sweeps, seed)
        aligned.append(permute_state(chain, s, perms))
    return {n: (sum(a[n] for a in aligned) / len(aligned)) if ref[n].is_floating_point() else ref[n] for n in ref}


def _spread(floats, names) -> float:
    k = len(floats)
    mean = {n: sum(f[n].double() for f in floats) / k for n in names}
    return sum(float(torch.sqrt(sum(((f[n].double() - mean[n]) ** 2).sum() for n in names))) for f in floats) / k
