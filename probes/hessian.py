"""``hessian``: spectrum of the Hessian of the training loss at a checkpoint.

H = ∇²_w L(w), L(w) = (1/B) Σ_{i∈batch} CE(f(x_i; w), y_i), over all trainable parameters, on one
fixed training batch of ``batch_size`` examples drawn with ``batch_seed`` (the same batch at every
checkpoint). Only Hessian-vector products (HVPs) are used; P = number of parameters.

Scope (``params``, a list of fnmatch globs on the names of ``model.named_parameters()``, e.g.
["layer3.*"]): w is then only the matching parameters, every other one held at the checkpoint's
value, so H is the diagonal block ∇²_{w_S} L of the full Hessian and P its size. Empty (the
default) = every trainable parameter. A glob matching no parameter fails the job, naming it.

- Top-k eigenvalues (largest algebraic) by Lanczos with full reorthogonalisation (twice per step).
  After each step the Ritz pairs (θ_i, y_i) of the tridiagonal T_j give residual estimates
  r_i = β_{j+1}|s_{j,i}| = ‖H y_i − θ_i y_i‖. Let s = max_i |θ_i| over all Ritz values (an
  estimate of ‖H‖₂; for a trained net's Hessian, θ₁). With ``criterion`` = "residual" the run
  stops when every top-k r_i ≤ tol·s (then each θ_i lies within tol·s of an eigenvalue); with
  "gap" when min(r_i, r_i²/g_i) ≤ tol·s, g_i the distance to the nearest other Ritz value (the
  sharper gap bound, but g_i is only estimated from Ritz values, so it is not a guarantee). At most
  ``max_iter`` Lanczos steps (one HVP each). With ``verify`` the residuals are recomputed
  explicitly from the stored products H q_j (no extra HVP) and those decide ``converged``; a run that misses the tolerance is
  stored with converged = false and its largest residual.
- Trace with ``trace_hvps`` HVPs beyond the Lanczos run. ``deflated`` (default): the Lanczos
  basis Q of the top-k run and its stored products give tr(QᵀHQ) exactly, and Hutchinson on
  Rademacher vectors projected off Q estimates the rest (the deflation idea of Hutch++ with a
  Krylov basis that costs nothing extra; cf. Chen & Hallman 2023, Krylov-aware trace estimation).
  Also Hutch++ (Meyer, Musco, Musco, Woodruff 2021) and plain Hutchinson. Standard error: sample
  std of the stochastic part / √(#probes).
- Spectral density by stochastic Lanczos quadrature (Ghorbani, Krishnan, Xiao 2019; Lin, Saad,
  Yang 2016): ``density_vectors`` Rademacher starts, ``density_iters`` Lanczos steps each;
  φ(t) = (1/n_v) Σ_l Σ_j τ_j^l g_σ(t − θ_j^l), τ_j = (first component of the j-th eigenvector of
  T_l)², g_σ a unit-mass Gaussian of width σ = ``density_sigma``·(θ_max − θ_min), on a uniform grid
  of ``density_points`` over [θ_min − 5σ, θ_max + 5σ]. φ integrates to 1 and its mean is the
  average of vᵀHv over the unit start vectors, an estimate of trace/P.
- Outliers: with the top-k values λ₁ ≥ … ≥ λ_k, the number above the largest gap on a log scale:
  argmax_i log(λ_i/λ_{i+1}) over i < k with λ_{i+1} > 0, or the count of positive values when a
  non-positive λ_{i+1} comes first (Fort & Ganguli 2019: ~C outliers above the bulk). 0 when λ₁ ≤ 0;
  at most k − 1 when all k are positive. Hence the default ``top_k`` = 0, meaning k = 2C + 2 with C the
  number of classes of the data (22 for 10 classes): F9 accepts up to C + 1 outliers, and the count
  needs at least as many bulk values below them to find the gap. The row's ``k`` is the k used.
- Top-subspace gradient fraction (Gur-Ari, Roberts, Dyer 2018, "Gradient descent happens in a tiny
  subspace"): g = ∇_w L on the same fixed batch, Y_C the top-C Ritz vectors (C = number of classes,
  orthonormalised by a QR that keeps their nested spans), ``top_subspace_grad_fraction`` =
  ‖Y_Cᵀ g‖ / ‖g‖ ∈ [0, 1]; ``top_k_grad_fraction`` the same for all k Ritz vectors (free: no HVP).
  One gradient, reused from the double-backward graph or the layer-wise products' backward pass
  (``hvp`` = "fwd_rev" computes one more).
  Null when g = 0, and the top-C fraction is null when k < C. With ``converged`` false the Ritz
  vectors are approximate, and so is the fraction.
- Batch sharpness (the quantity that equilibrates at the edge of stability under mini-batch SGD;
  cf. Cohen et al. 2021 for full batch and the later "edge of stochastic stability" work):
  ``sharpness_batches`` = m batches B_1 … B_m of ``sharpness_batch_size`` examples (0 = the run's
  training batch size), each B_l the first b of ``torch.randperm(n, generator)`` with one generator
  seeded with ``sharpness_seed`` (= the job's seed: fixed per checkpoint, probe version and params,
  and stored) and n the size of the training split; then
  ``batch_sharpness`` = (1/m) Σ_l g_lᵀ H_l g_l / ‖g_l‖², with L_l the mean cross-entropy on B_l,
  g_l = ∇L_l and H_l = ∇²L_l (one gradient and one HVP per batch, ``sharpness_hvps`` = m), and
  ``batch_sharpness_stderr`` = sample std / √m. A batch with g_l = 0 is left out. When b ≥ n (a
  full-batch run) every batch is the whole split: one is drawn and the standard error is 0, and the
  number is the full-batch Rayleigh quotient gᵀHg/‖g‖² ≤ λ_max. Null without the run's batch size
  (a context without a run, as in hand-built tests) unless ``sharpness_batch_size`` is set, and
  with m = 0. Weight decay is not part of L (the findings add it to the curvature, query.rules.f10).

Warm start (``warm_start``): each job names the previous checkpoint of its run; when that job has
already run (jobs are planned in step order, so an in-order executor always finds it), its top-k
Ritz vectors (an artifact, found through a note under ``artifacts/hessian-ritz/``) seed Lanczos:
the start vector is their sum plus a small random part, so directions outside the old subspace are
still found. Otherwise the job starts cold. Either way the row says which (``warm_started``) and,
when warm, the overlap ‖Y_prevᵀ Y‖²_F / k of the two top-k subspaces. Warm and cold runs meet the
same tolerance, so the stored numbers agree to within it.

Products (``hvp``): "auto" (the default) writes the R-operator out layer by layer for models that
list plain layers (``_layerwise.LayerHessian``: the primal pass and backward at w cached once, then
one tangent pass forward and one back per product, as matrix products on the layers' im2col
patches), and takes double backward through autograd for every other model; "layers",
"double_backward" and "fwd_rev" (forward-over-reverse) force one. They agree to float rounding;
the row's ``hvp`` says which ran (``benchmarks/hvp.py``: the layer-wise products take about half
the time of double backward at the batches of 64–128 of the batch sharpness and the quick study,
about 0.75 of it at the full study's 512).

BatchNorm (``BATCHNORM`` = "running", the ``batchnorm`` column of ``probe_job``): L is the loss of
the network in eval mode, BatchNorm normalising with the checkpoint's running statistics, so each
BatchNorm layer is a fixed per-channel affine map whose scale and shift are among the parameters
w (its statistics are not). Train-mode batch statistics would make L depend on which examples
share a batch, and their running averages would change with every Hessian-vector product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch.func import grad, jvp, vmap

from lsdb.errors import ArtifactCorrupt, ProbeError, ProbeSkipped
from lsdb.spec import MAX_EXAMPLES, MAX_SEED, between, one_of, positive

from . import _directions as D
from ._layerwise import LayerHessian
from .base import JobRequest, ProbeContext, Study, each_checkpoint, scope_field, select_params

VERSION = 3  # 2: default trace estimator "deflated"; 3: top_k = 0 (the default) is 2C + 2, batch sharpness
#   and the top-subspace gradient fraction are measured
TABLES = ("hessian", "hessian_eigenvalue", "hessian_density")
BATCHNORM = "running"

_WARM_RANDOM_MIX = 0.05  # weight of the random part of a warm start vector


MAX_TOP_K = 1_000  # eigenpairs (each a P-vector kept in memory and, with store_ritz, stored)
MAX_ITER = 100_000  # Lanczos steps (the basis holds one P-vector per step)
MAX_HVPS = 1_000_000  # Hessian-vector products of the trace estimate
MAX_DENSITY_VECTORS = 1_000
MAX_DENSITY_ITERS = 10_000
MAX_DENSITY_POINTS = 1_000_000
MAX_HVP_CHUNK = 65_536
MAX_SHARPNESS_BATCHES = 100_000  # batches of the batch sharpness (one gradient and one HVP each)
CRITERIA = ("residual", "gap")
TRACE_METHODS = ("deflated", "hutch++", "hutchinson")
HVP_METHODS = ("auto", "layers", "double_backward", "fwd_rev")


@dataclass(frozen=True)
class Params:
    batch_size: int = field(default=512, metadata=between(0, MAX_EXAMPLES, " (0 = the whole training split)"))
    batch_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    top_k: int = field(default=0, metadata=between(0, MAX_TOP_K, " (0 = 2C + 2, C = number of classes)"))
    tol: float = field(default=1e-3, metadata=positive(1.0))
    criterion: str = field(default="residual", metadata=one_of(*CRITERIA))
    max_iter: int = field(default=200, metadata=between(1, MAX_ITER))
    verify: bool = True
    # "deflated" (Lanczos basis + Hutchinson) | "hutch++" | "hutchinson"
    trace_method: str = field(default="deflated", metadata=one_of(*TRACE_METHODS))
    trace_hvps: int = field(default=99, metadata=between(1, MAX_HVPS))
    density_vectors: int = field(default=3, metadata=between(0, MAX_DENSITY_VECTORS, " (0 = no density)"))
    density_iters: int = field(default=40, metadata=between(1, MAX_DENSITY_ITERS))
    density_points: int = field(default=256, metadata=between(1, MAX_DENSITY_POINTS))
    density_sigma: float = field(default=0.01, metadata=positive())
    # "auto" (layers where the model lists plain layers, else double_backward) | "layers" |
    # "double_backward" | "fwd_rev" (forward-over-reverse); each row stores the one used
    hvp: str = field(default="auto", metadata=one_of(*HVP_METHODS))
    hvp_chunk: int = field(default=16, metadata=between(1, MAX_HVP_CHUNK))  # vectors per batched HVP
    warm_start: bool = False
    store_ritz: bool = True
    sharpness_batches: int = field(default=8, metadata=between(0, MAX_SHARPNESS_BATCHES,
                                                              " (0 = no batch sharpness)"))
    sharpness_batch_size: int = field(default=0, metadata=between(0, MAX_EXAMPLES,
                                                                 " (0 = the run's training batch size)"))
    params: tuple[str, ...] = scope_field()  # globs on parameter names; () = all (module docstring)

    @staticmethod
    def cross_check(values: dict) -> tuple[str, str] | None:
        """Lanczos finds at most one Ritz pair per step: fewer steps than top_k never converge."""
        if values["top_k"] and values["max_iter"] < values["top_k"]:
            return "max_iter", (f"must be >= top_k = {values['top_k']} "
                                f"(Lanczos finds one eigenvalue per step at most)")
        return None


# --------------------------------------------------------------------------------------- plan

def plan(study: Study, params: Params) -> list[JobRequest]:
    """Every checkpoint; with ``warm_start`` each job also names the previous checkpoint of its run
    (``inputs["previous_checkpoint"]``), whose Ritz vectors it starts from when they exist."""
    if not params.warm_start:
        return each_checkpoint(study)
    jobs = []
    for r in study.runs:
        prev = None
        for c in r.checkpoints:
            jobs.append(JobRequest((c.id,), c.id, "self", {"previous_checkpoint": prev} if prev else {}))
            prev = c.id
    return jobs


# ------------------------------------------------------------------------------ the operator

class HessianOperator:
    """H = ∇²L(w) as a symmetric linear operator on flat vectors of length P.

    "double_backward" builds ∇L once with create_graph and differentiates ⟨∇L, v⟩ for each v
    (the first-order graph is reused by every product); "fwd_rev" pushes v forward through ∇L with
    ``torch.func.jvp`` (vmapped over vectors); "layers" takes the products of ``layers`` (a
    ``LayerHessian`` of the same loss: the R-operator written out for plain-layer models, about 2×
    faster on small batches). ``hvps`` counts products.
    """

    def __init__(self, loss_fn, params: dict[str, torch.Tensor], method: str = "double_backward", chunk: int = 16,
                 layers: LayerHessian | None = None):
        if method not in ("double_backward", "fwd_rev", "layers") or (method == "layers") != (layers is not None):
            raise ProbeError(f"probes.hessian.hvp = '{method}' must be double_backward, fwd_rev or layers "
                             f"(with the layer-wise products)")
        self.names = list(params)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.P = sum(self.sizes)
        first = params[self.names[0]]
        self.dtype, self.device = first.dtype, first.device
        self.method, self.chunk, self.hvps = method, max(1, chunk), 0
        self.params = {n: p.detach() for n, p in params.items()}
        self.loss_fn, self.layers = loss_fn, layers
        if method == "double_backward":
            leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
            with torch.enable_grad():
                loss = loss_fn(leaves)
                grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            self._leaves, self._grad = list(leaves.values()), torch.cat([g.reshape(-1) for g in grads])
        elif method == "fwd_rev":
            def hvp_one(v):
                return jvp(grad(loss_fn), (self.params,), (self.unflatten(v),))[1]

            self._hvp_batch = vmap(lambda v: self.flatten(hvp_one(v)))

    def flatten(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def gradient(self) -> torch.Tensor:
        """∇L(w) as a flat vector: the first-order graph's value with "double_backward" (no extra
        pass), one ``torch.func.grad`` with "fwd_rev". Not an HVP, so ``hvps`` is unchanged."""
        if self.method == "double_backward":
            return self._grad.detach()
        if self.method == "layers":
            return self.flatten(self.layers.gradient)
        return self.flatten(grad(self.loss_fn)(self.params)).detach()

    def unflatten(self, v: torch.Tensor) -> dict[str, torch.Tensor]:
        return {n: t.view(s) for n, t, s in zip(self.names, v.split(self.sizes), self.shapes)}

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        """H applied to every row of V (m, P) → (m, P)."""
        out = []
        for i in range(0, V.shape[0], self.chunk):
            block = V[i:i + self.chunk].to(self.dtype)
            out.append(self._apply(block))
            self.hvps += block.shape[0]
        return torch.cat(out) if out else V.new_zeros((0, self.P))

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        return self.matmat(v.unsqueeze(0))[0]

    def _apply(self, block):
        if self.method == "fwd_rev":
            return self._hvp_batch(block).detach()
        if self.method == "layers":
            return torch.stack([self.flatten(self.layers.hvp(self.unflatten(v))) for v in block])
        # one vector at a time: is_grads_batched (vmap over the backward graph) measured slower
        rows = []
        for v in block:
            hv = torch.autograd.grad(self._grad, self._leaves, grad_outputs=v, retain_graph=True)
            rows.append(torch.cat([h.reshape(-1) for h in hv]))
        return torch.stack(rows)


def make_operator(model: torch.nn.Module, params: dict[str, torch.Tensor], fixed: dict[str, torch.Tensor],
                  x: torch.Tensor, y: torch.Tensor, hvp: str = "auto", chunk: int = 16) -> HessianOperator:
    """The Hessian of the mean cross-entropy of ``model`` on (x, y) with respect to ``params``
    (``fixed``: the rest of its state), with products by ``hvp``: "auto" takes the layer-wise
    products where the model lists plain layers, else double backward."""
    layers = LayerHessian.build(model, params, fixed, x, y) if hvp in ("auto", "layers") else None
    if hvp == "layers" and layers is None:
        raise ProbeError(f"probes.hessian.hvp = 'layers' needs a model that lists plain layers (convolutions, linear "
                         f"layers, ReLU, flatten); {type(model).__name__} does not: use 'auto'")
    method = "layers" if layers is not None else ("double_backward" if hvp == "auto" else hvp)
    return HessianOperator(D.loss_function(model, fixed, x, y), params, method, chunk, layers)


# --------------------------------------------------------------------------------- Lanczos

@dataclass
class TopEigen:
    values: torch.Tensor  # (k,) descending
    vectors: torch.Tensor  # (k, P) unit Ritz vectors
    residuals: torch.Tensor  # (k,) ‖H y − θ y‖ (explicit when verified, else Lanczos estimates)
    iters: int
    hvps: int
    converged: bool
    basis: torch.Tensor  # (m, P) orthonormal Lanczos vectors q_j
    products: torch.Tensor  # (m, P) their products H q_j


def _reorthogonalise(w: torch.Tensor, Q: torch.Tensor) -> torch.Tensor:
    # classical Gram–Schmidt twice: "twice is enough" (Giraud et al. 2005) for full orthogonality
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w


def _error_bounds(theta, S, beta, order, criterion):
    r = (beta * S[-1, order]).abs()
    if criterion == "residual" or theta.numel() < 2:
        return r, r
    t = theta[order]
    diff = (t[:, None] - theta[None, :]).abs()
    diff[torch.arange(len(order)), order] = float("inf")
    gap = diff.min(dim=1).values
    return r, torch.minimum(r, r * r / gap.clamp_min(torch.finfo(r.dtype).tiny))


def _grow(buf: torch.Tensor, rows: int) -> torch.Tensor:
    """``buf`` with at least ``rows`` rows (doubling, so a long run copies O(rows·P) in total)."""
    if buf.shape[0] >= rows:
        return buf
    more = buf.new_zeros(max(rows, 2 * buf.shape[0]) - buf.shape[0], buf.shape[1])
    return torch.cat([buf, more])


def lanczos_top(op: HessianOperator, k: int, tol: float, max_iter: int, v0: torch.Tensor | None = None,
                generator: torch.Generator | None = None, criterion: str = "residual",
                verify: bool = True) -> TopEigen:
    """Top-k (largest algebraic) eigenpairs of ``op`` by Lanczos with full reorthogonalisation.

    Stops when every top-k Ritz pair meets the tolerance (see the module docstring), or after
    ``max_iter`` HVPs. On breakdown (an invariant Krylov subspace) it continues from a fresh random
    vector orthogonal to the basis, so eigenvalues outside the start vector's reach are still found.
    Every product H q_j is kept, so with ``verify`` the explicit residuals ‖H y − θ y‖ of the Ritz
    vectors y = Σ s_j q_j come from H y = Σ s_j (H q_j) (linearity) at no extra HVP, and do not
    depend on the basis staying orthogonal.
    """
    if criterion not in ("residual", "gap"):
        raise ProbeError(f"probes.hessian.criterion = '{criterion}' must be residual or gap")
    P, dt, dev = op.P, op.dtype, op.device
    k = min(k, P)
    max_iter = max(1, min(max_iter, P))
    start_hvps = op.hvps

    def rand_vec():
        return torch.randn(P, generator=generator, dtype=torch.float64).to(device=dev, dtype=dt)

    q = rand_vec() if v0 is None else v0.to(device=dev, dtype=dt)
    first = min(max_iter + 1, max(2 * k + 2, 16))
    Q = torch.zeros(first, P, dtype=dt, device=dev)  # the basis q_j
    HQ = torch.zeros(first, P, dtype=dt, device=dev)  # the products H q_j
    Q[0] = q / q.norm()
    alpha = torch.zeros(max_iter, dtype=torch.float64)
    beta = torch.zeros(max_iter, dtype=torch.float64)
    converged_est = False
    j = 0
    for j in range(max_iter):
        w = op.matvec(Q[j])
        if not bool(torch.isfinite(w).all()):
            raise ProbeSkipped("non-finite Hessian-vector product")
        HQ = _grow(HQ, j + 1)
        HQ[j] = w
        alpha[j] = float(Q[j] @ w)
        w = _reorthogonalise(w, Q[: j + 1])
        beta[j] = float(w.norm())
        T = torch.diag(alpha[: j + 1]) + torch.diag(beta[:j], 1) + torch.diag(beta[:j], -1)
        theta, S = torch.linalg.eigh(T)
        scale = float(theta.abs().max())
        breakdown = beta[j] <= 1e3 * torch.finfo(dt).eps * max(scale, 1e-300)
        if j + 1 >= k:
            order = torch.argsort(theta, descending=True)[:k]
            _, bound = _error_bounds(theta, S, beta[j], order, criterion)
            if bool((bound <= tol * scale).all()) or (breakdown and j + 1 >= P):
                converged_est = True
                break
        if j + 1 == max_iter:
            break
        Q = _grow(Q, j + 2)
        if breakdown:
            beta[j] = 0.0  # T decouples; continue in the orthogonal complement
            w = _reorthogonalise(rand_vec(), Q[: j + 1])
            Q[j + 1] = w / w.norm()
        else:
            Q[j + 1] = w / beta[j]
    m = j + 1
    T = torch.diag(alpha[:m]) + torch.diag(beta[: m - 1], 1) + torch.diag(beta[: m - 1], -1)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)[: min(k, m)]
    values = theta[order]
    coef = S[:, order].T.to(device=dev, dtype=dt)  # T is small and lives on the CPU
    Y, HY = coef @ Q[:m], coef @ HQ[:m]
    norms = Y.norm(dim=1, keepdim=True)
    Y, HY = Y / norms, HY / norms
    scale = float(theta.abs().max())
    if verify:
        residuals = (HY - values.to(device=dev, dtype=dt)[:, None] * Y).norm(dim=1).double().cpu()
        bound = residuals
        if criterion == "gap" and m > 1:
            diff = (values[:, None] - theta[None, :]).abs()
            diff[torch.arange(len(order)), order] = float("inf")
            gap = diff.min(dim=1).values.clamp_min(torch.finfo(torch.float64).tiny)
            bound = torch.minimum(residuals, residuals**2 / gap)
        converged = bool((bound <= tol * scale).all()) and len(order) == k
    else:
        residuals, _ = _error_bounds(theta, S, beta[m - 1], order, "residual")
        converged = converged_est and len(order) == k
    return TopEigen(values, Y, residuals, m, op.hvps - start_hvps, converged, Q[:m], HQ[:m])


# ---------------------------------------------------------------------------- trace, density

def _rademacher(m: int, P: int, generator, dtype, device) -> torch.Tensor:
    return (torch.randint(0, 2, (m, P), generator=generator) * 2 - 1).to(device=device, dtype=dtype)


def hutchinson(op: HessianOperator, m: int, generator) -> tuple[float, float]:
    """tr(H) ≈ (1/m) Σ zᵢᵀHzᵢ with Rademacher zᵢ; returns (estimate, standard error)."""
    Z = _rademacher(m, op.P, generator, op.dtype, op.device)
    samples = (Z * op.matmat(Z)).sum(1).double()
    return float(samples.mean()), float(samples.std() / math.sqrt(m)) if m > 1 else float("inf")


def hutch_pp(op: HessianOperator, m: int, generator) -> tuple[float, float]:
    """Hutch++ with m HVPs: s = m // 3 sketch vectors S, Q = orth(HS); tr(H) ≈ tr(QᵀHQ) +
    (1/s) Σ gᵢᵀ(I−QQᵀ)H(I−QQᵀ)gᵢ with Rademacher gᵢ; the standard error is that of the second term."""
    s = max(1, m // 3)
    S = _rademacher(s, op.P, generator, op.dtype, op.device)
    Qm, _ = torch.linalg.qr(op.matmat(S).T)  # (P, s)
    exact = float((Qm * op.matmat(Qm.T).T).sum())
    G = _rademacher(s, op.P, generator, op.dtype, op.device)
    G = G - (G @ Qm) @ Qm.T
    samples = (G * op.matmat(G)).sum(1).double()
    se = float(samples.std() / math.sqrt(s)) if s > 1 else float("inf")
    return exact + float(samples.mean()), se


def deflated_hutchinson(op: HessianOperator, Q: torch.Tensor, HQ: torch.Tensor, m: int,
                        generator) -> tuple[float, float]:
    """tr(H) = tr(QᵀHQ) + tr((I−QQᵀ)H(I−QQᵀ)) with Q (k, P) the orthonormal Lanczos basis and HQ
    its stored products, so the first term costs no HVP and holds the top of the spectrum; the
    second by Hutchinson on m projected Rademacher vectors (Q is drawn independently of them, so
    the estimate is unbiased). The standard error is that of the second term."""
    exact = float((Q.double() * HQ.double()).sum())
    G = _rademacher(m, op.P, generator, op.dtype, op.device)
    G = _reorthogonalise(G.T, Q).T  # columns projected off Q, twice as in Lanczos
    samples = (G * op.matmat(G)).sum(1).double()
    se = float(samples.std() / math.sqrt(m)) if m > 1 else float("inf")
    return exact + float(samples.mean()), se


def slq_nodes(op: HessianOperator, n_vectors: int, iters: int, generator):
    """Stochastic Lanczos quadrature nodes and weights: for each unit Rademacher start v_l,
    (θ_j^l, τ_j^l) from the eigendecomposition of its Lanczos tridiagonal (independent Lanczos
    runs in lockstep, so each step is one batched HVP). Returns lists of (θ, τ) tensors."""
    P, dt = op.P, op.dtype
    iters = max(1, min(iters, P))
    V = _rademacher(n_vectors, P, generator, dt, op.device) / math.sqrt(P)
    Q = torch.zeros(n_vectors, iters, P, dtype=dt, device=op.device)
    Q[:, 0] = V
    alpha = torch.zeros(n_vectors, iters, dtype=torch.float64)
    beta = torch.zeros(n_vectors, iters, dtype=torch.float64)
    length = [iters] * n_vectors
    active = list(range(n_vectors))
    for j in range(iters):
        W = op.matmat(Q[active, j])
        if not bool(torch.isfinite(W).all()):
            raise ProbeSkipped("non-finite Hessian-vector product")
        still = []
        for row, l in enumerate(active):
            w = W[row]
            alpha[l, j] = float(Q[l, j] @ w)
            w = _reorthogonalise(w, Q[l, : j + 1])
            beta[l, j] = float(w.norm())
            if j + 1 < iters and beta[l, j] > 1e3 * torch.finfo(dt).eps * max(alpha[l, : j + 1].abs().max().item(), 1e-300):
                Q[l, j + 1] = w / beta[l, j]
                still.append(l)
            else:
                length[l] = j + 1
        active = still
        if not active:
            break
    nodes = []
    for l in range(n_vectors):
        m = length[l]
        T = torch.diag(alpha[l, :m]) + torch.diag(beta[l, : m - 1], 1) + torch.diag(beta[l, : m - 1], -1)
        theta, S = torch.linalg.eigh(T)
        nodes.append((theta, S[0] ** 2))
    return nodes


def slq_density(nodes, points: int, sigma_rel: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian-broadened density φ on a grid (see the module docstring)."""
    theta = torch.cat([t for t, _ in nodes])
    lo, hi = float(theta.min()), float(theta.max())
    sigma = sigma_rel * (hi - lo) if hi > lo else max(abs(hi), 1.0) * sigma_rel
    grid = torch.linspace(lo - 5 * sigma, hi + 5 * sigma, points, dtype=torch.float64)
    dens = torch.zeros_like(grid)
    for t, tau in nodes:
        g = torch.exp(-0.5 * ((grid[:, None] - t[None, :]) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))
        dens += g @ tau
    return grid, dens / len(nodes)


def count_outliers(values: torch.Tensor) -> int:
    """Eigenvalues above the largest log-gap among the descending top-k (module docstring)."""
    v = [float(x) for x in values]
    if not v or v[0] <= 0:
        return 0
    best, count = -1.0, len(v)
    for i in range(len(v) - 1):
        if v[i + 1] <= 0:  # an infinite log-gap: nothing below it can be an outlier boundary
            return i + 1
        gap = math.log(v[i] / v[i + 1])
        if gap > best:
            best, count = gap, i + 1
    return count


# ------------------------------------------------------------- gradient subspace, batch sharpness

def subspace_fractions(vectors: torch.Tensor, g: torch.Tensor, dims: list[int]) -> list[float | None]:
    """‖P_d g‖ / ‖g‖ for each d in ``dims``, P_d the orthogonal projector on the span of the first d
    rows of ``vectors`` (k, P) (Ritz vectors, largest first). One QR of their transpose gives an
    orthonormal basis whose first d columns span the first d rows, for every d at once. None for a
    d > k or when g = 0."""
    g = g.double()
    norm = float(g.norm())
    Q, _ = torch.linalg.qr(vectors.double().T)  # (P, k)
    c = Q.T @ g
    return [None if d > vectors.shape[0] or d < 1 or norm == 0 else float(c[:d].norm()) / norm for d in dims]


@dataclass
class BatchSharpness:
    value: float | None  # mean over batches of g_Bᵀ H_B g_B / ‖g_B‖²
    stderr: float | None  # sample std / √m; 0 when every batch is the whole split; None for m = 1
    batches: int  # m, the batches that entered the mean
    batch_size: int  # examples per batch (capped at the split's size)
    hvps: int


def batch_sharpness(make_op, n: int, batch_size: int, batches: int,
                    generator: torch.Generator) -> BatchSharpness:
    """E_B[g_Bᵀ H_B g_B / ‖g_B‖²] over ``batches`` random batches (module docstring).

    ``make_op(idx)`` is the ``HessianOperator`` of the mean loss on the training examples ``idx``;
    batch l is ``torch.randperm(n, generator=generator)[:batch_size]``. When the batch is the
    whole split, one is evaluated (they would all be equal) and the standard error is 0."""
    b = min(batch_size, n)
    full = b >= n
    values, hvps = [], 0
    for _ in range(1 if full else batches):
        idx = torch.randperm(n, generator=generator)[:b]
        op = make_op(idx)
        g = op.gradient()
        gg = float(g.double() @ g.double())
        if not math.isfinite(gg):
            raise ProbeSkipped("non-finite gradient of a sharpness batch")
        if gg == 0:
            continue
        hg = op.matvec(g)
        hvps += op.hvps
        if not bool(torch.isfinite(hg).all()):
            raise ProbeSkipped("non-finite Hessian-vector product")
        values.append(float(g.double() @ hg.double()) / gg)
    m = len(values)
    if m == 0:
        return BatchSharpness(None, None, 0, b, hvps)
    v = torch.tensor(values, dtype=torch.float64)
    se = 0.0 if full else (float(v.std() / math.sqrt(m)) if m > 1 else None)
    return BatchSharpness(float(v.mean()), se, m, b, hvps)


# ------------------------------------------------------------------------------------ compute

def resolved_top_k(params: Params, classes: int) -> int:
    """The k of a job: ``top_k``, or 2C + 2 when it is 0 (module docstring)."""
    k = params.top_k or 2 * classes + 2
    if params.max_iter < k:
        raise ProbeError(f"probes.hessian.max_iter = {params.max_iter} is below top_k = {k}"
                         + ("" if params.top_k else f" (the default 2C + 2 for C = {classes} classes)")
                         + ": Lanczos finds one eigenvalue per step at most; raise max_iter or lower top_k")
    return min(k, MAX_TOP_K)


def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    if params.top_k < 0 or params.max_iter < 1:
        raise ProbeError("probes.hessian.top_k must be >= 0 and max_iter >= 1")
    classes = int(ctx.data.num_classes)
    top_k = resolved_top_k(params, classes)
    model = ctx.model
    state = D.prepare_state(model, ctx.states[0], ctx.device, ctx.dtype)
    names = select_params(D.trainable_names(model), params.params, "hessian")
    params_t = {n: state[n] for n in names}
    fixed = {k: v for k, v in state.items() if k not in params_t}
    idx = D.fixed_subset(ctx.data.x_train.shape[0], params.batch_size, params.batch_seed, ctx.device)
    x, y = ctx.data.x_train[idx], ctx.data.y_train[idx]

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            batch_loss = float(D.loss_function(model, fixed, x, y)(params_t))
        D.require_finite(batch_loss)
        op = make_operator(model, params_t, fixed, x, y, params.hvp, params.hvp_chunk)
        gen = torch.Generator().manual_seed(ctx.seed)

        prev = _load_warm_start(ctx, params, op.P)
        v0 = None
        if prev is not None:
            r = torch.randn(op.P, generator=gen, dtype=torch.float64)
            s = prev.sum(0)
            v0 = s / s.norm() + _WARM_RANDOM_MIX * r / r.norm()
        top = lanczos_top(op, top_k, params.tol, params.max_iter, v0, gen, params.criterion, params.verify)
        lanczos_hvps = op.hvps
        g = op.gradient()
        D.require_finite(g, "gradient")
        frac_c, frac_k = subspace_fractions(top.vectors, g, [classes, top.vectors.shape[0]])

        if params.trace_method == "deflated":
            trace, se = deflated_hutchinson(op, top.basis, top.products, params.trace_hvps, gen)
        elif params.trace_method == "hutch++":
            trace, se = hutch_pp(op, params.trace_hvps, gen)
        elif params.trace_method == "hutchinson":
            trace, se = hutchinson(op, params.trace_hvps, gen)
        else:
            raise ProbeError(f"probes.hessian.trace_method = '{params.trace_method}' must be deflated, hutch++ "
                            f"or hutchinson")
        trace_hvps = op.hvps - lanczos_hvps

        grid, dens = (torch.zeros(0), torch.zeros(0))
        if params.density_vectors > 0:
            nodes = slq_nodes(op, params.density_vectors, params.density_iters, gen)
            grid, dens = slq_density(nodes, params.density_points, params.density_sigma)
        density_hvps = op.hvps - lanczos_hvps - trace_hvps

        size = params.sharpness_batch_size or (ctx.runs[0].batch_size if ctx.runs else 0)
        sharp = None
        if params.sharpness_batches > 0 and size > 0:
            xs, ys = ctx.data.x_train, ctx.data.y_train
            dev = xs.device

            def batch_op(i):
                i = i.to(dev)
                return make_operator(model, params_t, fixed, xs[i], ys[i], op.method, 1)  # as the main batch

            sharp = batch_sharpness(batch_op, xs.shape[0], size, params.sharpness_batches,
                                    torch.Generator().manual_seed(ctx.seed))
    finally:
        model.train(was_training)

    ritz = top.vectors.detach().float().cpu().numpy()
    overlap = None
    if prev is not None:
        Yp = prev.to(top.vectors.dtype)
        overlap = float((Yp.to(top.vectors.device) @ top.vectors.T).pow(2).sum() / top.vectors.shape[0])
    row = {
        "batch_size": int(x.shape[0]), "batch_loss": batch_loss, "top_eigenvalue": float(top.values[0]),
        "k": int(top.values.numel()), "lanczos_iters": top.iters, "hvps": int(op.hvps), "hvp": op.method,
        "converged": bool(top.converged), "max_residual": float(top.residuals.max()), "tol": params.tol,
        "outliers": count_outliers(top.values), "trace": trace, "trace_stderr": se,
        "trace_method": params.trace_method, "trace_hvps": int(trace_hvps), "density_hvps": int(density_hvps),
        "warm_started": prev is not None, "subspace_overlap": overlap,
        "ritz_artifact": ctx.artifacts.put(ritz) if params.store_ritz or params.warm_start else None,
        "grad_norm": float(g.double().norm()), "top_subspace_dim": classes if frac_c is not None else None,
        "top_subspace_grad_fraction": frac_c, "top_k_grad_fraction": frac_k,
        "batch_sharpness": sharp.value if sharp else None, "batch_sharpness_stderr": sharp.stderr if sharp else None,
        "sharpness_batches": sharp.batches if sharp else None,
        "sharpness_batch_size": sharp.batch_size if sharp else None,
        "sharpness_seed": int(ctx.seed) if sharp else None, "sharpness_hvps": sharp.hvps if sharp else None,
    }
    if params.warm_start:
        _leave_note(ctx, params, row["ritz_artifact"])
    eig_rows = [{"rank": i + 1, "value": float(v), "residual": float(r)}
                for i, (v, r) in enumerate(zip(top.values, top.residuals))]
    dens_rows = [{"grid": float(g), "density": float(d)} for g, d in zip(grid, dens)]
    return {"hessian": [row], "hessian_eigenvalue": eig_rows, "hessian_density": dens_rows}


def _pointer(ctx: ProbeContext, params: Params, checkpoint_id: str):
    """Where the artifact hash of a checkpoint's Ritz vectors is noted for the next checkpoint's job
    (a hint: keyed by probe version and params, written atomically; missing means a cold start)."""
    from .base import params_hash

    return ctx.artifacts.root / "hessian-ritz" / f"v{VERSION}-{params_hash(params)}-{checkpoint_id}.txt"


def _load_warm_start(ctx: ProbeContext, params: Params, P: int) -> torch.Tensor | None:
    """Previous Ritz vectors (k, P): from ``inputs["warm_start"]`` (an artifact hash), else from
    the note left by the job of ``inputs["previous_checkpoint"]`` when it has run already."""
    inputs = ctx.inputs or {}
    sha = inputs.get("warm_start")
    if not sha and inputs.get("previous_checkpoint"):
        note = _pointer(ctx, params, inputs["previous_checkpoint"])
        if not note.exists():
            return None  # the previous checkpoint's job has not run (yet): start cold
        sha = note.read_text().strip()
    if not sha:
        return None
    arr = ctx.artifacts.get(sha)
    if arr.ndim != 2 or arr.shape[1] != P:
        raise ArtifactCorrupt(f"warm-start artifact {sha[:12]}… has shape {arr.shape}, expected (k, {P}); "
                              f"delete it and rerun the hessian probe")
    return torch.from_numpy(arr).to(torch.float64)


def _leave_note(ctx: ProbeContext, params: Params, sha: str) -> None:
    import os

    if not ctx.checkpoints:
        return
    note = _pointer(ctx, params, ctx.checkpoints[0].id)
    note.parent.mkdir(parents=True, exist_ok=True)
    tmp = note.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(sha)
    os.replace(tmp, note)
