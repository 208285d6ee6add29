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
  checkpoint's layer inputs (as im2col patches) and ReLU masks cached for every training input,
  and its gradient by a hand-written backward pass (``_layerwise.CachedLinearisation``, up to
  ``cache_mb``; about 3× faster per step than the jvp on the default CNN); otherwise it is a
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
  the test split; train loss/error on X itself. The cross kernel Θ_t(x*, X) is never formed:
  Θ_t(x*, X)α = J_t(x*)·Σ_j J_t(x_j)ᵀα_j (``KernelMachine``).

The probe set's Jacobian J_t(X) is computed once per job and shared by its uses (the kernel-scaled
rate, Θ_t(X, X), the kernel machine) when it fits in ``KERNEL_CACHE_MB``.

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
from torch.func import jvp

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.spec import MAX_EXAMPLES, between, check, non_negative, one_of, positive

from . import _ntk_core as core
from ._layerwise import CachedLinearisation
from .base import ProbeContext, each_checkpoint, scope_field

VERSION = 1
TABLES = ("kernel_accuracy",)
BATCHNORM = "running"
METHODS = ("linearised", "kernel_regression")
LR_MODES = ("fixed", "kernel_scaled")


KERNEL_VARIANTS = ("trace", "full")
KERNEL_CACHE_MB = 1024.0  # Jacobian blocks kept while kernel regression builds Θ(X, X) (lsdb.plan estimates it)
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
        if cached is not None:
            grads = list(cached.loss_grad(delta, idx, y[idx], loss).values())
        else:
            leaves = {k: v.detach().requires_grad_(True) for k, v in delta.items()}
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_of(linearised_logits(net, leaves, x[idx]), y[idx]),
                                            list(leaves.values()))
        with torch.no_grad():
            if weight_decay:
                grads = [g + weight_decay * (net.params[k] + delta[k]) for k, g in zip(delta, grads)]
            bufs, deltas = list(buf.values()), list(delta.values())
            torch._foreach_mul_(bufs, momentum)  # one kernel launch per list (as torch.optim.SGD)
            torch._foreach_add_(bufs, grads)
            torch._foreach_add_(deltas, bufs, alpha=-lr)
    return delta


def _evaluate(logits_of: Callable[[slice], torch.Tensor], y: torch.Tensor, chunk: int) -> tuple[float, float]:
    """Mean cross-entropy and error against labels ``y``, in blocks of ``chunk`` inputs:
    ``logits_of(rows)`` gives the logits of the inputs ``rows`` (a slice) of the set ``y`` labels."""
    total_loss, wrong = 0.0, 0
    with torch.no_grad():
        for s in range(0, y.shape[0], chunk):
            rows = slice(s, min(s + chunk, y.shape[0]))
            logits = logits_of(rows)
            yb = y[rows]
            total_loss += float(torch.nn.functional.cross_entropy(logits, yb, reduction="sum"))
            wrong += int((logits.argmax(-1) != yb).sum())
    return total_loss / y.shape[0], wrong / y.shape[0]


def _linearised_row(ctx: ProbeContext, net: core.Network, params: Params, x_probe: torch.Tensor,
                    j_probe: torch.Tensor | None) -> dict:
    run = ctx.runs[0]
    if params.lr_mode == "fixed":
        lr = run.lr * params.lr_factor
    else:
        mean_diag = float(core.trace_ntk_diagonal(net, x_probe, params.chunk, j_probe).mean())
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
    train_loss, train_error = _evaluate(lambda r: linearised_logits(net, delta, data.x_train[r]),
                                        data.y_train[:m], params.chunk)
    test_loss, test_error = _evaluate(lambda r: linearised_logits(net, delta, data.x_test[r]),
                                      data.y_test, params.chunk)
    return {"method": "linearised", "lr_mode": params.lr_mode, "lr": lr, "steps": steps,
            "kernel_variant": None, "n_train": m, "train_loss": train_loss, "train_error": train_error,
            "test_loss": test_loss, "test_error": test_error, "lambda": None}


# ----------------------------------------------------------------------------- kernel regression

class KernelMachine:
    """Kernel regression with Θ_t on the probe set X, fitted once and then predicted anywhere:

        f̂(x*) = f(x*) + Θ(x*, X)α,  α = (Θ(X, X) + λI)⁻¹(T − f(X)).

    ``targets`` T is (n, C). ``variant`` ``trace``: Θ^tr shared by all logits (one n×n solve with
    C right-hand sides); ``full``: the nC×nC kernel with vec(T − f(X)) (index i·C + a). The cross
    kernel is never formed: Θ(x*, X)α = J(x*)·M with M = Σ_j J(x_j)ᵀ α_j, so for the trace kernel
    logit c is ⟨vec J(x*), M_c⟩ with M_c = Σ_j α_jc vec J(x_j) (C vectors of C·P), and for the full
    kernel J(x*) m with m = Σ_{j,b} α_jb ∂f_b(x_j)/∂w (one P-vector): a prediction costs one
    Jacobian and C² (or C) dot products of length P per input instead of n. ``k_fit`` may pass a
    precomputed Θ(X, X), ``j_fit`` the Jacobians of X (``core.jacobian_rows`` with the same
    ``chunk``); without them both are built here, the Jacobian a block at a time.
    """

    def __init__(self, net: core.Network, x_fit: torch.Tensor, targets: torch.Tensor, lam: float,
                 variant: str = "trace", chunk: int = 256, k_fit: torch.Tensor | None = None,
                 j_fit: torch.Tensor | None = None):
        self.net, self.variant, self.chunk = net, variant, chunk
        with torch.no_grad():
            f_fit = net(x_fit)
        n, c = f_fit.shape
        if k_fit is None:
            k_fit = core.ntk(net, x_fit, variant, chunk=chunk, cache_mb=KERNEL_CACHE_MB, jac=j_fit)
        resid = targets.to(f_fit.dtype) - f_fit
        eye = torch.eye(k_fit.shape[0], dtype=k_fit.dtype, device=k_fit.device)
        alpha = torch.linalg.solve(k_fit + lam * eye, resid.reshape(-1, 1) if variant == "full" else resid)
        alpha = alpha.reshape(n, c)
        self.m = None
        for b in core._blocks(n, chunk):
            jb = core.jacobian(net, x_fit[b]) if j_fit is None else j_fit[b]  # (b, C, P)
            if variant == "full":  # m = Σ_{j,b} α_jb J_b(x_j)
                part = alpha[b].reshape(-1) @ jb.reshape(-1, jb.shape[-1])
            else:  # M_c = Σ_j α_jc vec J(x_j)
                part = alpha[b].T @ jb.reshape(jb.shape[0], -1)
            self.m = part if self.m is None else self.m + part

    def __call__(self, x_eval: torch.Tensor, j_eval: torch.Tensor | None = None) -> torch.Tensor:
        """f̂ at every input of ``x_eval`` (``j_eval``: their Jacobians, when the caller has them)."""
        with torch.no_grad():
            f_eval = self.net(x_eval)
        out = []
        for b in core._blocks(x_eval.shape[0], self.chunk):
            jb = core.jacobian(self.net, x_eval[b]) if j_eval is None else j_eval[b]
            out.append(jb @ self.m if self.variant == "full" else jb.reshape(jb.shape[0], -1) @ self.m.T)
        return f_eval + torch.cat(out)


def kernel_regression(net: core.Network, x_fit: torch.Tensor, targets: torch.Tensor,
                      x_eval: torch.Tensor, lam: float, variant: str = "trace", chunk: int = 256,
                      k_fit: torch.Tensor | None = None) -> torch.Tensor:
    """f̂(x*) = f(x*) + Θ(x*, X)(Θ(X, X) + λI)⁻¹(T − f(X)) for every x* in ``x_eval``
    (``KernelMachine`` fitted on X and predicting once)."""
    return KernelMachine(net, x_fit, targets, lam, variant, chunk, k_fit)(x_eval)


def _kernel_regression_row(ctx: ProbeContext, net: core.Network, params: Params, x_probe: torch.Tensor,
                           y_probe: torch.Tensor, j_probe: torch.Tensor | None) -> dict:
    c = ctx.data.num_classes
    k_fit = core.ntk(net, x_probe, params.kernel_variant, chunk=params.chunk, cache_mb=KERNEL_CACHE_MB,
                     jac=j_probe)
    lam = params.ridge * float(torch.diagonal(k_fit).mean())
    onehot = torch.nn.functional.one_hot(y_probe.long(), c)
    machine = KernelMachine(net, x_probe, onehot, lam, params.kernel_variant, params.chunk, k_fit, j_probe)
    train_loss, train_error = _evaluate(
        lambda r: machine(x_probe[r], None if j_probe is None else j_probe[r]), y_probe, params.chunk)
    test_loss, test_error = _evaluate(lambda r: machine(ctx.data.x_test[r]), ctx.data.y_test, params.chunk)
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
    j_probe = _probe_jacobian(net, x_probe, params)
    rows = []
    if "linearised" in params.methods:
        rows.append(_linearised_row(ctx, net, params, x_probe, j_probe))
    if "kernel_regression" in params.methods:
        rows.append(_kernel_regression_row(ctx, net, params, x_probe, y_probe, j_probe))
    return {"kernel_accuracy": rows}


def _probe_jacobian(net: core.Network, x_probe: torch.Tensor, params: Params) -> torch.Tensor | None:
    """The probe set's Jacobian, computed once for every use in the job (the kernel-scaled learning
    rate, Θ(X, X), the kernel machine's M and its predictions on X); None when only one use needs
    it or it would exceed ``KERNEL_CACHE_MB``, and each use then computes its own blocks."""
    uses = (("linearised" in params.methods and params.lr_mode == "kernel_scaled")
            + 3 * ("kernel_regression" in params.methods))
    with torch.no_grad():
        c = net(x_probe[:1]).shape[-1]
    size = x_probe.shape[0] * c * net.num_params * next(iter(net.params.values())).element_size()
    if uses < 2 or size > KERNEL_CACHE_MB * 2**20:
        return None
    return core.jacobian_rows(net, x_probe, params.chunk)
