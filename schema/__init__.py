"""Typed SQLAlchemy models for every table of a store, and the schema version.

Importing this package registers every table on ``Base.metadata``. Probe families keep their
result tables in their own module (``probes`` for eval/weights, ``kernel``, ``geometry``).
"""

from . import core, geometry, kernel, merge, probes, soup, tasks  # noqa: F401  (registers the tables)
from .base import KEY_COLUMNS, Base, Metric, ProbeRow, metrics_of
from .core import Checkpoint, Experiment, ExperimentRun, ProbeJob, Run, SchemaVersion
from .views import metric_names, metric_series_sql, metric_sources, views_sql

# Bump with every change to a table; add an entry to UPGRADES that brings the previous version up.
# 2: run ids no longer hash the checkpoint schedule; checkpoints record their optimiser state's
#    hash. Stores of schema 1 cannot be upgraded (their children's data order derives from the old
#    ids), so they are refused with a message (lsdb.store).
# 3: experiment_run says which experiments declare a run (edited specs share runs); metric_series
#    carries the experiment's name. A schema-2 store links each run to the experiment that
#    recorded it. probe_job.batchnorm says how a job treated BatchNorm, probe_job.peak_memory_mb
#    and probe_job.threads what it used (null on older jobs).
# 4: probe_job.more_checkpoint_ids lists a job's checkpoints after the second (JSON; soups and task
#    arithmetic read k > 2 checkpoints), null for jobs of one or two. run.finetune, task_classes,
#    task_fraction and task_examples describe fine-tunes (kind "finetune"; null on other runs).
# 5: hessian gains batch sharpness (batch_sharpness, its stderr, batches, batch size, seed, HVPs), the
#    gradient's norm and its fraction in the top-C and top-k Ritz subspaces (null on older rows).
# 6: hessian.hvp says how the job took its Hessian-vector products (the layer-wise products agree
#    with double backward to float rounding; null on older rows).
SCHEMA_VERSION = 6
MIN_SCHEMA_VERSION = 2

# version -> SQL statements that upgrade a store from version-1 to version (new tables need none:
# ``create_all`` adds them).
UPGRADES: dict[int, list[str]] = {
    3: ["INSERT INTO experiment_run SELECT experiment_id, id FROM run ON CONFLICT DO NOTHING",
        # create_all adds tables, never columns to a table that exists
        "ALTER TABLE probe_job ADD COLUMN IF NOT EXISTS batchnorm VARCHAR",
        "ALTER TABLE probe_job ADD COLUMN IF NOT EXISTS peak_memory_mb DOUBLE",
        "ALTER TABLE probe_job ADD COLUMN IF NOT EXISTS threads INTEGER"],
    4: ["ALTER TABLE probe_job ADD COLUMN IF NOT EXISTS more_checkpoint_ids VARCHAR",
        "ALTER TABLE run ADD COLUMN IF NOT EXISTS finetune VARCHAR",
        "ALTER TABLE run ADD COLUMN IF NOT EXISTS task_classes VARCHAR",
        "ALTER TABLE run ADD COLUMN IF NOT EXISTS task_fraction DOUBLE",
        "ALTER TABLE run ADD COLUMN IF NOT EXISTS task_examples INTEGER"],
    5: [f"ALTER TABLE hessian ADD COLUMN IF NOT EXISTS {name} {kind}" for name, kind in (
        ("grad_norm", "DOUBLE"), ("top_subspace_dim", "INTEGER"), ("top_subspace_grad_fraction", "DOUBLE"),
        ("top_k_grad_fraction", "DOUBLE"), ("batch_sharpness", "DOUBLE"), ("batch_sharpness_stderr", "DOUBLE"),
        ("sharpness_batches", "INTEGER"), ("sharpness_batch_size", "INTEGER"), ("sharpness_seed", "BIGINT"),
        ("sharpness_hvps", "INTEGER"))],
    6: ["ALTER TABLE hessian ADD COLUMN IF NOT EXISTS hvp VARCHAR"],
}

__all__ = [
    "Base", "Metric", "ProbeRow", "KEY_COLUMNS", "metrics_of", "Checkpoint", "Experiment", "ExperimentRun", "ProbeJob",
    "Run", "SchemaVersion", "SCHEMA_VERSION", "MIN_SCHEMA_VERSION", "UPGRADES", "metric_series_sql", "views_sql", "metric_names", "metric_sources",
    "result_tables",
]


def result_tables() -> dict[str, object]:
    """Every probe result table by name (tables that carry the probe key columns)."""
    return {t.name: t for t in Base.metadata.sorted_tables if "job_id" in t.c and t.name != "probe_job"}
