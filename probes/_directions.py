"""Shared machinery of the geometry probes: parameter spaces, filter-normalised directions, and
evaluation of many parameter points per forward pass.

Every point the geometry probes visit is a linear combination of a few whole state dicts:

- barrier:  w(α) = (1−α)·w₁ + α·w₂            basis [w₁, w₂],     coefficients (1−α, α)
- flatness: w + α·d                           basis [w, d],       coefficients (1, α)
- slice:    w + a·d₁ + b·d₂                    basis [w, d₁, d₂],  coefficients (1, a, b)

so one evaluator, ``evaluate_combinations``, serves all three. It stacks a chunk of points along a
new leading dimension and runs ``torch.func.functional_call`` under ``vmap`` (one grouped forward
pass for many points, for the GPU), or loops over points: with fused oneDNN kernels on the CPU
(``_fused``) where the model allows, else with ``functional_call``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from lsdb.errors import ProbeError, ProbeSkipped

from ._fused import fused_forward

_NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm1d,
               nn.InstanceNorm2d, nn.InstanceNorm3d)


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def norm_param_names(model: nn.Module) -> set[str]:
    """Names of parameters owned by normalisation layers (their directions are zeroed)."""
    out = set()
    for mname, m in model.named_modules():
        if isinstance(m, _NORM_TYPES):
            out |= {f"{mname}.{p}" if mname else p for p, _ in m.named_parameters(recurse=False)}
    return out


def prepare_state(model: nn.Module, state: dict[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors on ``device``; floating tensors cast to ``dtype``.

    Raises ``ProbeError`` naming the missing or surplus keys when the state does not fit the model.
    """
    want = set(model.state_dict().keys())
    have = set(state.keys())
    if want != have:
        missing, extra = sorted(want - have)[:5], sorted(have - want)[:5]
        raise ProbeError(f"checkpoint does not fit the model: missing {missing}, unexpected {extra}")
    return {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in state.items()}


def split_float(state: dict[str, torch.Tensor]):
    """(floating tensors, the rest) — only floating tensors are combined; integer buffers ride along."""
    floats = {k: v for k, v in state.items() if v.is_floating_point()}
    rest = {k: v for k, v in state.items() if not v.is_floating_point()}
    return floats, rest


def trainable_names(model: nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


# ----------------------------------------------------------------------------- directions

def filter_normalised_direction(model: nn.Module, state: dict[str, torch.Tensor],
                                generator: torch.Generator, scope: list[str] | None = None) -> dict[str, torch.Tensor]:
    """A random direction shaped like ``state``, filter-normalised (Li et al. 2018, §4).

    d ~ N(0, I) for every trainable parameter (every one in ``scope``, when given); for each tensor
    of dimension ≥ 2 every filter (slice along dim 0) is rescaled, d_f ← d_f · ‖w_f‖ / ‖d_f‖, so
    ‖d_f‖ = ‖w_f‖. Directions of 1-D tensors (biases, norm-layer scales), of every
    normalisation-layer parameter, of parameters outside ``scope`` and of all buffers are zero.
    Draws are made on the CPU from ``generator`` so a seed gives the same direction on every device.
    """
    params = set(trainable_names(model) if scope is None else scope)
    skip = norm_param_names(model)
    out = {}
    for name, w in state.items():
        if not w.is_floating_point():
            continue
        if name not in params or name in skip or w.dim() <= 1:
            out[name] = torch.zeros_like(w)
            continue
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(device=w.device, dtype=w.dtype)
        d_norm = d.flatten(1).norm(dim=1)
        w_norm = w.flatten(1).norm(dim=1)
        scale = torch.where(d_norm > 0, w_norm / d_norm, torch.zeros_like(d_norm))
        out[name] = d * scale.view(-1, *([1] * (w.dim() - 1)))
    return out


def filter_norms(tensors: dict[str, torch.Tensor], names) -> dict[str, torch.Tensor]:
    """‖t_f‖₂ for every filter f (slice along dim 0) of each named tensor of dimension ≥ 2."""
    return {n: tensors[n].flatten(1).norm(dim=1) for n in names if tensors[n].dim() >= 2}


def filter_names(model: nn.Module, state: dict[str, torch.Tensor], scope: list[str] | None = None) -> list[str]:
    """The tensors that filter normalisation perturbs: trainable (and in ``scope``, when given),
    dim ≥ 2, not in a norm layer."""
    skip = norm_param_names(model)
    names = trainable_names(model) if scope is None else [n for n in trainable_names(model) if n in set(scope)]
    return [n for n in names if n not in skip and state[n].dim() >= 2]


# ----------------------------------------------------------------------------- evaluation

@dataclass
class Evaluation:
    """Mean cross-entropy and error (fraction misclassified) at each of K points."""

    loss: torch.Tensor  # (K,)
    error: torch.Tensor  # (K,)
    predictions: torch.Tensor | None = None  # (K, N) predicted labels, when asked for


def combine(basis: list[dict[str, torch.Tensor]], coeffs: torch.Tensor) -> dict[str, torch.Tensor]:
    """Stacked points Σ_b coeffs[:, b] · basis[b], shape (K, *shape) per tensor.

    Written as an explicit sum rather than a matmul so coefficient rows such as (1, 0) reproduce a
    basis tensor bit for bit (the barrier's endpoints must be exact).
    """
    out = {}
    for name in basis[0]:
        acc = None
        for b, tensors in enumerate(basis):
            t = tensors[name]
            term = coeffs[:, b].to(t.dtype).view(-1, *([1] * t.dim())) * t
            acc = term if acc is None else acc + term
        out[name] = acc
    return out


#: How ``evaluate_combinations`` may evaluate points (the ``mode`` key of barrier, slice, flatness).
MODES = ("auto", "vmap", "fused", "loop")


def evaluate_combinations(model: nn.Module, basis: list[dict[str, torch.Tensor]], coeffs: torch.Tensor,
                          fixed: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, *,
                          batch_size: int = 1000, chunk_rows: int = 1 << 16, mode: str = "auto",
                          predictions: bool = False) -> Evaluation:
    """Loss and error of the model at every point Σ_b coeffs[k, b]·basis[b], on (x, y).

    loss[k] = (1/N) Σ_i CE(f(x_i; w_k), y_i); error[k] = (1/N) Σ_i [argmax f(x_i; w_k) ≠ y_i].
    ``mode``:

    - "vmap": up to ``chunk_rows // batch`` points in one vmapped forward pass;
    - "fused": one point at a time through fused oneDNN kernels (CPU, float32, models that list
      their layers; see ``_fused``);
    - "loop": one point at a time through ``functional_call``;
    - "auto": vmap on CUDA unless the model has BatchNorm (whose batched running statistics vmap
      does not support); on the CPU fused where it applies, else loop. On the CPU vmap's grouped
      convolutions measured 2–5× slower than a loop and fused 1.6–1.9× faster
      (benchmarks/barrier.py).

    The model is evaluated in eval mode.
    """
    coeffs = torch.as_tensor(coeffs, device=x.device)
    if coeffs.dim() != 2 or coeffs.shape[1] != len(basis):
        raise ProbeError(f"coefficients must be (K, {len(basis)}), got {tuple(coeffs.shape)}")
    fused = None
    if mode in ("auto", "fused") and x.shape[0] > 0:
        first = {name: t[0] for name, t in combine(basis, coeffs[:1]).items()}
        fused = fused_forward(model, {**first, **fixed}, x)
    if mode == "auto":
        mode = "vmap" if x.device.type == "cuda" and not has_batchnorm(model) else "fused" if fused else "loop"
    if mode == "fused" and fused is None:
        raise ProbeError(f"evaluation mode 'fused' needs the CPU, float32, oneDNN and a model made of "
                         f"convolutions, ReLU and linear layers; {type(model).__name__} on {x.device.type} in "
                         f"{x.dtype} does not qualify (use mode 'auto' or 'loop')")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if mode == "vmap":
                return _evaluate_vmap(model, basis, coeffs, fixed, x, y, batch_size, chunk_rows, predictions)
            if mode in ("loop", "fused"):
                return _evaluate_loop(model, basis, coeffs, fixed, x, y, batch_size, predictions, forward=fused)
            raise ProbeError(f"unknown evaluation mode '{mode}'; valid: auto, vmap, fused, loop")
    finally:
        model.train(was_training)


def _batch_stats(logits: torch.Tensor, yb: torch.Tensor):
    """Summed cross-entropy, error count and predictions over the last-but-one (example) dim."""
    c = logits.shape[-1]
    lead = logits.shape[:-1]
    ce = F.cross_entropy(logits.reshape(-1, c), yb.expand(lead).reshape(-1), reduction="none").view(lead)
    pred = logits.argmax(-1)
    return ce.sum(-1), (pred != yb).sum(-1), pred


def _evaluate_vmap(model, basis, coeffs, fixed, x, y, batch_size, chunk_rows, want_pred):
    n, k_total = x.shape[0], coeffs.shape[0]
    batch = min(batch_size, n)
    per_chunk = max(1, chunk_rows // batch)

    def forward(point, xb):
        return functional_call(model, (point, fixed), (xb,))

    batched = vmap(forward, in_dims=(0, None))
    losses, errors, preds = [], [], []
    for start in range(0, k_total, per_chunk):
        points = combine(basis, coeffs[start:start + per_chunk])
        k = coeffs[start:start + per_chunk].shape[0]
        loss = torch.zeros(k, dtype=torch.float64, device=x.device)
        err = torch.zeros(k, dtype=torch.float64, device=x.device)
        pred_parts = []
        for i in range(0, n, batch):
            s_loss, s_err, pred = _batch_stats(batched(points, x[i:i + batch]), y[i:i + batch])
            loss += s_loss.double()
            err += s_err.double()
            if want_pred:
                pred_parts.append(pred)
        losses.append(loss / n)
        errors.append(err / n)
        if want_pred:
            preds.append(torch.cat(pred_parts, dim=1))
    return Evaluation(torch.cat(losses), torch.cat(errors), torch.cat(preds) if want_pred else None)


def _evaluate_loop(model, basis, coeffs, fixed, x, y, batch_size, want_pred, buffers_at=None, forward=None):
    if forward is None:
        def forward(point, xb):
            return functional_call(model, (point, fixed), (xb,))
    n = x.shape[0]
    losses, errors, preds = [], [], []
    # combine a block of points at a time (one op per tensor for the block, ≤ 4 MB in float32)
    per_block = max(1, (1 << 20) // max(1, sum(t.numel() for t in basis[0].values())))
    block = {}
    for k in range(coeffs.shape[0]):
        if k % per_block == 0:
            block = combine(basis, coeffs[k:k + per_block])
        point = {name: t[k % per_block] for name, t in block.items()}
        if buffers_at is not None:
            point.update(buffers_at(k, point))
        loss = torch.zeros((), dtype=torch.float64, device=x.device)
        err = torch.zeros((), dtype=torch.float64, device=x.device)
        pred_parts = []
        for i in range(0, n, batch_size):
            s_loss, s_err, pred = _batch_stats(forward(point, x[i:i + batch_size]), y[i:i + batch_size])
            loss += s_loss.double()
            err += s_err.double()
            pred_parts.append(pred)
        losses.append(loss / n)
        errors.append(err / n)
        if want_pred:
            preds.append(torch.cat(pred_parts))
    return Evaluation(torch.stack(losses), torch.stack(errors), torch.stack(preds) if want_pred else None)


def bn_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's BatchNorm layers that keep running statistics, with their state-dict prefixes."""
    return [(f"{name}." if name else "", m) for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None]


def recompute_bn_stats(model: nn.Module, point: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                       x_stats: torch.Tensor, batch_size: int = 1000) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics recomputed for the weights ``point``: reset (mean 0, variance 1),
    then one pass over ``x_stats`` in train mode with cumulative averaging (momentum None, so the
    result does not depend on batch order), mini-batches of ``batch_size``. Returns the new
    ``running_mean``/``running_var`` entries; ``point`` and ``fixed`` are left alone. No gradient
    flows through them. Frankle et al. 2020 do this on an interpolation path because
    interpolated weights and interpolated running statistics do not match."""
    bns = bn_layers(model)
    state = dict(point)
    for prefix, _ in bns:
        state[prefix + "running_mean"] = torch.zeros_like(point[prefix + "running_mean"])
        state[prefix + "running_var"] = torch.ones_like(point[prefix + "running_var"])
    fresh = dict(fixed)
    for prefix, _ in bns:
        if prefix + "num_batches_tracked" in fresh:
            fresh[prefix + "num_batches_tracked"] = torch.zeros_like(fresh[prefix + "num_batches_tracked"])
    was_training = model.training
    saved = [(m, m.momentum) for _, m in bns]
    model.train()
    try:
        for m, _ in saved:
            m.momentum = None
        with torch.no_grad():
            state = {k: v.detach() for k, v in state.items()}
            for i in range(0, x_stats.shape[0], batch_size):
                # BatchNorm updates the running buffers we pass in place
                functional_call(model, (state, fresh), (x_stats[i:i + batch_size],))
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return {prefix + k: state[prefix + k] for prefix, _ in bns for k in ("running_mean", "running_var")}


def evaluate_with_bn_recompute(model: nn.Module, basis, coeffs, fixed, x, y, x_stats: torch.Tensor, *,
                               batch_size: int = 1000, predictions: bool = False) -> Evaluation:
    """Like ``evaluate_combinations`` for a model with BatchNorm, with the running statistics
    recomputed at every point first (``recompute_bn_stats`` on ``x_stats``), then evaluated in eval
    mode, point by point."""
    coeffs = torch.as_tensor(coeffs, device=x.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return _evaluate_loop(model, basis, coeffs, fixed, x, y, batch_size, predictions,
                                  buffers_at=lambda k, point: recompute_bn_stats(model, point, fixed, x_stats,
                                                                                 batch_size))
    finally:
        model.train(was_training)


def evaluate_points(model: nn.Module, basis, coeffs, fixed, x, y, *, bn_stats: torch.Tensor | None,
                    batch_size: int = 1000, mode: str = "auto", predictions: bool = False) -> Evaluation:
    """The geometry probes' one way to evaluate points: with BatchNorm statistics recomputed on
    ``bn_stats`` at every point when it is given and the model has BatchNorm (point by point;
    ``mode`` does not apply), else ``evaluate_combinations`` in eval mode with the points' own
    running statistics."""
    if bn_stats is not None and bn_layers(model):
        return evaluate_with_bn_recompute(model, basis, coeffs, fixed, x, y, bn_stats, batch_size=batch_size,
                                          predictions=predictions)
    return evaluate_combinations(model, basis, coeffs, fixed, x, y, batch_size=batch_size, mode=mode,
                                 predictions=predictions)


# ----------------------------------------------------------------------------- helpers

def fixed_subset(n: int, size: int, seed: int, device) -> torch.Tensor:
    """``size`` distinct indices out of ``n`` (all when size is 0 or ≥ n), drawn with ``seed``, sorted.
    Independent of the job, so every checkpoint and pair is measured on the same examples."""
    if size <= 0 or size >= n:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values.to(device)


def require_finite(value: torch.Tensor | float, what: str = "loss") -> None:
    v = torch.as_tensor(value)
    if not bool(torch.isfinite(v).all()):
        raise ProbeSkipped(f"non-finite {what}")


def loss_function(model: nn.Module, fixed: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
    """L(params) = mean cross-entropy of the model on (x, y), as a function of a params dict."""

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, (params, fixed), (x,)), y)

    return loss
