"""``kernel_accuracy`` — how good the kernel machine of the network at time t is.

Two methods, one row each (``method`` column):

- ``linearised`` (Fort et al. 2020): the first-order Taylor model at the checkpoint w_t,

      f_lin(x; w) = f(x; w_t) + J_t(x)(w − w_t),

  trained from w = w_t on the training split with mean cross-entropy, SGD with the run's momentum,
  weight decay (on w) and batch size, minibatches in an order seeded from the job's seed, for
  ``steps`` steps — or, with ``until_end``, for as many steps as a child spawned at t trains
  (the run's total steps minus the checkpoint's step; the paper's protocol, at a constant rate).
  J is never materialised over the training set. For models that list their layers (convolutions,
  linear layers, ReLU, flatten) J_t(x)(w − w_t) is propagated through the layers with the
  checkpoint's activations and ReLU masks cached for every training input (``CachedLinearisation``,
  up to ``cache_mb``; ~1.7× faster per step on the default CNN); otherwise it is a
  ``torch.func.jvp`` at w_t. Both give the same numbers to rounding.
  Learning rate (``lr_mode``): ``fixed`` = run lr × ``lr_factor``; ``kernel_scaled`` =
  ``kernel_lr`` / mean_i Θ^tr_t(x_i, x_i) over the probe set, because Θ_t grows by orders of
  magnitude during training and a fixed rate would make early expansions look bad only by
  training slowly (docs/findings.md, "The default setting"). Train loss/error are on
  the first ``train_eval_size`` training inputs (0 = all), test loss/error on the test split.
- ``kernel_regression``: with X the probe set (n inputs), Y its one-hot labels (n×C),

      f̂(x*) = f_t(x*) + Θ_t(x*, X)(Θ_t(X, X) + λI)⁻¹(Y − f_t(X)),

  with Θ = Θ^tr applied to every logit (``kernel_variant = "trace"``, the default) or the full
  nC×nC kernel (``"full"``). λ = ``ridge`` × mean diagonal of Θ_t(X, X) so that the ridge means
  the same at every t; the row stores λ. Test loss (cross-entropy of f̂ as logits) and error on
  the test split; train loss/error on X itself.

Scope (``params``, fnmatch globs on the names of ``model.named_parameters()``, e.g. ["layer3.*"];
empty = every parameter): J_t, Θ_t and δ = w − w_t are then over the matching parameters only,
the others held at w_t (the linearised model trains that block alone; weight decay applies to it
alone). A glob matching no parameter fails the job, naming it.

BatchNorm (``BATCHNORM`` = "running", the ``batchnorm`` column of ``probe_job``): f, J_t and Θ_t are
those of the network in eval mode, BatchNorm normalising with the checkpoint's running statistics
(fixed: the linearised model trains BatchNorm's scale and shift with the other parameters, never
its statistics), so f_lin(x) depends on x alone, as the ``ntk`` probe's kernel does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jvp

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import MAX_EXAMPLES, between, check, non_negative, one_of, positive
from lsdb.train.models import plain_layers

from . import _ntk_core as core
from .base import ProbeContext, each_checkpoint, scope_field

VERSION = 1
TABLES = ("kernel_accuracy",)
BATCHNORM = "running"
METHODS = ("linearised", "kernel_regression")
LR_MODES = ("fixed", "kernel_scaled")


KERNEL_VARIANTS = ("trace", "full")
KERNEL_CACHE_MB = 1024.0  # Jacobian blocks kept while kernel regression builds Θ(X, X) (lsdb.plan estimates it)
EVAL_BLOCK = 1024  # inputs per kernel-regression prediction at least: the cross kernel is (block × n)
MAX_STEPS = 1_000_000  # linearised training steps
MAX_CHUNK = 1_000_000  # inputs per block
MAX_CACHE_MB = 1_048_576.0  # 1 TiB


@dataclass(frozen=True)
class Params:
    methods: tuple[str, ...] = field(default=METHODS, metadata=check(
        lambda v: len(v) > 0 and all(m in METHODS for m in v), f"must list one or more of {', '.join(METHODS)}"))
    steps: int = field(default=300, metadata=between(0, MAX_STEPS))
    until_end: bool = False  # train as long as a child spawned here would (overrides steps)
    lr_mode: str = field(default="kernel_scaled", metadata=one_of(*LR_MODES))  # fixed | kernel_scaled
    lr_factor: float = field(default=1.0, metadata=positive())  # fixed: lr = run lr × lr_factor
    # kernel_scaled: lr = kernel_lr / mean diagonal of Θ^tr on the probe set
    kernel_lr: float = field(default=10.0, metadata=positive())
    # training inputs for the linearised train metrics (0 = all)
    train_eval_size: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = all)"))
    # kernel regression: λ = ridge × mean diagonal of Θ(X, X)
    ridge: float = field(default=1e-3, metadata=non_negative())
    # trace | full, the Θ of kernel regression
    kernel_variant: str = field(default="trace", metadata=one_of(*KERNEL_VARIANTS))
    chunk: int = field(default=256, metadata=between(1, MAX_CHUNK))  # inputs per block (evaluation and Jacobians)
    # activations cached for the linearised training (0 = always use jvp)
    cache_mb: float = field(default=1024.0, metadata=between(0.0, MAX_CACHE_MB))
    params: tuple[str, ...] = scope_field()  # globs on parameter names; () = all (module docstring)


def plan(study, params: Params):
    return each_checkpoint(study)


def _validate(params: Params) -> None:
    bad = [m for m in params.methods if m not in METHODS]
    if bad:
        raise ProbeError(f"kernel_accuracy.methods: unknown method(s) {bad}; valid: {', '.join(METHODS)}")
    if params.lr_mode not in LR_MODES:
        raise ProbeError(f"kernel_accuracy.lr_mode '{params.lr_mode}' is not one of {', '.join(LR_MODES)}")
    if params.kernel_variant not in ("trace", "full"):
        raise ProbeError(f"kernel_accuracy.kernel_variant '{params.kernel_variant}' must be trace or full")
    if params.steps < 0:
        raise ProbeError(f"kernel_accuracy.steps must be >= 0, got {params.steps}")


# ----------------------------------------------------------------------------- linearised model

def linearised_logits(net: core.Network, delta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f_lin(x; w_t + δ) = f(x; w_t) + J_t(x) δ by one forward-mode pass (jvp) at w_t."""
    out, tangent = jvp(lambda p: net.logits(p, x), (net.params,), (delta,))
    return out + tangent


def _loss_fn(kind: str) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``ce``: mean cross-entropy over the batch, targets are class indices.
    ``mse``: ½ · mean over the batch of ‖f − y‖², targets are (B, C) arrays."""
    if kind == "ce":
        return torch.nn.functional.cross_entropy
    if kind == "mse":
        return lambda logits, y: 0.5 * (logits - y).pow(2).sum(-1).mean()
    raise ProbeError(f"unknown loss '{kind}'; valid: ce, mse")


class CachedLinearisation:
    """f_lin(x_i; w_t + δ) for training inputs x_i, by index, through the model's own layers.

    With the checkpoint's layer inputs h_l and ReLU masks m_l cached for every training input, the
    tangent t = J_t(x)δ follows t_{l+1} = op_l(h_l; δW_l, δb_l) + op_l(t_l; W_l) for a convolution
    or linear layer, m_l ⊙ t_l for a ReLU, and a reshape for a flatten; f_lin = f(x; w_t) + t.
    That is the jvp without recomputing the unchanging primal pass, so a training step costs two
    layer applications forward and their backward. δ may cover only some layers (a probe's
    ``params`` scope): a layer without one adds no δ term, and before the first such layer the
    tangent is zero.
    """

    def __init__(self, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, chunk: int = 1024):
        # ``params``: every layer weight at w_t (the differentiated ones and those held fixed)
        self.steps, self.params = model.steps(), params
        blocks = [_primal(model, self.steps, params, x[s : s + chunk]) for s in range(0, x.shape[0], chunk)]
        self.cached = [None if col[0] is None else torch.cat(col) for col in zip(*[b[0] for b in blocks])]
        self.f0 = torch.cat([b[1] for b in blocks])

    @classmethod
    def build(cls, model: nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor,
              budget_mb: float, buffers: dict[str, torch.Tensor] | None = None) -> "CachedLinearisation | None":
        """The cached linearisation, or None (the caller then takes the jvp) when the model does not
        list supported layers, its listed layers do not compute its forward pass on the first
        inputs (``buffers``: the rest of its state, parameters outside the scope included), or the
        cache would exceed ``budget_mb``."""
        steps = plain_layers(model)
        if steps is None or x.shape[0] == 0:
            return None
        params = {**(buffers or {}), **params}
        one, logits = _primal(model, steps, params, x[:2])
        with torch.no_grad():
            plain = torch.func.functional_call(model, params, (x[:2],))
        if not torch.allclose(logits, plain, rtol=1e-5, atol=1e-6):  # a model whose steps() is not its forward
            return None
        per_input = sum(t[:1].numel() * t.element_size() for t in one if t is not None)
        if per_input * x.shape[0] > budget_mb * 2**20:
            return None
        return cls(model, params, x)

    def __call__(self, delta: dict[str, torch.Tensor], idx: torch.Tensor) -> torch.Tensor:
        t = None  # J δ so far; None while it is zero (the input, and layers before the scope)
        for (name, m), c in zip(self.steps, self.cached):
            if isinstance(m, nn.ReLU):
                t = None if t is None else t * c[idx]
            elif isinstance(m, nn.Flatten):
                t = None if t is None else m(t)
            elif t is not None or f"{name}.weight" in delta or f"{name}.bias" in delta:
                t = None if t is None else _apply(m, t, self.params[f"{name}.weight"], None)
                d_weight, d_bias = delta.get(f"{name}.weight"), delta.get(f"{name}.bias")
                if d_weight is not None or d_bias is not None:  # this layer's own δ term
                    h = c[idx]
                    out = (_apply(m, h, d_weight, d_bias) if d_weight is not None
                           else _bias_only(m, h, d_bias))
                    t = out if t is None else t + out
        return self.f0[idx] if t is None else self.f0[idx] + t


def _primal(model: nn.Module, steps, params: dict[str, torch.Tensor], x: torch.Tensor):
    """What the linearisation caches for a block of inputs (each layer's input, a ReLU's mask,
    None for a flatten) and the block's logits f(x; w_t)."""
    cached = []
    with torch.no_grad():
        h = model.prepare(x)
        for name, m in steps:
            if isinstance(m, nn.ReLU):
                cached.append(h > 0)
                h = torch.relu(h)
            elif isinstance(m, nn.Flatten):
                cached.append(None)
                h = m(h)
            else:
                cached.append(h)
                h = _apply(m, h, params[f"{name}.weight"], params.get(f"{name}.bias"))
    return cached, h


def _bias_only(m: nn.Module, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The tangent of a layer whose bias alone is differentiated: δb broadcast over the output of
    ``m`` at input ``h`` (its shape found by applying ``m``'s weight shape with zeros)."""
    zero = torch.zeros_like(m.weight, dtype=h.dtype, device=h.device)
    return _apply(m, h, zero, bias)


def _apply(m: nn.Module, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Layer ``m`` (convolution or linear) applied to ``h`` with the given weight and bias."""
    if isinstance(m, nn.Linear):
        return F.linear(h, weight, bias)
    conv = F.conv1d if isinstance(m, nn.Conv1d) else F.conv2d
    return conv(h, weight, bias, m.stride, m.padding, m.dilation, m.groups)


def train_linearised(net: core.Network, x: torch.Tensor, y: torch.Tensor, *, lr: float, steps: int,
                     batch_size: int, momentum: float = 0.0, weight_decay: float = 0.0,
                     loss: str = "ce", seed: int = 0,
                     cached: CachedLinearisation | None = None) -> dict[str, torch.Tensor]:
    """Train the linearised model from δ = w − w_t = 0 and return δ.

    SGD as ``torch.optim.SGD``: g = ∇_δ L + wd·(w_t + δ); b ← μ·b + g; δ ← δ − lr·b. Each epoch
    visits the training inputs in a fresh permutation drawn from a generator seeded with ``seed``
    (the last partial batch included); ``batch_size >= len(x)`` is full-batch gradient descent.
    ``cached`` (built on the same ``x``) replaces the jvp by the cached layer-wise tangent.
    """
    loss_of = _loss_fn(loss)
    if cached is None:
        def logits_of(d, idx):
            return linearised_logits(net, d, x[idx])
    else:
        logits_of = cached
    delta = {k: torch.zeros_like(v) for k, v in net.params.items()}
    buf = {k: torch.zeros_like(v) for k, v in net.params.items()}
    n = x.shape[0]
    batch_size = min(int(batch_size), n)
    gen = torch.Generator().manual_seed(int(seed))
    order, pos = None, n
    for _ in range(int(steps)):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen).to(x.device), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        leaves = {k: v.detach().requires_grad_(True) for k, v in delta.items()}
        with torch.enable_grad():
            grads = torch.autograd.grad(loss_of(logits_of(leaves, idx), y[idx]), list(leaves.values()))
        with torch.no_grad():
            if weight_decay:
                grads = [g + weight_decay * (net.params[k] + delta[k]) for k, g in zip(delta, grads)]
            bufs, deltas = list(buf.values()), list(delta.values())
            torch._foreach_mul_(bufs, momentum)  # one kernel launch per list (as torch.optim.SGD)
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(deltas, bufs, alpha=-lr)
    return delta


def _evaluate(logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
              chunk: int) -> tuple[float, float]:
    """Mean cross-entropy and error of ``logits_of`` on (x, y), in blocks of ``chunk`` inputs."""
    total_loss, wrong = 0.0, 0
    with torch.no_grad():
        for s in range(0, x.shape[0], chunk):
            logits = logits_of(x[s : s + chunk])
            yb = y[s : s + chunk]
            total_loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            wrong += int((logits.argmax(-1) != yb).sum())
    return total_loss / x.shape[0], wrong / x.shape[0]


def _linearised_row(ctx: ProbeContext, net: core.Network, params: Params, x_probe: torch.Tensor) -> dict:
    run = ctx.runs[0]
    if params.lr_mode == "fixed":
        lr = run.lr * params.lr_factor
    else:
        mean_diag = float(core.trace_ntk_diagonal(net, x_probe, params.chunk).mean())
        if not (mean_diag > 0 and math.isfinite(mean_diag)):
            raise ProbeSkipped(f"trace NTK mean diagonal is {mean_diag}; cannot scale the learning rate")
        lr = params.kernel_lr / mean_diag
    data = ctx.data
    steps = params.steps
    if params.until_end:
        if run.total_steps <= 0:
            raise ProbeError("kernel_accuracy.until_end needs the run's total steps, which this job lacks")
        steps = max(0, run.total_steps - ctx.checkpoints[0].step)
    cached = CachedLinearisation.build(ctx.model, net.params, data.x_train, params.cache_mb,
                                       net.buffers) if steps else None
    delta = train_linearised(net, data.x_train, data.y_train, lr=lr, steps=steps,
                             batch_size=run.batch_size, momentum=run.momentum,
                             weight_decay=run.weight_decay, loss="ce", seed=ctx.seed, cached=cached)
    m = params.train_eval_size or data.x_train.shape[0]
    f = lambda xb: linearised_logits(net, delta, xb)  # noqa: E731
    train_loss, train_error = _evaluate(f, data.x_train[:m], data.y_train[:m], params.chunk)
    test_loss, test_error = _evaluate(f, data.x_test, data.y_test, params.chunk)
    return {"method": "linearised", "lr_mode": params.lr_mode, "lr": lr, "steps": steps,
            "kernel_variant": None, "n_train": m, "train_loss": train_loss, "train_error": train_error,
            "test_loss": test_loss, "test_error": test_error, "lambda": None}


# ----------------------------------------------------------------------------- kernel regression

def kernel_regression(net: core.Network, x_fit: torch.Tensor, targets: torch.Tensor,
                      x_eval: torch.Tensor, lam: float, variant: str = "trace", chunk: int = 256,
                      k_fit: torch.Tensor | None = None) -> torch.Tensor:
    """f̂(x*) = f(x*) + Θ(x*, X)(Θ(X, X) + λI)⁻¹(T − f(X)) for every x* in ``x_eval``.

    ``targets`` T is (n, C). ``variant`` ``trace``: Θ^tr shared by all logits (one n×n solve
    with C right-hand sides); ``full``: the nC×nC kernel with vec(T − f(X)) (index i·C + a).
    ``k_fit`` may pass a precomputed Θ(X, X).
    """
    with torch.no_grad():
        f_fit, f_eval = net(x_fit), net(x_eval)
    n, c = f_fit.shape
    if k_fit is None:
        k_fit = core.ntk(net, x_fit, variant, chunk=chunk)
    k_cross = core.cross_ntk(net, x_eval, x_fit, variant, chunk)
    resid = targets.to(f_fit.dtype) - f_fit
    eye = torch.eye(k_fit.shape[0], dtype=k_fit.dtype, device=k_fit.device)
    if variant == "full":
        alpha = torch.linalg.solve(k_fit + lam * eye, resid.reshape(-1, 1))
        return f_eval + (k_cross @ alpha).reshape(-1, c)
    alpha = torch.linalg.solve(k_fit + lam * eye, resid)
    return f_eval + k_cross @ alpha


def _kernel_regression_row(ctx: ProbeContext, net: core.Network, params: Params, x_probe: torch.Tensor,
                           y_probe: torch.Tensor) -> dict:
    c = ctx.data.num_classes
    k_fit = core.ntk(net, x_probe, params.kernel_variant, chunk=params.chunk, cache_mb=KERNEL_CACHE_MB)
    lam = params.ridge * float(torch.diagonal(k_fit).mean())
    onehot = torch.nn.functional.one_hot(y_probe.long(), c)
    predict = lambda xe: kernel_regression(net, x_probe, onehot, xe, lam, params.kernel_variant,  # noqa: E731
                                           params.chunk, k_fit)
    big = max(params.chunk, EVAL_BLOCK)  # larger blocks, fewer solves
    train_loss, train_error = _evaluate(predict, x_probe, y_probe, big)
    test_loss, test_error = _evaluate(predict, ctx.data.x_test, ctx.data.y_test, big)
    return {"method": "kernel_regression", "lr_mode": None, "lr": None, "steps": None,
            "kernel_variant": params.kernel_variant, "n_train": int(x_probe.shape[0]),
            "train_loss": train_loss, "train_error": train_error, "test_loss": test_loss,
            "test_error": test_error, "lambda": lam}


# -------------------------------------------------------------------------------------- compute

def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    _validate(params)
    x_probe = core.probe_inputs(ctx.data.x_train, ctx.probe_indices)
    y_probe = ctx.data.y_train[ctx.probe_indices.to(ctx.data.y_train.device).long()]
    net = core.bind(ctx.model, ctx.states[0], ctx.device, ctx.dtype, params.params, "kernel_accuracy")
    with torch.no_grad():
        if not math.isfinite(float(torch.nn.functional.cross_entropy(net(x_probe), y_probe))):
            raise ProbeSkipped("non-finite loss")
    rows = []
    if "linearised" in params.methods:
        rows.append(_linearised_row(ctx, net, params, x_probe))
    if "kernel_regression" in params.methods:
        rows.append(_kernel_regression_row(ctx, net, params, x_probe, y_probe))
    return {"kernel_accuracy": rows}
