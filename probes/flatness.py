"""``flatness``: filter-normalised sharpness around a checkpoint, random and worst case, and the
input-space adversarial error (Li et al. 2018; Prabhu et al. 2019; docs/findings.md).

L(w) is the mean cross-entropy on a fixed subset of ``train_subset`` training examples (drawn with
``subset_seed``; the same at every checkpoint). d_1 … d_m are m = ``directions`` filter-normalised
Gaussian directions (``_directions.filter_normalised_direction``, drawn with ``direction_seed``).

- σ_1D = (1/m) Σ_j mean_{α∈A} [L(w + α d_j) − L(w)], A = ``points`` values evenly spaced on [−1, 1].
- κ = (1/m) Σ_j 2·c₂,j where c₂,j is the α² coefficient of the least-squares quadratic fit of
  L(w + α d_j) on ``curvature_points`` values evenly spaced on [−0.2, 0.2] (for a quadratic L,
  κ = (1/m) Σ_j d_jᵀ ∇²L d_j exactly). Both also stored with their std over directions.
- Worst-case sharpness = max_{ε∈B_ρ} L(w + ε) − L(w) over the filter-normalised ball
  B_ρ = {ε : ‖ε_f‖₂ ≤ ρ‖w_f‖₂ for every filter f (slice along dim 0 of a trainable tensor of
  dimension ≥ 2 outside normalisation layers), ε = 0 on every other tensor}, which contains ρ·d for
  every filter-normalised direction d. Found by projected gradient ascent: ``restarts`` starts at
  ρ·u·d (d a fresh filter-normalised direction, u uniform on [0, 1]), ``ascent_steps`` steps
  ε_f ← Π(ε_f + η ρ‖w_f‖ g_f/‖g_f‖) with η = 2.5/steps, Π the per-filter projection onto the ball;
  the best value seen is kept (a lower bound on the true maximum). Stored next to the largest
  random-direction value at the same radius, max_j max(L(w ± ρ d_j)) − L(w).
- Adversarial error on the test split under FGSM and PGD-``pgd_steps`` (step 2.5ε/steps, no random
  start) with L∞ radius ``epsilon`` in standardised input units (``lsdb.train.adversarial``).

Scope (``params``, fnmatch globs on the names of ``model.named_parameters()``, e.g. ["layer3.*"];
empty = every parameter): the directions d_j and the ball's ε are then nonzero only on the matching
parameters (filter normalisation per matching tensor, by the rule above: tensors of dimension ≥ 2
outside normalisation layers), every other parameter stays at the checkpoint's value. A glob
matching no parameter, or a scope holding no tensor that filter normalisation perturbs (only
biases, say), fails the job with a message. The adversarial errors perturb inputs, never weights,
and do not depend on the scope.

BatchNorm (``BATCHNORM`` = "recomputed", the ``batchnorm`` column of ``probe_job``): directions and
ε are zero on BatchNorm parameters and buffers, and L is evaluated in eval mode with running
statistics recomputed at every point it visits (w itself, every w + α d_j, every ascent iterate)
from one train-mode pass over the same ``train_subset`` examples (reset, then a cumulative average;
``_directions.recompute_bn_stats``), as the barrier probe does along its path. The ascent's
gradient holds the recomputed statistics constant. The adversarial errors use the statistics
recomputed at w. ``bn_recompute = false`` keeps the checkpoint's statistics everywhere ("running").
A no-op for BatchNorm-free models ("none").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.func import functional_call, grad

from lsdb.errors import ProbeError
from lsdb.spec import MAX_BATCH, MAX_COUNT, MAX_EXAMPLES, MAX_SEED, between, non_negative, one_of, positive
from lsdb.train.adversarial import perturb

from . import _directions as D
from .base import JobRequest, ProbeContext, Study, each_checkpoint, scope_field, select_params

VERSION = 1
TABLES = ("flatness",)
BATCHNORM = "recomputed"  # unless bn_recompute = false


MAX_DIRECTIONS = 10_000  # random directions per checkpoint
MAX_POINTS = 10_001  # α values along one direction
MAX_RESTARTS = 1_000  # starts of the worst-case ascent
MAX_ASCENT_STEPS = 100_000


@dataclass(frozen=True)
class Params:
    train_subset: int = field(default=1000, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    subset_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    directions: int = field(default=10, metadata=between(1, MAX_DIRECTIONS))
    direction_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    points: int = field(default=21, metadata=between(2, MAX_POINTS))
    # three values at least: a quadratic is fitted to them
    curvature_points: int = field(default=9, metadata=between(3, MAX_POINTS, " (a quadratic fit needs 3)"))
    rho: float = field(default=0.05, metadata=positive())
    restarts: int = field(default=3, metadata=between(0, MAX_RESTARTS, " (0 = no worst-case search)"))
    ascent_steps: int = field(default=10, metadata=between(0, MAX_ASCENT_STEPS))
    epsilon: float = field(default=0.1, metadata=non_negative())
    pgd_steps: int = field(default=10, metadata=between(1, MAX_COUNT))
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))
    mode: str = field(default="auto", metadata=one_of(*D.MODES))
    bn_recompute: bool = True
    params: tuple[str, ...] = scope_field()  # globs on parameter names; () = all (module docstring)


def plan(study: Study, params: Params) -> list[JobRequest]:
    return each_checkpoint(study)


# -------------------------------------------------------------------- maths on a loss function

def sharpness_1d(losses: torch.Tensor, base: float) -> tuple[float, float]:
    """σ_1D from losses (m, len(A)) at w + α d_j: mean over α, then mean (and std) over directions."""
    per_dir = (losses.double() - base).mean(dim=1)
    return float(per_dir.mean()), float(per_dir.std()) if per_dir.numel() > 1 else 0.0


def quadratic_curvature(alphas: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """2·c₂ of the least-squares fit c₀ + c₁α + c₂α² to each row of ``losses`` (m, len(alphas)).

    c₂ = w·y with w the last row of (VᵀV)⁻¹Vᵀ, V = [1, α, α²], computed in plain Python floats with
    exactly rounded sums: LAPACK's least squares rounds differently with the arrays' memory
    alignment, and a stored value must not change from one run to the next."""
    a = [float(x) for x in alphas.double()]
    rows = [[1.0, x, x * x] for x in a]
    gram = [[math.fsum(r[i] * r[j] for r in rows) for j in range(3)] for i in range(3)]
    w = _solve3(gram, [[r[i] for r in rows] for i in range(3)])[2]  # (VᵀV) W = Vᵀ, row c₂
    y = losses.double().tolist()
    return torch.tensor([2 * math.fsum(wi * yi for wi, yi in zip(w, row)) for row in y], dtype=torch.float64)


def _solve3(m: list[list[float]], rhs: list[list[float]]) -> list[list[float]]:
    """Gaussian elimination with partial pivoting on a 3×3 system with several right-hand sides."""
    m = [row[:] + r[:] for row, r in zip(m, rhs)]
    for col in range(3):
        pivot = max(range(col, 3), key=lambda i: abs(m[i][col]))
        m[col], m[pivot] = m[pivot], m[col]
        for i in range(3):
            if i != col:
                f = m[i][col] / m[col][col]
                m[i] = [x - f * y for x, y in zip(m[i], m[col])]
    return [[x / m[i][i] for x in m[i][3:]] for i in range(3)]


def project_to_ball(eps: dict[str, torch.Tensor], w_norms: dict[str, torch.Tensor], rho: float) -> dict[str, torch.Tensor]:
    """Per-filter projection onto {‖ε_f‖ ≤ ρ‖w_f‖}: filters outside are scaled back to the sphere."""
    out = {}
    for n, e in eps.items():
        r = e.flatten(1).norm(dim=1)
        limit = rho * w_norms[n]
        scale = torch.where(r > limit, limit / r.clamp_min(torch.finfo(e.dtype).tiny), torch.ones_like(r))
        out[n] = e * scale.view(-1, *([1] * (e.dim() - 1)))
    return out


def worst_case_sharpness(loss_of, w: dict[str, torch.Tensor], names: list[str], rho: float,
                         starts: list[dict[str, torch.Tensor]], steps: int,
                         stats_at=None) -> tuple[float, dict[str, torch.Tensor]]:
    """max L(w + ε) − L(w) over ε ∈ B_ρ (module docstring) by projected normalised-gradient ascent.

    ``loss_of(params)`` is the loss at a full params dict; ε lives on ``names`` only. ``starts``
    are initial perturbations (dicts over ``names``, inside the ball). ``stats_at(point)``, when
    given, returns buffers (recomputed BatchNorm statistics) that replace the point's own before
    its loss and gradient are taken; the gradient holds them constant. Returns (value, best ε).
    """
    w_norms = {n: w[n].flatten(1).norm(dim=1) for n in names}
    rest = {n: t for n, t in w.items() if n not in names}

    def refreshed(eps):
        point = {**rest, **{n: w[n] + eps[n] for n in names}}
        return stats_at(point) if stats_at else {}

    def loss_fn(extra):
        return lambda eps: loss_of({**rest, **extra, **{n: w[n] + eps[n] for n in names}})

    with torch.no_grad():
        zero = {n: torch.zeros_like(w[n]) for n in names}
        base = float(loss_fn(refreshed(zero))(zero))
    eta = 2.5 / max(1, steps)
    best_val, best_eps = -float("inf"), None
    for start in starts:
        eps = project_to_ball({n: start[n] for n in names}, w_norms, rho)
        for step in range(steps + 1):
            loss_eps = loss_fn(refreshed(eps))  # outside the gradient: a train-mode pass updates buffers
            with torch.no_grad():
                val = float(loss_eps(eps)) - base
            if val > best_val:
                best_val, best_eps = val, {n: e.clone() for n, e in eps.items()}
            if step == steps:
                break
            g = grad(loss_eps)(eps)
            new = {}
            for n in names:
                gn = g[n].flatten(1).norm(dim=1).clamp_min(torch.finfo(g[n].dtype).tiny)
                unit = g[n] / gn.view(-1, *([1] * (g[n].dim() - 1)))
                new[n] = eps[n] + eta * rho * w_norms[n].view(-1, *([1] * (g[n].dim() - 1))) * unit
            eps = project_to_ball(new, w_norms, rho)
    return best_val, best_eps


# ------------------------------------------------------------------------------------ compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    if params.directions < 1 or params.points < 2 or params.curvature_points < 3:
        raise ProbeError("probes.flatness: directions >= 1, points >= 2 and curvature_points >= 3 are needed")
    model = ctx.model
    state = D.prepare_state(model, ctx.states[0], ctx.device, ctx.dtype)
    floats, fixed = D.split_float(state)
    idx = D.fixed_subset(ctx.data.x_train.shape[0], params.train_subset, params.subset_seed, ctx.device)
    x, y = ctx.data.x_train[idx], ctx.data.y_train[idx]
    recompute = params.bn_recompute and bool(D.bn_layers(model))
    scope = select_params(D.trainable_names(model), params.params, "flatness") if params.params else None
    names = D.filter_names(model, floats, scope)
    if not names:
        raise ProbeError(f"probes.flatness.params = {list(params.params)} selects no tensor that filter "
                         f"normalisation perturbs (weights of dimension >= 2 outside normalisation layers)")

    def evaluate(basis, coeffs, xx=x, yy=y):
        return D.evaluate_points(model, basis, coeffs, fixed, xx, yy, bn_stats=x if recompute else None,
                                 batch_size=params.batch_size, mode=params.mode)

    def stats_at(point):
        return D.recompute_bn_stats(model, point, fixed, x, params.batch_size)

    base = evaluate([floats], torch.ones(1, 1, dtype=torch.float64))
    D.require_finite(base.loss)
    L0 = float(base.loss[0])

    gen = torch.Generator().manual_seed(params.direction_seed)
    sigma, sigma_std, kappas, random_at_rho = _random_direction_stats(model, floats, evaluate, gen, L0, params,
                                                                       scope)

    loss_of = D.loss_function(model, fixed, x, y)
    starts = []
    for _ in range(params.restarts):
        d = D.filter_normalised_direction(model, floats, gen, scope)
        u = float(torch.rand((), generator=gen, dtype=torch.float64))
        starts.append({n: params.rho * u * d[n] for n in names})
    was_training = model.training
    model.eval()
    try:
        adv = float("nan")
        if starts:
            adv, _ = worst_case_sharpness(loss_of, floats, names, params.rho, starts, params.ascent_steps,
                                          stats_at if recompute else None)
        at_w = {**state, **stats_at(floats)} if recompute else state
        clean, fgsm, pgd = _adversarial_errors(model, at_w, ctx.data.x_test, ctx.data.y_test, params)
    finally:
        model.train(was_training)
    row = {"n_train": int(x.shape[0]), "train_loss": L0, "directions": params.directions,
           "sharpness_1d": sigma, "sharpness_1d_std": sigma_std, "curvature": float(kappas.mean()),
           "curvature_std": float(kappas.std()) if kappas.numel() > 1 else 0.0, "rho": params.rho,
           "adversarial_sharpness": adv, "random_sharpness_at_rho": random_at_rho, "epsilon": params.epsilon,
           "pgd_steps": params.pgd_steps, "clean_error": clean, "fgsm_error": fgsm, "pgd_error": pgd}
    return {"flatness": [row]}


def _random_direction_stats(model, floats, evaluate, gen, L0: float, params: Params, scope=None):
    """σ_1D (mean, std over directions), κ per direction, and the largest L(w ± ρd) − L(w), from one
    evaluation of every direction on the α grid, the curvature grid and ±ρ together."""
    dirs = [D.filter_normalised_direction(model, floats, gen, scope) for _ in range(params.directions)]
    alphas = torch.linspace(-1.0, 1.0, params.points, dtype=torch.float64)
    near = torch.linspace(-0.2, 0.2, params.curvature_points, dtype=torch.float64)
    grid = torch.cat([alphas, near, torch.tensor([-params.rho, params.rho], dtype=torch.float64)])
    coeffs = torch.stack([torch.ones_like(grid), grid], dim=1)
    per_dir = torch.stack([evaluate([floats, d], coeffs).loss for d in dirs]).cpu()  # (m, len(grid))
    na, nc = params.points, params.curvature_points
    D.require_finite(per_dir[:, : na + nc], "loss near the checkpoint")
    sigma, sigma_std = sharpness_1d(per_dir[:, :na], L0)
    kappas = quadratic_curvature(near, per_dir[:, na:na + nc])
    return sigma, sigma_std, kappas, float(per_dir[:, na + nc:].max()) - L0


def _adversarial_errors(model, state, x, y, params: Params) -> tuple[float, float, float]:
    """Test error on clean inputs and under FGSM / PGD (mini-batches of ``batch_size``)."""
    def model_fn(xb):
        return functional_call(model, state, (xb,))

    wrong = torch.zeros(3, dtype=torch.float64)
    for i in range(0, x.shape[0], params.batch_size):
        xb, yb = x[i:i + params.batch_size], y[i:i + params.batch_size]
        xs = [xb, perturb(model_fn, xb, yb, "fgsm", params.epsilon),
              perturb(model_fn, xb, yb, "pgd", params.epsilon, params.pgd_steps)]
        with torch.no_grad():
            for j, xa in enumerate(xs):
                wrong[j] += float((model_fn(xa).argmax(1) != yb).sum())
    e = wrong / x.shape[0]
    return float(e[0]), float(e[1]), float(e[2])
