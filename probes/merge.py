"""``merge``: linear-mode connectivity of two independently initialised nets, before and after
permutation alignment by weight matching (Ainsworth, Hayase, Srinivasa 2023, "Git Re-Basin",
§3.2; Entezari, Sedghi, Saukh, Neyshabur 2022).

Pairs: the final checkpoints of two finished parent runs of the same variant and different seeds
(seed_a < seed_b), role "cross_init", anchored at the final checkpoint of run a.

**Weight matching.** Write the model as a chain of layers ℓ = 1..L with weights W_ℓ viewed as
(out_ℓ, in_ℓ, r_ℓ) tensors (r = 1 for a Linear layer, the kernel size for a convolution; the
read-out of a CNN, whose input is the flattened (C × S) feature map with index c·S + s, is viewed
as (classes, C, S)) and biases b_ℓ. Hidden layer ℓ < L gets a permutation P_ℓ of its out_ℓ
units/channels; P_0 = P_L = I (inputs and logits are not permuted). Permuting B's hidden units,

    W_ℓ^B ← P_ℓ W_ℓ^B P_{ℓ−1}ᵀ,   b_ℓ^B ← P_ℓ b_ℓ^B,

leaves the function of B unchanged (ReLU acts unit by unit). We maximise

    J(P) = Σ_ℓ ⟨W_ℓ^A, P_ℓ W_ℓ^B P_{ℓ−1}ᵀ⟩_F + ⟨b_ℓ^A, P_ℓ b_ℓ^B⟩

by coordinate descent: one layer's P_ℓ at a time with the others fixed is a linear assignment
problem with gain matrix

    G[i, j] = ⟨W_ℓ^A[i], (W_ℓ^B P_{ℓ−1}ᵀ)[j]⟩ + b_ℓ^A[i]·b_ℓ^B[j]
            + ⟨W_{ℓ+1}^A[:, i], (P_{ℓ+1} W_{ℓ+1}^B)[:, j]⟩

(unit j of B becomes unit i), solved exactly by ``scipy.optimize.linear_sum_assignment``. A
sweep visits the hidden layers in an order drawn from ``seed``; a layer's permutation is replaced
only when it raises J by more than 1e-12·(1 + |J|), and sweeps stop after the first sweep that
changes nothing, or after ``sweeps`` sweeps. ``sweeps`` (the column) is the number run. Starting
point: the identity.

**Barriers.** On the paths w(α) = (1−α)·w_A + α·w_B (naive) and (1−α)·w_A + α·π(w_B) (matched),
α on a uniform grid of ``points`` values in [0, 1], the mean cross-entropy L(α) and error E(α)
on the whole test split and on a fixed subset of ``train_subset`` training examples drawn with
``seed`` (0 = the whole split). Barrier (Frankle et al. 2020; Fort et al. 2020):

    B = max_α Q(α) − ½(Q(0) + Q(1)).

The matched path's endpoints compute the same functions as the naive path's, so both barriers are
measured from the same baseline. Also: the test loss of the uniform average ½(w_A + w_B) naive and
matched, and the weight distances ‖w_A − w_B‖₂ and ‖w_A − π(w_B)‖₂ over trainable parameters.

Supported models: those whose layers ``lsdb.train.models.plain_layers`` lists, i.e. ``mlp``,
``cnn1d``, ``cnn2d``: BatchNorm-free chains of Linear/Conv + ReLU. Anything else raises a
``ProbeError`` naming the model and why, before any work: a model with residual connections (such
as ``resnet20``) would need one permutation shared by every layer that reads or writes a residual
stream, and BatchNorm would need its scale, shift and statistics permuted with its convolution;
this probe builds neither. As a guard, π(w_B) must compute the same logits as w_B on the first
test inputs, or the job fails instead of storing a barrier of a broken alignment.

BatchNorm (``BATCHNORM`` = "refused", the ``batchnorm`` column of ``probe_job``): models with
BatchNorm are refused (above), so every stored row is of a BatchNorm-free model ("none").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torch.func import functional_call

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import MAX_BATCH, MAX_EXAMPLES, MAX_SEED, between, positive
from lsdb.train.models import PLAIN_LAYERS, plain_layers

from . import _directions as D
from .barrier import barrier_stats
from .base import JobRequest, ProbeContext, Study, cross_init_pairs

VERSION = 2  # 2: 21 points on the path by default (the barrier definition asks for >= 21)
TABLES = ("merge",)
BATCHNORM = "refused"


MAX_POINTS = 10_001  # α values on one path
MAX_SWEEPS = 10_000


@dataclass(frozen=True)
class Params:
    points: int = field(default=21, metadata=between(2, MAX_POINTS))
    train_subset: int = field(default=1000, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    # at most this many coordinate-descent sweeps
    sweeps: int = field(default=20, metadata=between(1, MAX_SWEEPS))
    seed: int = field(default=0, metadata=between(0, MAX_SEED))  # layer order of the sweeps and the train subset
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))


# --------------------------------------------------------------------------------------- plan

def plan(study: Study, params: Params) -> list[JobRequest]:
    """One job per unordered pair of finished parent runs of one variant with different seeds."""
    return cross_init_pairs(study)


# ------------------------------------------------------------------------------ layer chain

@dataclass(frozen=True)
class Layer:
    """One layer of the chain: parameter names and how to view its weight as (out, in, r)."""

    weight: str
    bias: str | None
    in_units: int  # size of the (possibly permuted) input dimension

    def view(self, w: torch.Tensor) -> torch.Tensor:
        return w.reshape(w.shape[0], self.in_units, -1)


def layer_chain(model: nn.Module) -> list[Layer]:
    """The layers of a supported model in forward order; hidden units are the outputs of all
    layers but the last."""
    steps = plain_layers(model)
    if steps is None:
        raise ProbeError(f"merge: cannot align {type(model).__name__}: {_why_not(model)}; weight matching "
                         f"aligns chains of convolutions and linear layers with ReLU (models mlp, cnn1d, "
                         f"cnn2d); drop [probes.merge] for this model")
    mods = [(name, m) for name, m in steps if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
    chain = []
    prev_out = None
    for name, m in mods:
        w = m.weight
        # the CNN read-out's input is C·S features; its permuted dimension is the C channels
        in_units = w.shape[1] if prev_out is None or w.dim() > 2 else prev_out
        if w.shape[1] % in_units:
            raise ProbeError(f"merge: layer {name} has {w.shape[1]} inputs, not a multiple of the "
                             f"{in_units} units before it")
        chain.append(Layer(f"{name}.weight", f"{name}.bias" if m.bias is not None else None, in_units))
        prev_out = w.shape[0]
    return chain


def _why_not(model: nn.Module) -> str:
    """Why ``plain_layers`` rejects ``model``, in words for the refusal."""
    why = []
    if D.has_batchnorm(model):
        why.append("it has BatchNorm, whose scale, shift and statistics this probe does not permute")
    if not (hasattr(model, "steps") and hasattr(model, "prepare")):
        why.append("it does not list its layers as a chain (steps()), so it may have residual connections "
                   "or other branches, which need permutations shared across them")
    else:
        kinds = sorted({type(m).__name__ for _, m in model.steps() if type(m) not in PLAIN_LAYERS})
        why.append(f"its layers include {', '.join(kinds) or 'convolutions with non-zero padding modes'}")
    return "; ".join(why)


def check_same_function(model: nn.Module, before: dict[str, torch.Tensor], after: dict[str, torch.Tensor],
                        x: torch.Tensor) -> None:
    """ProbeError unless the permuted state computes the logits of the original on ``x`` (to
    float rounding): the guard against a model whose listed layers are not its whole forward pass."""
    with torch.no_grad():
        a, b = functional_call(model, before, (x,)), functional_call(model, after, (x,))
    scale = float(a.abs().max()) if a.numel() else 0.0
    if not torch.allclose(a, b, rtol=1e-4, atol=1e-5 * max(1.0, scale)):
        raise ProbeError(f"merge: permuting the hidden units of {type(model).__name__} by its listed layers "
                         f"changed its outputs (by up to {float((a - b).abs().max()):.3g}), so its steps() are "
                         f"not its whole forward pass; weight matching cannot align it")


# ---------------------------------------------------------------------------- weight matching

def permute_state(chain: list[Layer], state: dict[str, torch.Tensor],
                  perms: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """π(state): hidden layer ℓ's output units reordered so that new unit i is old unit perms[ℓ][i],
    and the next layer's input units likewise. Computes the same function as ``state``."""
    out = dict(state)
    for k, layer in enumerate(chain):
        w = layer.view(state[layer.weight])
        if k > 0:
            w = w[:, perms[k - 1].to(w.device)]
        if k < len(chain) - 1:
            p = perms[k].to(w.device)
            w = w[p]
            if layer.bias is not None:
                out[layer.bias] = state[layer.bias][p]
        out[layer.weight] = w.reshape(state[layer.weight].shape)
    return out


def match_weights(chain: list[Layer], sa: dict[str, torch.Tensor], sb: dict[str, torch.Tensor],
                  max_sweeps: int, seed: int) -> tuple[list[torch.Tensor], int]:
    """Permutations of B's hidden units maximising J(P) (module docstring) by coordinate descent;
    returns (perms, sweeps run)."""
    wa = [layer.view(sa[layer.weight]).double() for layer in chain]
    wb = [layer.view(sb[layer.weight]).double() for layer in chain]
    ba = [sa[layer.bias].double() if layer.bias else None for layer in chain]
    bb = [sb[layer.bias].double() if layer.bias else None for layer in chain]
    hidden = len(chain) - 1
    device = wa[0].device
    perms = [torch.arange(wa[k].shape[0], device=device) for k in range(hidden)]
    rng = np.random.default_rng(seed)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for k in rng.permutation(hidden):
            gain = _gain(k, wa, wb, ba, bb, perms)
            rows, cols = linear_sum_assignment(gain.cpu().numpy(), maximize=True)
            new = torch.as_tensor(cols[np.argsort(rows)], device=device)
            old_score = float(gain[torch.arange(len(new), device=device), perms[k]].sum())
            new_score = float(gain[torch.arange(len(new), device=device), new].sum())
            if new_score > old_score + 1e-12 * (1 + abs(old_score)):
                perms[k] = new
                changed = True
        if not changed:
            break
    return perms, sweeps


def _gain(k, wa, wb, ba, bb, perms) -> torch.Tensor:
    """G[i, j]: the part of J gained by sending B's unit j of hidden layer k to position i."""
    w_in = wb[k] if k == 0 else wb[k][:, perms[k - 1]]
    g = torch.einsum("ipr,jpr->ij", wa[k], w_in)
    if ba[k] is not None:
        g = g + torch.outer(ba[k], bb[k])
    w_next = wb[k + 1] if k + 1 == len(perms) else wb[k + 1][perms[k + 1]]
    return g + torch.einsum("oir,ojr->ij", wa[k + 1], w_next)


# ------------------------------------------------------------------------------------ compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    if len(ctx.states) != 2:
        raise ProbeError(f"merge needs two checkpoints, got {len(ctx.states)}")
    if params.points < 2:
        raise ProbeError(f"probes.merge.points = {params.points} must be at least 2")
    if params.sweeps < 1:
        raise ProbeError(f"probes.merge.sweeps = {params.sweeps} must be at least 1")
    model = ctx.model
    chain = layer_chain(model)
    sa = D.prepare_state(model, ctx.states[0], ctx.device, ctx.dtype)
    sb = D.prepare_state(model, ctx.states[1], ctx.device, ctx.dtype)
    for s in (sa, sb):
        if not all(bool(torch.isfinite(v).all()) for v in s.values() if v.is_floating_point()):
            raise ProbeSkipped("non-finite weights (diverged checkpoint)")

    perms, sweeps = match_weights(chain, sa, sb, params.sweeps, params.seed)
    sb_matched = permute_state(chain, sb, perms)
    model.eval()
    check_same_function(model, sb, sb_matched, ctx.data.x_test[:64])
    (fa, fixed), (fb, _), (fm, _) = D.split_float(sa), D.split_float(sb), D.split_float(sb_matched)

    data = ctx.data
    tr = D.fixed_subset(data.x_train.shape[0], params.train_subset, params.seed, ctx.device)
    splits = {"train": (data.x_train[tr], data.y_train[tr]), "test": (data.x_test, data.y_test)}
    alphas = torch.linspace(0.0, 1.0, params.points, dtype=torch.float64)
    curves = path_curves(model, fa, fb, fm, fixed, alphas, splits, params.batch_size)

    row = {"points": params.points, "sweeps": sweeps, "n_train": int(tr.shape[0]),
           "n_test": int(data.x_test.shape[0])}
    for path in ("naive", "matched"):
        for split in ("train", "test"):
            for q in ("loss", "error"):
                row[f"{path}_{q}_barrier_{split}"] = barrier_stats(alphas, curves[path, split, q])["barrier"]
        row[f"{path}_midpoint_test_loss"] = float(curves[path, "mid", "loss"])
    names = D.trainable_names(model)
    row["weight_distance_naive"] = _distance(fa, fb, names)
    row["weight_distance_matched"] = _distance(fa, fm, names)
    return {"merge": [row]}


def path_curves(model, fa, fb, fm, fixed, alphas, splits, batch_size) -> dict[tuple, torch.Tensor]:
    """L(α) and E(α) on both paths and both splits, plus the test loss at α = ½ on both paths,
    keyed (path, split, quantity) and (path, "mid", "loss"). One evaluation per split covers
    every point: the basis [w_A, w_B, π(w_B)] with rows (1−α, α, 0) and (1−α, 0, α)."""
    k = alphas.shape[0]
    z = torch.zeros(k, dtype=torch.float64)
    coeffs = torch.cat([torch.stack([1 - alphas, alphas, z], 1), torch.stack([1 - alphas, z, alphas], 1)])
    out = {}
    for split, (x, y) in splits.items():
        rows = coeffs
        if split == "test":
            rows = torch.cat([coeffs, torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.0, 0.5]], dtype=torch.float64)])
        ev = D.evaluate_combinations(model, [fa, fb, fm], rows, fixed, x, y, batch_size=batch_size)
        D.require_finite(ev.loss, "loss on the interpolation path")
        for i, path in enumerate(("naive", "matched")):
            out[path, split, "loss"] = ev.loss[i * k:(i + 1) * k]
            out[path, split, "error"] = ev.error[i * k:(i + 1) * k]
        if split == "test":
            out["naive", "mid", "loss"], out["matched", "mid", "loss"] = ev.loss[2 * k], ev.loss[2 * k + 1]
    return out


def _distance(s1, s2, names) -> float:
    return float(torch.sqrt(sum(((s1[n] - s2[n]).double() ** 2).sum() for n in names)))
