"""Result table of the ``merge`` probe (see lsdb.probes.merge for the exact maths)."""

from __future__ import annotations

from sqlalchemy import Double, Integer
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


def _f():
    return mapped_column(Double, nullable=False)


class MergeResult(ProbeRow, Base):
    """Barriers between two nets from different initialisations, naive and after weight matching
    (Git Re-Basin), one row per pair (role "cross_init", anchored at the first run's final checkpoint).

    ``{naive,matched}_{loss,error}_barrier_{train,test}`` = max_α Q(α) − ½(Q(0)+Q(1)) on the path
    (1−α)w_A + α w_B, resp. (1−α)w_A + α π(w_B) with π the weight-matching permutation;
    ``*_midpoint_test_loss`` = test loss at α = ½; ``weight_distance_*`` = ‖w_A − w_B‖₂ and
    ‖w_A − π(w_B)‖₂ over trainable parameters; ``sweeps`` = coordinate-descent sweeps run.
    """

    __tablename__ = "merge"
    __table_args__ = {"info": {"metrics": [
        Metric("cross_init_loss_barrier_test", "naive_loss_barrier_test", role="cross_init"),
        Metric("matched_loss_barrier_test", "matched_loss_barrier_test", role="cross_init"),
        Metric("cross_init_error_barrier_test", "naive_error_barrier_test", role="cross_init"),
        Metric("matched_error_barrier_test", "matched_error_barrier_test", role="cross_init"),
    ]}}
    points: Mapped[int] = mapped_column(Integer)
    sweeps: Mapped[int] = mapped_column(Integer)
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    naive_loss_barrier_test: Mapped[float] = _f()
    naive_error_barrier_test: Mapped[float] = _f()
    matched_loss_barrier_test: Mapped[float] = _f()
    matched_error_barrier_test: Mapped[float] = _f()
    naive_loss_barrier_train: Mapped[float] = _f()
    matched_loss_barrier_train: Mapped[float] = _f()
    naive_error_barrier_train: Mapped[float] = _f()
    matched_error_barrier_train: Mapped[float] = _f()
    naive_midpoint_test_loss: Mapped[float] = _f()
    matched_midpoint_test_loss: Mapped[float] = _f()
    weight_distance_naive: Mapped[float] = _f()
    weight_distance_matched: Mapped[float] = _f()
