"""Result tables of the ``task_arithmetic`` probe (see lsdb.probes.task_arithmetic for the exact
maths). Every row belongs to one job: a base checkpoint and the final checkpoints of the
fine-tunes that start from it (role "tasks", anchored at the base)."""

from __future__ import annotations

from sqlalchemy import Double, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric, ProbeRow


def _f():
    return mapped_column(Double, nullable=False)


def _f_null():
    return mapped_column(Double, nullable=True)


class TaskVector(ProbeRow, Base):
    """One row per fine-tune of the job: its task vector τ = w_ft − w_base (trainable parameters)
    and how the fine-tune and the base do on the task's test examples (those of ``task_classes``;
    the whole test split for a task of ``task_fraction`` alone). ``n_task_test`` = 0 (and the
    task columns null) when the test split holds no example of the task's classes."""

    __tablename__ = "task_vector"
    __table_args__ = {"info": {"metrics": [
        Metric("task_vector_norm", "norm", role="tasks",
               meaning="‖w_ft − w_base‖₂ over trainable parameters, at the base checkpoint (mean over fine-tunes)"),
        Metric("finetune_task_error", "finetune_task_error", role="tasks",
               meaning="a fine-tune's error on its task's test examples, at its base (mean over fine-tunes)"),
        Metric("base_task_error", "base_task_error", role="tasks",
               meaning="the base checkpoint's error on a task's test examples (mean over its fine-tunes' tasks)"),
    ]}}
    finetune: Mapped[str] = mapped_column(String)  # the fine-tune's name in the spec
    finetune_run_id: Mapped[str] = mapped_column(String)
    finetune_checkpoint_id: Mapped[str] = mapped_column(String)  # its final checkpoint: w_ft
    task_classes: Mapped[str | None] = mapped_column(String, nullable=True)  # "0,1,2"; null = every class
    task_fraction: Mapped[float] = _f()
    n_task_test: Mapped[int] = mapped_column(Integer)
    norm: Mapped[float] = _f()
    finetune_task_loss: Mapped[float | None] = _f_null()
    finetune_task_error: Mapped[float | None] = _f_null()
    base_task_loss: Mapped[float | None] = _f_null()
    base_task_error: Mapped[float | None] = _f_null()
    finetune_test_loss: Mapped[float] = _f()  # on the whole test split
    finetune_test_error: Mapped[float] = _f()


class TaskVectorCosine(ProbeRow, Base):
    """One row per pair of fine-tunes a < b (in the job's order: by name) from the same base:
    cos(τ_a, τ_b) = ⟨τ_a, τ_b⟩ / (‖τ_a‖ ‖τ_b‖) over trainable parameters (NaN when a norm is 0)."""

    __tablename__ = "task_vector_cosine"
    __table_args__ = {"info": {"metrics": [
        Metric("task_vector_cosine", "cosine", role="tasks",
               meaning="cosine similarity of two fine-tunes' task vectors, at their base (mean over pairs)"),
    ]}}
    finetune_a: Mapped[str] = mapped_column(String)
    finetune_b: Mapped[str] = mapped_column(String)
    checkpoint_a: Mapped[str] = mapped_column(String)  # the fine-tunes' final checkpoints
    checkpoint_b: Mapped[str] = mapped_column(String)
    cosine: Mapped[float] = _f()


class TaskArithmetic(ProbeRow, Base):
    """One row per merge ``method`` × ``lam`` × evaluation set: the merged weights
    w_base + λ·Σ τ_i ("sum", task arithmetic) or w_base + λ·τ_TIES ("ties", TIES-merging with
    ``ties_keep``) of the job's ``tasks`` task vectors, evaluated on the test examples of
    ``finetune``'s task (null = the whole test split): mean cross-entropy ``loss``, ``error``,
    and for a task ``normalised_accuracy`` = (1 − error) / (1 − the fine-tune's own error there)
    (null on the whole split, or when the fine-tune classifies none of its task right)."""

    __tablename__ = "task_arithmetic"
    __table_args__ = {"info": {"metrics": [
        Metric("task_addition_test_error", "error", role="tasks",
               where="t.method = 'sum' AND t.finetune IS NULL AND t.lam = 1.0",
               meaning="test error of w_base + Σ τ_i (λ = 1) on the whole test split, at the base"),
        Metric("ties_test_error", "error", role="tasks",
               where="t.method = 'ties' AND t.finetune IS NULL AND t.lam = 1.0",
               meaning="test error of TIES-merging at λ = 1 on the whole test split, at the base"),
        Metric("task_addition_task_error", "error", role="tasks",
               where="t.method = 'sum' AND t.finetune IS NOT NULL AND t.lam = 1.0",
               meaning="error of w_base + Σ τ_i (λ = 1) on a task's test examples (mean over tasks), at the base"),
        Metric("ties_task_error", "error", role="tasks",
               where="t.method = 'ties' AND t.finetune IS NOT NULL AND t.lam = 1.0",
               meaning="error of TIES-merging (λ = 1) on a task's test examples (mean over tasks), at the base"),
        Metric("task_addition_normalised_accuracy", "normalised_accuracy", role="tasks",
               where="t.method = 'sum' AND t.finetune IS NOT NULL AND t.lam = 1.0",
               meaning="accuracy of w_base + Σ τ_i (λ = 1) on a task over its fine-tune's (mean over tasks)"),
        Metric("ties_normalised_accuracy", "normalised_accuracy", role="tasks",
               where="t.method = 'ties' AND t.finetune IS NOT NULL AND t.lam = 1.0",
               meaning="accuracy of TIES-merging (λ = 1) on a task over its fine-tune's (mean over tasks)"),
    ]}}
    method: Mapped[str] = mapped_column(String)  # sum | ties
    lam: Mapped[float] = _f()  # λ
    ties_keep: Mapped[float | None] = _f_null()  # the fraction TIES keeps; null for "sum"
    tasks: Mapped[int] = mapped_column(Integer)  # task vectors merged
    finetune: Mapped[str | None] = mapped_column(String, nullable=True)  # whose test examples; null = all
    n: Mapped[int] = mapped_column(Integer)  # examples evaluated
    loss: Mapped[float] = _f()
    error: Mapped[float] = _f()
    normalised_accuracy: Mapped[float | None] = _f_null()
