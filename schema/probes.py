"""Result tables of the pipeline's first probes: ``eval`` and ``weights``."""

from __future__ import annotations

from sqlalchemy import Double, Integer
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


class EvalResult(ProbeRow, Base):
    """Loss and error on the train and test splits (``eval`` probe)."""

    __tablename__ = "eval"
    __table_args__ = {"info": {"metrics": [
        Metric(f"eval_{m}", m, meaning=f"{m.replace('_', ' ')} of the eval probe: the trainer's {m} when "
               f"max_train/max_test are 0 (the whole split), else on the first examples only")
        for m in ("train_loss", "train_error", "test_loss", "test_error")
    ]}}
    n_train: Mapped[int] = mapped_column(Integer)
    n_test: Mapped[int] = mapped_column(Integer)
    train_loss: Mapped[float] = mapped_column(Double)
    train_error: Mapped[float] = mapped_column(Double)
    test_loss: Mapped[float] = mapped_column(Double)
    test_error: Mapped[float] = mapped_column(Double)


class WeightsResult(ProbeRow, Base):
    """Weight norm (role ``self``) and distances between two checkpoints (other roles).

    ``distance`` = ‖w − w'‖₂ over all parameters; ``relative_distance`` = distance / ‖w'‖₂.
    """

    __tablename__ = "weights"
    __table_args__ = {"info": {"metrics": [
        Metric("weight_norm", "norm", role="self"),
        Metric("distance_to_init", "distance", role="init"),
        Metric("relative_distance_to_init", "relative_distance", role="init"),
        Metric("distance_to_parent", "distance", role="parent"),
        Metric("sibling_distance", "distance", role="siblings"),
        Metric("relative_sibling_distance", "relative_distance", role="siblings"),
    ]}}
    norm: Mapped[float] = mapped_column(Double)
    distance: Mapped[float | None] = mapped_column(Double, nullable=True)
    relative_distance: Mapped[float | None] = mapped_column(Double, nullable=True)
