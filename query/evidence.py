"""The numbers the findings read from a store, gathered into one ``Evidence`` object.

Also what the findings need to know about metrics: which probe writes each one (``PROBE_OF``), the advice
given when one is missing (``advice``), and the number of classes of each data set (the C of F9).
"""

from __future__ import annotations

import math

import numpy as np

from lsdb.query import thresholds as T

#: Which spec entry produces a metric: the advice given when it is missing.
PROBE_OF = {
    **{m: "barrier" for m in ("error_barrier_test", "loss_barrier_test", "child_disagreement",
                              "entezari_loss_barrier_test", "sibling_weight_distance")},
    **{m: "ntk_distance" for m in ("kernel_velocity", "kernel_angular_velocity", "kernel_distance_next",
                                   "kernel_distance_to_init", "sibling_kernel_distance")},
    **{m: "kernel_accuracy" for m in ("linearised_test_error",)},
    **{m: "hessian" for m in ("hessian_top_eigenvalue", "hessian_trace", "hessian_outliers", "batch_sharpness",
                              "top_subspace_grad_fraction", "top_k_grad_fraction")},
    **{m: "flatness" for m in ("sharpness_1d", "curvature_1d", "adversarial_sharpness")},
    **{m: "weights" for m in ("relative_sibling_distance",)},
    **{m: "merge" for m in ("cross_init_loss_barrier_test", "matched_loss_barrier_test")},
    **{m: "soup" for m in ("children_soup_test_loss", "children_members_test_loss", "cross_init_soup_test_loss",
                           "cross_init_members_test_loss", "cross_init_matched_soup_test_loss")},
    **{m: "barrier" for m in ("cross_init_disagreement",)},
    **{m: "task_arithmetic" for m in ("task_vector_cosine", "task_addition_normalised_accuracy",
                                      "ties_normalised_accuracy", "task_addition_task_error", "ties_task_error",
                                      "finetune_task_error", "base_task_error")},
}
SIBLING_METRICS = {"children_soup_test_loss", "children_members_test_loss", "error_barrier_test", "loss_barrier_test",
                   "child_disagreement", "sibling_kernel_distance", "relative_sibling_distance",
                   "entezari_loss_barrier_test", "sibling_weight_distance"}

#: Merging across different initialisations (F14, second part): the ``merge`` probe writes these.
MERGE_NAIVE = "cross_init_loss_barrier_test"
MERGE_MATCHED = "matched_loss_barrier_test"


#: The advantage is computed here (linearised error − final error of low-lr children).
NONLINEAR_ADVANTAGE = "nonlinear_advantage"

#: Checkpoint columns the findings read next to the probes' metrics (every checkpoint has them).
CHECKPOINT_METRICS = ("lr", "train_loss", "test_error")

FINDING_METRICS = sorted(set(PROBE_OF) | set(CHECKPOINT_METRICS))

#: Probes that evaluate an interpolation path on an α grid (its ``points`` column; PATH_POINTS_MIN).
PATH_PROBES = ("barrier", "merge")


def advice(metric: str) -> str:
    """What to add to the spec so that ``metric`` gets measured."""
    if metric == NONLINEAR_ADVANTAGE:
        return ("the nonlinear advantage needs [probes.kernel_accuracy] and low-lr children "
                "(lowlr_children = 1 under [spawn])")
    if metric in (MERGE_NAIVE, MERGE_MATCHED):
        return ("add [probes.merge] to the spec, with ≥ 2 seeds: it pairs the final checkpoints of parent runs "
                "with different seeds")
    if PROBE_OF.get(metric) == "task_arithmetic":
        return ("declare fine-tunes of the parents ([finetunes.NAME] with classes = [...], steps, lr; at least two) "
                "and add [probes.task_arithmetic]")
    if metric.startswith("cross_init_") and PROBE_OF.get(metric) == "barrier":
        return "add [probes.barrier] with cross_init = true and ≥ 2 seeds (it pairs parents of different seeds)"
    probe = PROBE_OF.get(metric, "?")
    spawn = " and spawn times with children ([spawn] times = [...], children = 2)" if metric in SIBLING_METRICS else ""
    return f"add [probes.{probe}]{spawn} to the spec"


class Evidence:
    """The slice of a store the findings read, as polars frames (tests build it directly).

    ``runs``: the run table. ``finals``: run_id, epoch, frac, test_error, test_loss, train_error,
    train_loss at each run's last checkpoint. ``series``: run_id, checkpoint_id, epoch, frac,
    metric, value (averaged per checkpoint). ``dataset``: the data set name (for C).
    ``path_points``: probe name → the fewest α points any of its rows used (``PATH_PROBES``).
    """

    def __init__(self, runs, finals, series, dataset: str | None = "mnist1d",
                 path_points: dict[str, int] | None = None):
        import polars as pl

        self.runs = runs.filter(pl.col("status") != "diverged") if "status" in runs.columns else runs
        self.finals = finals
        self.series = series
        self.dataset = dataset
        self.path_points = dict(path_points or {})
        self._metrics = set(series["metric"].unique().to_list()) if series.height else set()
        self._final = {r["run_id"]: r for r in finals.iter_rows(named=True)}
        self._advantage: dict | None = None

    @classmethod
    def from_session(cls, session) -> "Evidence":
        from lsdb.query.correlate import load_series

        runs = session.sql("SELECT * FROM run")
        finals = session.sql(
            "SELECT run_id, arg_max(epoch, step) AS epoch, arg_max(frac, step) AS frac, "
            "arg_max(test_error, step) AS test_error, arg_max(test_loss, step) AS test_loss, "
            "arg_max(train_error, step) AS train_error, arg_max(train_loss, step) AS train_loss "
            "FROM checkpoint GROUP BY run_id")
        series = load_series(session, FINDING_METRICS)
        ds = session.sql("SELECT dataset, count(*) AS n FROM run GROUP BY dataset ORDER BY n DESC")
        from lsdb.errors import QueryError

        points = {}
        for probe in PATH_PROBES:  # probe name = table name
            try:
                got = session.sql(f"SELECT min(points) AS p FROM {probe}")
            except QueryError:  # a store from before the probe existed
                continue
            if got.height and got["p"][0] is not None:
                points[probe] = int(got["p"][0])
        return cls(runs, finals, series, ds["dataset"][0] if ds.height else None, points)

    # ------------------------------------------------------------------ lookups
    def has(self, metric: str) -> bool:
        return metric in self._metrics

    def parents(self, variant: str | None = "base", **where):
        import polars as pl

        df = self.runs.filter(pl.col("kind") == "parent")
        if variant is not None:
            df = df.filter(pl.col("variant") == variant)
        for k, v in where.items():
            df = df.filter(pl.col(k) == v)
        return df.sort("seed", "id")

    def final(self, run_id: str) -> dict | None:
        return self._final.get(run_id)

    def by_run(self, metric: str, run_ids) -> dict[str, dict]:
        """run_id -> dict(epoch, frac, value, checkpoint_id) numpy arrays sorted by epoch."""
        import polars as pl

        part = self.series.filter((pl.col("metric") == metric) & pl.col("run_id").is_in(list(run_ids)))
        out = {}
        for (rid,), g in part.sort("epoch").group_by(["run_id"], maintain_order=True):
            out[rid] = {c: g[c].to_numpy() for c in ("epoch", "frac", "value", "checkpoint_id")}
        return out

    def base_series(self, metric: str) -> dict[str, dict]:
        if metric == NONLINEAR_ADVANTAGE:
            return self.advantage()
        return self.by_run(metric, self.parents()["id"].to_list())

    def final_value(self, metric: str, run_id: str) -> tuple[float, float] | None:
        """(value, frac) of ``metric`` at the latest checkpoint where the run has it."""
        s = self.by_run(metric, [run_id]).get(run_id)
        if s is None or len(s["value"]) == 0:
            return None
        return float(s["value"][-1]), float(s["frac"][-1])

    def advantage(self) -> dict[str, dict]:
        """Nonlinear advantage(t) per base parent: linearised_test_error at the expansion checkpoint
        minus the mean final test error of the low-lr children spawned from that checkpoint."""
        if self._advantage is None:
            self._advantage = self._compute_advantage()
        return self._advantage

    def _compute_advantage(self) -> dict[str, dict]:
        import polars as pl

        lowlr = self.runs.filter(pl.col("kind") == "lowlr_child")
        child_err: dict[str, list[float]] = {}
        for r in lowlr.iter_rows(named=True):
            fin = self.final(r["id"])
            if fin is not None and r["parent_checkpoint_id"] is not None:
                child_err.setdefault(r["parent_checkpoint_id"], []).append(fin["test_error"])
        out = {}
        for rid, s in self.by_run("linearised_test_error", self.parents()["id"].to_list()).items():
            keep = [i for i, c in enumerate(s["checkpoint_id"]) if c in child_err]
            if keep:
                adv = np.array([s["value"][i] - np.mean(child_err[s["checkpoint_id"][i]]) for i in keep])
                out[rid] = {"epoch": s["epoch"][keep], "frac": s["frac"][keep], "value": adv,
                            "checkpoint_id": s["checkpoint_id"][keep]}
        return out

    def at_checkpoints(self, metric: str) -> dict[str, float]:
        """checkpoint_id -> value of ``metric`` (e.g. the checkpoint's train_loss)."""
        import polars as pl

        part = self.series.filter(pl.col("metric") == metric)
        return dict(zip(part["checkpoint_id"].to_list(), part["value"].to_list()))

    def loss_drop(self, run_id: str) -> tuple[float, float, float] | None:
        """(relative train-loss drop, reference t/T, final train loss) from the latest checkpoint at or before
        t/T = 1 − CONVERGED_WINDOW_FRAC to the run's final one; None without such a checkpoint."""
        s = self.by_run("train_loss", [run_id]).get(run_id)
        if s is None or len(s["value"]) < 2:
            return None
        last = len(s["value"]) - 1
        ref = np.flatnonzero(s["frac"] <= s["frac"][last] - T.CONVERGED_WINDOW_FRAC + 1e-9)
        if len(ref) == 0:
            return None
        i = int(ref[-1])
        l0, l1 = float(s["value"][i]), float(s["value"][last])
        return ((l0 - l1) / l0 if l0 > 0 else 0.0), float(s["frac"][i]), l1

    def missing(self, metrics) -> list[str]:
        return [m for m in metrics if not (self.advantage() if m == NONLINEAR_ADVANTAGE else self.has(m))]


def _variant_final(ev: Evidence, metric: str, runs) -> dict[int, float]:
    """seed -> metric at the latest measured checkpoint of each run."""
    out = {}
    for r in runs.iter_rows(named=True):
        got = ev.final_value(metric, r["id"])
        if got is not None:
            out.setdefault(r["seed"], []).append(got[0])
    return {s: float(np.mean(v)) for s, v in out.items()}


def _clean_error(ev: Evidence, runs) -> float:
    errs = [ev.final(r)["test_error"] for r in runs["id"] if ev.final(r)]
    return float(np.mean(errs)) if errs else math.nan
