"""Result tables of the kernel probes (``ntk``, ``ntk_distance``, ``kernel_accuracy``; see
lsdb.probes for the maths of each column)."""

from __future__ import annotations

from sqlalchemy import Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


class NtkResult(ProbeRow, Base):
    """Scalars of the empirical NTK Θ_t on the probe set; the matrix is the artifact ``artifact``.

    ``rows`` = n·C for the ``full`` variant, n otherwise. ``effective_rank`` = (Σλ)²/Σλ² =
    tr(Θ)²/‖Θ‖²_F. ``alignment`` = ⟨Θ, T⟩_F/(‖Θ‖_F‖T‖_F) with T built from one-hot labels (Y Yᵀ,
    or vec(Y)vec(Y)ᵀ for ``full``); ``centered_alignment`` after centring both.
    """

    __tablename__ = "ntk"
    __table_args__ = {"info": {"metrics": [
        Metric("ntk_norm", "frobenius_norm"),
        Metric("ntk_trace", "trace"),
        Metric("ntk_top_eigenvalue", "top1"),
        Metric("ntk_effective_rank", "effective_rank"),
        Metric("ntk_alignment", "alignment"),
        Metric("ntk_centered_alignment", "centered_alignment"),
    ]}}
    variant: Mapped[str] = mapped_column(String)
    n: Mapped[int] = mapped_column(Integer)
    rows: Mapped[int] = mapped_column(Integer)
    dtype: Mapped[str] = mapped_column(String)
    artifact: Mapped[str] = mapped_column(String)  # sha256 of the stored kernel (artifacts/<sha>.npy)
    frobenius_norm: Mapped[float] = mapped_column(Double)
    trace: Mapped[float] = mapped_column(Double)
    mean_diagonal: Mapped[float] = mapped_column(Double)
    top1: Mapped[float] = mapped_column(Double)
    top2: Mapped[float | None] = mapped_column(Double, nullable=True)
    top3: Mapped[float | None] = mapped_column(Double, nullable=True)
    effective_rank: Mapped[float] = mapped_column(Double)
    alignment: Mapped[float] = mapped_column(Double)
    centered_alignment: Mapped[float] = mapped_column(Double)


class NtkDistanceResult(ProbeRow, Base):
    """Kernel distance S(K, K') = 1 − ⟨K, K'⟩_F/(‖K‖_F‖K'‖_F) between two stored kernels.

    ``angle`` = arccos(1 − S). For role ``next``: ``delta_epoch`` = epoch(K') − epoch(K) > 0,
    ``velocity`` = S/Δ and ``angular_velocity`` = angle/Δ, anchored at the earlier checkpoint.
    ``delta_epoch`` is also filled (as |Δepoch|) for ``init`` and ``spawn_final``; velocities are
    null outside role ``next``.
    """

    __tablename__ = "ntk_distance"
    __table_args__ = {"info": {"metrics": [
        Metric("kernel_distance_to_init", "distance", role="init"),
        Metric("kernel_distance_next", "distance", role="next"),
        Metric("kernel_velocity", "velocity", role="next"),
        Metric("kernel_angular_velocity", "angular_velocity", role="next"),
        Metric("sibling_kernel_distance", "distance", role="siblings"),
        Metric("kernel_distance_spawn_to_final", "distance", role="spawn_final"),
        Metric("cross_init_kernel_distance", "distance", role="cross_init"),
    ]}}
    variant: Mapped[str] = mapped_column(String)
    distance: Mapped[float] = mapped_column(Double)
    angle: Mapped[float] = mapped_column(Double)
    delta_epoch: Mapped[float | None] = mapped_column(Double, nullable=True)
    velocity: Mapped[float | None] = mapped_column(Double, nullable=True)
    angular_velocity: Mapped[float | None] = mapped_column(Double, nullable=True)


class KernelAccuracyResult(ProbeRow, Base):
    """How good the kernel machine at time t is; one row per ``method``.

    ``linearised``: the Taylor model f(x; w_t) + J_t(x)(w − w_t) trained from w = w_t with SGD
    (``lr_mode`` ``fixed`` or ``kernel_scaled``, ``lr`` the rate used, ``steps`` steps); train
    metrics on ``n_train`` training inputs, test metrics on the test split.
    ``kernel_regression``: f_t(x*) + Θ_t(x*, X)(Θ_t(X, X) + λI)⁻¹(Y − f_t(X)) on the probe set X
    (``n_train`` inputs, train metrics on X itself), ``lambda`` = λ, ``kernel_variant`` the Θ used.
    """

    __tablename__ = "kernel_accuracy"
    __table_args__ = {"info": {"metrics": [
        Metric("linearised_test_error", "test_error", where="t.method = 'linearised'"),
        Metric("linearised_train_error", "train_error", where="t.method = 'linearised'"),
        Metric("linearised_test_loss", "test_loss", where="t.method = 'linearised'"),
        Metric("kernel_regression_test_error", "test_error", where="t.method = 'kernel_regression'"),
    ]}}
    method: Mapped[str] = mapped_column(String)  # linearised | kernel_regression
    lr_mode: Mapped[str | None] = mapped_column(String, nullable=True)  # fixed | kernel_scaled
    lr: Mapped[float | None] = mapped_column(Double, nullable=True)
    steps: Mapped[int | None] = mapped_column(Integer, nullable=True)
    kernel_variant: Mapped[str | None] = mapped_column(String, nullable=True)
    n_train: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Double)
    train_error: Mapped[float] = mapped_column(Double)
    test_loss: Mapped[float] = mapped_column(Double)
    test_error: Mapped[float] = mapped_column(Double)
    # `lambda` is a Python keyword, so the attribute is named lam and the column "lambda"
    lam: Mapped[float | None] = mapped_column("lambda", Double, nullable=True)
