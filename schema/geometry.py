"""Result tables of the geometry probes: ``barrier``, ``hessian``, ``flatness``, ``slice``
(see lsdb.probes.<name> for the exact maths of every column)."""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


def _f(nullable: bool = False):
    return mapped_column(Double, nullable=nullable)


class BarrierResult(ProbeRow, Base):
    """Barriers on the linear path between two checkpoints (``barrier`` probe), one row per pair.

    ``{loss,error}_barrier_{train,test}`` = max_α Q(α) − ½(Q(0)+Q(1)) (Frankle/Fort);
    ``entezari_*`` = max_α [Q(α) − ((1−α)Q(0) + αQ(1))]; ``argmax_alpha_*`` where the max is.
    ``disagreement`` = fraction of test points whose predicted labels differ between the endpoints;
    ``disagreement_over_error`` = that / mean endpoint test error (null when that error is 0).
    """

    __tablename__ = "barrier"
    __table_args__ = {"info": {"metrics": [
        Metric("error_barrier_test", "error_barrier_test", role="siblings"),
        Metric("loss_barrier_test", "loss_barrier_test", role="siblings"),
        Metric("error_barrier_train", "error_barrier_train", role="siblings"),
        Metric("loss_barrier_train", "loss_barrier_train", role="siblings"),
        Metric("entezari_loss_barrier_test", "entezari_loss_barrier_test", role="siblings"),
        Metric("entezari_error_barrier_test", "entezari_error_barrier_test", role="siblings"),
        Metric("child_disagreement", "disagreement", role="siblings"),
        Metric("child_disagreement_over_error", "disagreement_over_error", role="siblings"),
        Metric("sibling_weight_distance", "weight_distance", role="siblings"),
        Metric("cross_init_disagreement", "disagreement", role="cross_init"),
        Metric("cross_init_weight_distance", "weight_distance", role="cross_init"),
        Metric("init_final_loss_barrier_test", "loss_barrier_test", role="init_final"),
        Metric("init_final_error_barrier_test", "error_barrier_test", role="init_final"),
    ]}}
    points: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    bn_recomputed: Mapped[bool] = mapped_column(Boolean)
    loss_barrier_train: Mapped[float] = _f()
    loss_barrier_test: Mapped[float] = _f()
    error_barrier_train: Mapped[float] = _f()
    error_barrier_test: Mapped[float] = _f()
    entezari_loss_barrier_train: Mapped[float] = _f()
    entezari_loss_barrier_test: Mapped[float] = _f()
    entezari_error_barrier_train: Mapped[float] = _f()
    entezari_error_barrier_test: Mapped[float] = _f()
    argmax_alpha_loss_train: Mapped[float] = _f()
    argmax_alpha_loss_test: Mapped[float] = _f()
    argmax_alpha_error_train: Mapped[float] = _f()
    argmax_alpha_error_test: Mapped[float] = _f()
    entezari_argmax_alpha_loss_train: Mapped[float] = _f()
    entezari_argmax_alpha_loss_test: Mapped[float] = _f()
    entezari_argmax_alpha_error_train: Mapped[float] = _f()
    entezari_argmax_alpha_error_test: Mapped[float] = _f()
    disagreement: Mapped[float] = _f()
    disagreement_over_error: Mapped[float | None] = _f(nullable=True)
    weight_distance: Mapped[float] = _f()
    relative_weight_distance: Mapped[float | None] = _f(nullable=True)


class BarrierCurveResult(ProbeRow, Base):
    """The whole interpolation curve of a ``barrier`` job: one row per α."""

    __tablename__ = "barrier_curve"
    alpha: Mapped[float] = _f()
    train_loss: Mapped[float] = _f()
    train_error: Mapped[float] = _f()
    test_loss: Mapped[float] = _f()
    test_error: Mapped[float] = _f()


class HessianResult(ProbeRow, Base):
    """Hessian of the mean training cross-entropy on a fixed batch (``hessian`` probe).

    ``converged`` is true only when every one of the top ``k`` Ritz pairs has a residual
    ‖Hy − θy‖ ≤ tol·max|θ| within the HVP budget; ``max_residual`` is the largest of those residuals.
    ``outliers`` = number of top eigenvalues above the largest log-gap (see the probe).
    ``subspace_overlap`` = ‖Y_prevᵀY‖²_F / k against the previous checkpoint's top-k subspace
    (null without a warm start). ``k`` is the number of eigenpairs asked for (probe version ≥ 3:
    2C + 2 by default, C = number of classes).

    Added in schema 5 (probe version 3; null on older rows):
    ``grad_norm`` = ‖g‖, g = ∇L on the same fixed batch. ``top_subspace_grad_fraction`` = ‖P g‖/‖g‖,
    P the orthogonal projector on the top-``top_subspace_dim`` (= C) Ritz vectors (Gur-Ari et al.
    2018; null when k < C); ``top_k_grad_fraction`` the same on all k Ritz vectors.
    ``batch_sharpness`` = mean over ``sharpness_batches`` random training batches B of
    ``sharpness_batch_size`` examples of g_Bᵀ H_B g_B / ‖g_B‖² (loss, gradient and Hessian on B alone;
    the quantity compared with the edge of stability 2/η in mini-batch runs), with
    ``batch_sharpness_stderr`` its standard error (0 for a full-batch run, whose one batch is the whole
    split); the batches are drawn with ``sharpness_seed``; ``sharpness_hvps`` HVPs (one per batch, not
    counted in ``hvps``, which counts the products on the fixed batch).

    Added in schema 6: ``hvp``, how the products were taken (``layers``: the R-operator written out
    for plain-layer models; ``double_backward``; ``fwd_rev``); null on older rows.
    """

    __tablename__ = "hessian"
    __table_args__ = {"info": {"metrics": [
        Metric("hessian_top_eigenvalue", "top_eigenvalue"),
        Metric("hessian_trace", "trace"),
        Metric("hessian_outliers", "outliers"),
        Metric("batch_sharpness", "batch_sharpness",
               meaning="mean over training batches B of g_BᵀH_Bg_B/‖g_B‖² (hessian probe)"),
        Metric("top_subspace_grad_fraction", "top_subspace_grad_fraction",
               meaning="‖P g‖/‖g‖, P onto the top-C Hessian eigenvectors, g the gradient (hessian probe)"),
        Metric("top_k_grad_fraction", "top_k_grad_fraction",
               meaning="‖P g‖/‖g‖, P onto all k computed Hessian eigenvectors (hessian probe)"),
    ]}}
    batch_size: Mapped[int] = mapped_column(Integer)
    batch_loss: Mapped[float] = _f()
    top_eigenvalue: Mapped[float] = _f()
    k: Mapped[int] = mapped_column(Integer)
    lanczos_iters: Mapped[int] = mapped_column(Integer)
    hvps: Mapped[int] = mapped_column(Integer)
    converged: Mapped[bool] = mapped_column(Boolean)
    max_residual: Mapped[float] = _f()
    tol: Mapped[float] = _f()
    outliers: Mapped[int] = mapped_column(Integer)
    trace: Mapped[float] = _f()
    trace_stderr: Mapped[float] = _f()
    trace_method: Mapped[str] = mapped_column(String)
    trace_hvps: Mapped[int] = mapped_column(Integer)
    density_hvps: Mapped[int] = mapped_column(Integer)
    warm_started: Mapped[bool] = mapped_column(Boolean)
    subspace_overlap: Mapped[float | None] = _f(nullable=True)
    ritz_artifact: Mapped[str | None] = mapped_column(String, nullable=True)
    grad_norm: Mapped[float | None] = _f(nullable=True)
    top_subspace_dim: Mapped[int | None] = mapped_column(Integer, nullable=True)
    top_subspace_grad_fraction: Mapped[float | None] = _f(nullable=True)
    top_k_grad_fraction: Mapped[float | None] = _f(nullable=True)
    batch_sharpness: Mapped[float | None] = _f(nullable=True)
    batch_sharpness_stderr: Mapped[float | None] = _f(nullable=True)
    sharpness_batches: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sharpness_batch_size: Mapped[int | None] = mapped_column(Integer, nullable=True)
    sharpness_seed: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    sharpness_hvps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # how the products were taken: layers | double_backward | fwd_rev (null on rows before schema 6)
    hvp: Mapped[str | None] = mapped_column(String, nullable=True)


class HessianEigenvalueResult(ProbeRow, Base):
    """Top-k Ritz values of a ``hessian`` job, rank 1 = largest, with their residuals ‖Hy − θy‖."""

    __tablename__ = "hessian_eigenvalue"
    rank: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = _f()
    residual: Mapped[float] = _f()


class HessianDensityResult(ProbeRow, Base):
    """Spectral density of a ``hessian`` job by stochastic Lanczos quadrature, on a grid."""

    __tablename__ = "hessian_density"
    grid: Mapped[float] = _f()
    density: Mapped[float] = _f()


class FlatnessResult(ProbeRow, Base):
    """Filter-normalised flatness around a checkpoint (``flatness`` probe).

    ``sharpness_1d`` = σ_1D, ``curvature`` = κ (mean over directions), ``adversarial_sharpness`` =
    max L(w+ε) − L(w) over the filter-normalised ball of radius ``rho``; ``fgsm_error`` and
    ``pgd_error`` = test error under input perturbations of L∞ radius ``epsilon``.
    """

    __tablename__ = "flatness"
    __table_args__ = {"info": {"metrics": [
        Metric("sharpness_1d", "sharpness_1d"),
        Metric("curvature_1d", "curvature"),
        Metric("adversarial_sharpness", "adversarial_sharpness"),
        Metric("fgsm_error", "fgsm_error"),
        Metric("pgd_error", "pgd_error"),
    ]}}
    n_train: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = _f()
    directions: Mapped[int] = mapped_column(Integer)
    sharpness_1d: Mapped[float] = _f()
    sharpness_1d_std: Mapped[float] = _f()
    curvature: Mapped[float] = _f()
    curvature_std: Mapped[float] = _f()
    rho: Mapped[float] = _f()
    adversarial_sharpness: Mapped[float] = _f()
    random_sharpness_at_rho: Mapped[float] = _f()
    epsilon: Mapped[float] = _f()
    pgd_steps: Mapped[int] = mapped_column(Integer)
    clean_error: Mapped[float] = _f()
    fgsm_error: Mapped[float] = _f()
    pgd_error: Mapped[float] = _f()


class SliceResult(ProbeRow, Base):
    """Filter-normalised loss surface around a checkpoint (``slice`` probe): the point
    w + a·d₁ (dims = 1, b null) or w + a·d₁ + b·d₂ (dims = 2), loss and error on ``split``."""

    __tablename__ = "slice"
    dims: Mapped[int] = mapped_column(Integer)
    a: Mapped[float] = _f()
    b: Mapped[float | None] = _f(nullable=True)
    split: Mapped[str] = mapped_column(String)
    loss: Mapped[float] = _f()
    error: Mapped[float] = _f()
