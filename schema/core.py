"""The core tables: experiment, run, experiment_run, checkpoint, probe_job, schema_version."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import Boolean, DateTime, Double, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from .base import Base, Metric


class SchemaVersion(Base):
    __tablename__ = "schema_version"
    version: Mapped[int] = mapped_column(Integer, primary_key=True)
    applied_at: Mapped[datetime] = mapped_column(DateTime)
    lsdb_version: Mapped[str] = mapped_column(String)


class Experiment(Base):
    """One spec. ``id`` is the spec's identity hash (defaults left out)."""

    __tablename__ = "experiment"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    name: Mapped[str] = mapped_column(String)
    spec_toml: Mapped[str] = mapped_column(Text)
    dataset: Mapped[str] = mapped_column(String)
    probe_set_size: Mapped[int] = mapped_column(Integer)
    probe_set_seed: Mapped[int] = mapped_column(Integer)
    probe_set_sha256: Mapped[str] = mapped_column(String)  # artifact holding the indices
    created_at: Mapped[datetime] = mapped_column(DateTime)


class Run(Base):
    """One training trajectory. Hyperparameters are columns; children name their parent checkpoint."""

    __tablename__ = "run"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    experiment_id: Mapped[str] = mapped_column(String, ForeignKey("experiment.id"), index=True)
    variant: Mapped[str] = mapped_column(String)
    kind: Mapped[str] = mapped_column(String)  # parent | child | lowlr_child | finetune
    seed: Mapped[int] = mapped_column(Integer)
    data_seed: Mapped[int] = mapped_column(Integer)
    dataset: Mapped[str] = mapped_column(String)
    train_subset: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String)
    width: Mapped[int] = mapped_column(Integer)
    depth: Mapped[int] = mapped_column(Integer)
    kernels: Mapped[str] = mapped_column(String)
    patches: Mapped[int] = mapped_column(Integer)
    num_params: Mapped[int] = mapped_column(Integer)
    lr: Mapped[float] = mapped_column(Double)
    momentum: Mapped[float] = mapped_column(Double)
    weight_decay: Mapped[float] = mapped_column(Double)
    batch_size: Mapped[int] = mapped_column(Integer)
    epochs: Mapped[float] = mapped_column(Double)
    lr_drops: Mapped[str] = mapped_column(String)
    lr_drop_factor: Mapped[float] = mapped_column(Double)
    adversarial: Mapped[str] = mapped_column(String)
    adv_epsilon: Mapped[float] = mapped_column(Double)
    adv_steps: Mapped[int] = mapped_column(Integer)
    adv_mix: Mapped[float] = mapped_column(Double)
    steps_per_epoch: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    parent_run_id: Mapped[str | None] = mapped_column(String, ForeignKey("run.id"), nullable=True)
    parent_checkpoint_id: Mapped[str | None] = mapped_column(String, nullable=True)
    spawn_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    spawn_epoch: Mapped[float | None] = mapped_column(Double, nullable=True)
    child_index: Mapped[int | None] = mapped_column(Integer, nullable=True)
    status: Mapped[str] = mapped_column(String)  # planned | running | finished | diverged
    diverged_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    diverged_reason: Mapped[str | None] = mapped_column(String, nullable=True)
    config_json: Mapped[str] = mapped_column(Text)
    # a fine-tune (kind "finetune", from its parent's checkpoint parent_checkpoint_id at spawn_step):
    # its name in the spec, its task's classes ("0,1,2"; null = every class), the fraction of their
    # training examples it trains on, and how many examples that is; null on other runs
    finetune: Mapped[str | None] = mapped_column(String, nullable=True)
    task_classes: Mapped[str | None] = mapped_column(String, nullable=True)
    task_fraction: Mapped[float | None] = mapped_column(Double, nullable=True)
    task_examples: Mapped[int | None] = mapped_column(Integer, nullable=True)


class ExperimentRun(Base):
    """Which runs an experiment declares.

    A run id hashes only what shapes the weights (and the variant's name), so an edited spec (a
    new experiment id) shares the runs it did not change, and two specs with the same variant
    share its runs. Membership therefore lives here; ``run.experiment_id`` is only the
    experiment that first recorded the run."""

    __tablename__ = "experiment_run"
    experiment_id: Mapped[str] = mapped_column(String, ForeignKey("experiment.id"), primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("run.id"), primary_key=True)


class Checkpoint(Base):
    """Weights at one step, stored as ``checkpoints/<sha256>.safetensors``."""

    __tablename__ = "checkpoint"
    __table_args__ = (
        Index("ix_checkpoint_run_step", "run_id", "step", unique=True),
        {"info": {"metrics": [Metric(m, m, meaning=f"{m.replace('_', ' ')} the trainer measured on the whole split when it saved the checkpoint")
                              for m in ("train_loss", "train_error", "test_loss", "test_error")]
                  + [Metric("lr", "lr", meaning="learning rate at the checkpoint's step")]}},
    )
    id: Mapped[str] = mapped_column(String, primary_key=True)
    run_id: Mapped[str] = mapped_column(String, ForeignKey("run.id"))
    step: Mapped[int] = mapped_column(Integer)
    epoch: Mapped[float] = mapped_column(Double)
    frac: Mapped[float] = mapped_column(Double)  # step / total_steps: time that transfers across data sets
    sha256: Mapped[str] = mapped_column(String)
    has_optimizer: Mapped[bool] = mapped_column(Boolean)
    # the momentum saved beside the weights (checkpoints/<id>.optim.safetensors), verified on load
    optimizer_sha256: Mapped[str] = mapped_column(String)
    lr: Mapped[float] = mapped_column(Double)
    train_loss: Mapped[float] = mapped_column(Double)
    train_error: Mapped[float] = mapped_column(Double)
    test_loss: Mapped[float] = mapped_column(Double)
    test_error: Mapped[float] = mapped_column(Double)
    created_at: Mapped[datetime] = mapped_column(DateTime)


class ProbeJob(Base):
    """One probe measurement: identity = (probe, version, params hash, checkpoint ids, role)."""

    __tablename__ = "probe_job"
    id: Mapped[str] = mapped_column(String, primary_key=True)
    probe: Mapped[str] = mapped_column(String, index=True)
    version: Mapped[int] = mapped_column(Integer)
    params_hash: Mapped[str] = mapped_column(String)
    params_json: Mapped[str] = mapped_column(Text)
    role: Mapped[str] = mapped_column(String)
    checkpoint_id: Mapped[str] = mapped_column(String, ForeignKey("checkpoint.id"), index=True)
    other_checkpoint_id: Mapped[str | None] = mapped_column(String, nullable=True)
    anchor_checkpoint_id: Mapped[str] = mapped_column(String)
    inputs_json: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String)  # done | skipped | failed
    attempts: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str] = mapped_column(String)
    device: Mapped[str] = mapped_column(String)
    started_at: Mapped[datetime] = mapped_column(DateTime)
    seconds: Mapped[float] = mapped_column(Double)
    # what the numbers assume about BatchNorm (lsdb.probes.base.BATCHNORM_MODES); null for jobs
    # recorded before schema 3, or that failed before the model was built
    batchnorm: Mapped[str | None] = mapped_column(String, nullable=True)
    # the most memory the job held, in MiB: CUDA max allocated, else the peak resident set size
    # sampled during the job (lsdb.probes.worker.PeakMemory); null on jobs logged before it
    peak_memory_mb: Mapped[float | None] = mapped_column(Double, nullable=True)
    # torch threads the job ran with: results differ in the last digits between thread counts
    # (docs/memory.md), so a study resumed with another --workers says which rows are which
    threads: Mapped[int | None] = mapped_column(Integer, nullable=True)
    # a JSON list of the job's checkpoints after the second, for probes that read more than two
    # (soups, task arithmetic); null otherwise. The job id hashes every checkpoint, in order.
    more_checkpoint_ids: Mapped[str | None] = mapped_column(Text, nullable=True)
