"""Hand-built stores for the query tests: real DuckDB files, rows whose answer we know.

``StoreBuilder`` writes experiments, runs, checkpoints and metric rows through the typed tables.
``metric(...)`` finds the table that declares a metric (its ``info["metrics"]``), so a test can
write e.g. ``error_barrier_test`` without knowing the geometry schema; when no table declares
the metric yet, ``has_metric`` is False and the test skips.
"""

from __future__ import annotations

import re
from datetime import datetime

import sqlalchemy as sa

from lsdb.schema import Base, metrics_of
from lsdb.store import Store

_WHERE_EQ = re.compile(r"t\.(\w+)\s*=\s*('([^']*)'|-?[0-9.]+)")
_WHERE_NOT_NULL = re.compile(r"t\.(\w+)\s+IS NOT NULL")


def metric_table(name: str):
    for table in Base.metadata.sorted_tables:
        for m in metrics_of(table):
            if m.name == name and table.name != "checkpoint":
                return table, m
    return None, None


def has_metric(name: str) -> bool:
    return metric_table(name)[0] is not None


def _default(col):
    try:
        t = col.type.python_type
    except NotImplementedError:
        t = str
    return {int: 0, float: 0.0, bool: False, str: "", datetime: datetime(2024, 1, 1)}.get(t, None)


class StoreBuilder:
    """Accumulates rows and writes them in one transaction with ``flush()``."""

    def __init__(self, root):
        self.store = Store.init(root)
        self.rows: dict[str, list[dict]] = {}
        self._jobs = 0
        self._pending: dict[tuple, dict] = {}
        self.add("experiment", id="exp", name="test", spec_toml="", dataset="mnist1d", probe_set_size=0,
                 probe_set_seed=0, probe_set_sha256="", created_at=datetime(2024, 1, 1))

    def add(self, table: str, **values) -> dict:
        self.rows.setdefault(table, []).append(values)
        return values

    def run(self, id: str, *, seed=0, variant="base", kind="parent", epochs=40.0, lr=0.1, batch_size=64,
            model="cnn1d", width=32, patches=1, num_params=8000, adversarial="none", parent_run_id=None,
            parent_checkpoint_id=None, spawn_epoch=None, child_index=None, status="finished", steps_per_epoch=100):
        self.add("experiment_run", experiment_id="exp", run_id=id)
        return self.add(
            "run", id=id, experiment_id="exp", variant=variant, kind=kind, seed=seed, data_seed=seed,
            dataset="mnist1d", train_subset=0, model=model, width=width, depth=3, kernels="5,3,3",
            patches=patches, num_params=num_params, lr=lr, momentum=0.9, weight_decay=0.0,
            batch_size=batch_size, epochs=epochs, lr_drops="", lr_drop_factor=0.1, adversarial=adversarial,
            adv_epsilon=0.0, adv_steps=0, adv_mix=0.0, steps_per_epoch=steps_per_epoch,
            total_steps=int(epochs * steps_per_epoch), parent_run_id=parent_run_id,
            parent_checkpoint_id=parent_checkpoint_id, spawn_step=None, spawn_epoch=spawn_epoch,
            child_index=child_index, status=status, diverged_step=None, diverged_reason=None, config_json="{}")

    def checkpoint(self, run_id: str, epoch: float, *, epochs=40.0, steps_per_epoch=100, lr=0.1,
                   train_loss=1.0, train_error=0.5, test_loss=1.0, test_error=0.5, id=None) -> str:
        step = int(round(epoch * steps_per_epoch))
        cid = id or f"{run_id}@{step}"
        self.add("checkpoint", id=cid, run_id=run_id, step=step, epoch=float(epoch), frac=epoch / epochs,
                 sha256=cid, has_optimizer=False, optimizer_sha256=cid, lr=lr, train_loss=train_loss, train_error=train_error,
                 test_loss=test_loss, test_error=test_error, created_at=datetime(2024, 1, 1))
        return cid

    def metric(self, name: str, anchor: str, value: float, checkpoint_id: str | None = None,
               columns: dict | None = None) -> None:
        """Metric ``name`` landing at checkpoint ``anchor``. Metrics of one table with the same job
        role and anchor share one row (one job), as a probe would write them; ``columns`` fills other
        columns of that row (e.g. the ``points`` of a merge row)."""
        table, m = metric_table(name)
        if table is None:
            raise KeyError(f"no table declares metric {name!r}")
        fixed = tuple((col, text if raw.startswith("'") else float(raw))
                      for col, raw, text in _WHERE_EQ.findall(m.where or ""))
        fixed += tuple((col, "x") for col in _WHERE_NOT_NULL.findall(m.where or ""))  # e.g. a task's name
        key = (table.name, m.role or "self", fixed, anchor, checkpoint_id or anchor)
        self._pending.setdefault(key, {})[m.column] = value
        self._pending[key].update(columns or {})

    def _write_metrics(self) -> None:
        for (tname, role, fixed, anchor, ckpt), values in self._pending.items():
            table = Base.metadata.tables[tname]
            self._jobs += 1
            job = f"job{self._jobs}"
            self.add("probe_job", id=job, probe=tname, version=1, params_hash="h", params_json="{}", role=role,
                     checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=anchor,
                     inputs_json="{}", state="done", attempts=1, error=None, worker="test", device="cpu",
                     started_at=datetime(2024, 1, 1), seconds=0.0)
            row = {c.name: _default(c) for c in table.columns if not c.nullable}
            row.update(job_id=job, idx=0, checkpoint_id=ckpt, other_checkpoint_id=None, anchor_checkpoint_id=anchor)
            row.update(dict(fixed))
            row.update(values)
            self.add(tname, **row)
        self._pending.clear()

    def flush(self) -> Store:
        self._write_metrics()
        with self.store.write() as conn:
            for table in Base.metadata.sorted_tables:  # parents before children (foreign keys)
                rows = self.rows.pop(table.name, [])
                keys = {k for r in rows for k in r}  # executemany needs one set of columns
                rows = [{k: r.get(k) for k in keys} for r in rows]
                # DuckDB checks the self-referencing run.parent_run_id against earlier statements only
                for batch in ([r for r in rows if not r.get("parent_run_id")],
                              [r for r in rows if r.get("parent_run_id")]):
                    if batch:
                        conn.execute(sa.insert(table), batch)
        return self.store


# ------------------------------------------------------------------ a synthetic study
EPOCHS = 40.0
PARENT_EPOCHS = (0, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 36, 40)
SPAWNS = (0, 0.25, 1, 4, 8)
LATE_EXPANSIONS = (12, 16, 20, 24, 32)  # expansions of the linearised model after the last spawn
SEEDS = (0, 1, 2)
LR_DROP = 30


def _lr(epoch):
    return 0.1 if epoch < LR_DROP else 0.01


def _train_loss(epoch):
    """The base parents' train loss: falls from 2.3 to 0.05 (so a large-batch run ending at 0.2 matches the
    checkpoint at ~8 epochs)."""
    import math

    return 0.05 + 2.25 * math.exp(-epoch / 3)


class Frames:
    """Runs, checkpoints and metric rows written once, seen as ``Evidence`` frames or as a real store.

    ``metrics``: (metric, anchor checkpoint id, value, extra columns of the row or None). ``path_points``: the
    ``points`` of the barrier / merge rows (``Evidence.path_points`` and the rows ``write`` makes).
    """

    def __init__(self):
        self.runs: list[dict] = []
        self.checkpoints: list[dict] = []
        self.metrics: list[tuple] = []
        self.path_points: dict[str, int] = {}

    def run(self, id, seed, **kw):
        self.runs.append({"id": id, "seed": seed, **kw})
        return id

    def ckpt(self, run_id, epoch, **kw):
        cid = f"{run_id}@{int(round(epoch * 100))}"
        self.checkpoints.append({"run_id": run_id, "epoch": float(epoch), "id": cid, "lr": _lr(epoch), **kw})
        return cid

    def metric(self, name, anchor, value):
        self.metrics.append((name, anchor, float(value)))

    # ---------------------------------------------------------------- two views of it
    def evidence(self):
        """The frames as ``Evidence`` (every metric, whether or not its table exists yet)."""
        import polars as pl

        from lsdb.query.findings import Evidence

        defaults = {"variant": "base", "kind": "parent", "model": "cnn1d", "width": 32, "patches": 1, "batch_size": 64,
                    "adversarial": "none", "num_params": 8000, "parent_run_id": None, "parent_checkpoint_id": None,
                    "spawn_epoch": None, "child_index": None, "status": "finished", "epochs": EPOCHS, "lr": 0.1,
                    "momentum": 0.9, "weight_decay": 0.0, "steps_per_epoch": 100}  # as StoreBuilder.run writes
        runs = pl.DataFrame([{**defaults, **r} for r in self.runs])
        ck = {c["id"]: c for c in self.checkpoints}
        finals = {}
        for c in self.checkpoints:
            if c["run_id"] not in finals or c["epoch"] > finals[c["run_id"]]["epoch"]:
                finals[c["run_id"]] = c
        finals = pl.DataFrame([{"run_id": r, "epoch": c["epoch"], "frac": c["epoch"] / EPOCHS,
                                "test_error": c.get("test_error", 0.5), "test_loss": 1.0, "train_error": 0.0,
                                "train_loss": c.get("train_loss", 0.1)} for r, c in finals.items()])
        rows = [{"run_id": ck[a]["run_id"], "checkpoint_id": a, "epoch": ck[a]["epoch"],
                 "frac": ck[a]["epoch"] / EPOCHS, "metric": m, "value": float(v)} for m, a, v in self.metrics]
        for col, default in (("lr", None), ("train_loss", 0.1), ("test_error", 0.5)):
            rows += [{"run_id": c["run_id"], "checkpoint_id": c["id"], "epoch": c["epoch"],
                      "frac": c["epoch"] / EPOCHS, "metric": col, "value": float(c.get(col, default))}
                     for c in self.checkpoints]
        return Evidence(runs, finals, pl.DataFrame(rows), "mnist1d", self.path_points)

    def write(self, root) -> tuple[Store, set[str]]:
        """The frames as a real store; returns it and the metrics no table declares yet (left out)."""
        b = StoreBuilder(root)
        for r in self.runs:
            b.run(**r)
        for c in self.checkpoints:
            b.checkpoint(c["run_id"], c["epoch"], id=c["id"], lr=c["lr"], test_error=c.get("test_error", 0.5),
                         train_loss=c.get("train_loss", 0.1), train_error=0.0, test_loss=1.0)
        skipped = set()
        for m, a, v in self.metrics:
            if has_metric(m):
                table = metric_table(m)[0].name
                b.metric(m, a, v, columns={"points": self.path_points[table]} if table in self.path_points else None)
            else:
                skipped.add(m)
        return b.flush(), skipped


class Study(Frames):
    """A small Fort-style study with closed-form metric curves, written once in memory.

    ``holds=True`` draws curves with the shapes F1–F15 expect (fast early change, falling
    barriers, ~C Hessian outliers, ...); ``holds=False`` draws curves that violate each of them.
    ``stable=True`` makes the barrier negligible from spawn 0 (a network stable at init).
    Seeds differ by a factor ``1 + spread * seed`` on most curves (``spread`` = 0.05: every verdict is
    settled; larger values make the seeds disagree).
    """

    def __init__(self, holds: bool = True, stable: bool = False, seeds=SEEDS, spread: float = 0.05):
        import math

        super().__init__()
        exp = math.exp
        self.path_points = {"barrier": 21, "merge": 21}
        for seed in seeds:
            j = 1 + spread * seed  # seeds differ a little
            pid = f"base-s{seed}"
            self._run(pid, seed)
            for k, e in enumerate(PARENT_EPOCHS):
                c = self._ckpt(pid, e, test_error=0.1 if e == 40 else 0.1 + 0.5 * exp(-e),
                               train_loss=_train_loss(e))
                v = (0.05 + exp(-e / 0.5)) * j if holds else 0.05 * j
                if e != 40:
                    delta = PARENT_EPOCHS[k + 1] - e
                    vel = v if e < LR_DROP else 0.01 * j
                    self.metrics.append(("kernel_velocity", c, vel))
                    self.metrics.append(("kernel_distance_next", c, vel * delta))
                    self.metrics.append(("kernel_angular_velocity", c, 10 * vel))
                self.metrics.append(("kernel_distance_to_init", c,
                                     (0.6 * (1 - exp(-e)) + 0.002 * e) * j if holds else 0.01 * e * j))
                self.metrics.append(("hessian_top_eigenvalue", c,
                                     (5 + 20 * e * exp(-e / 4)) * j if holds else (1 + 0.1 * e) * j))
                self.metrics.append(("hessian_trace", c, 10 * (5 + 20 * e * exp(-e / 4)) * j))
                edge = 2 * (1 + 0.9) / _lr(e)  # F10: the threshold 2(1 + β)/η of heavy ball, β = 0.9
                self.metrics.append(("batch_sharpness", c, (edge * (1 - exp(-e / 2)) if holds else 0.3 * edge) * j))
                self.metrics.append(("top_subspace_grad_fraction", c, (0.4 if e < 0.05 * EPOCHS else 0.9)
                                     - 0.2 * spread * seed if holds else 0.4 * j))  # F15
                if e == 40:
                    self.metrics.append(("hessian_outliers", c, 10 if holds else 3))
                    for m in ("sharpness_1d", "adversarial_sharpness", "curvature_1d"):
                        self.metrics.append((m, c, 1.0 * j))
                if e in LATE_EXPANSIONS or e == 40:  # at 40 the linearised model trains 0 steps: = the net
                    self.metrics.append(("linearised_test_error", c, 0.1 if e == 40 else
                                         0.1 + 0.6 * exp(-e / 0.5) if holds else 0.3 + 0.001 * e))
            for s in SPAWNS:
                c = f"{pid}@{int(round(s * 100))}"
                if stable:
                    eb, lb = 0.001, 0.001
                elif holds:
                    eb, lb = 0.3 * exp(-s / 0.5) * j, 2 * exp(-s / 0.5) * j
                else:
                    eb, lb = (0.2 + 0.01 * s) * j, (0.5 + 0.01 * s) * j
                self.metrics += [("error_barrier_test", c, eb), ("loss_barrier_test", c, lb)]
                fall = holds or stable
                # F16: the soup of a spawn's children costs little once spawned late
                self.metrics += [("children_members_test_loss", c, 0.3 * j),
                                 ("children_soup_test_loss", c, 0.3 * j + (0.5 * exp(-s) if fall else 0.2))]
                self.metrics += [
                    ("child_disagreement", c, (0.4 * exp(-s) if fall else 0.1 + 0.02 * s) * j),
                    ("sibling_kernel_distance", c, (0.5 * exp(-s / 2) if fall else 0.1 + 0.03 * s) * j),
                    ("relative_sibling_distance", c, (0.8 * exp(-s / 1.5) if fall else 0.2 + 0.01 * s) * j),
                    ("linearised_test_error", c, 0.1 + 0.6 * exp(-s / 0.5) if holds else 0.3 + 0.001 * s),
                ]
                for k in range(2):
                    cid = f"{pid}-c{s}-{k}"
                    self._run(cid, seed, kind="child", parent_run_id=pid, parent_checkpoint_id=c,
                              spawn_epoch=s, child_index=k)
                    self._ckpt(cid, 40, test_error=0.1)
                lid = f"{pid}-low{s}"
                self._run(lid, seed, kind="lowlr_child", parent_run_id=pid, parent_checkpoint_id=c,
                          spawn_epoch=s, child_index=0, lr=0.01)
                self._ckpt(lid, 40, test_error=0.1 + 0.05 * exp(-s))
            # F17: parents of different seeds disagree on 0.4 of the test set (pairs anchored at the lower seed)
            if seed != seeds[-1]:
                self.metrics.append(("cross_init_disagreement", f"{pid}@4000", 0.4 * j))
            # F18: fine-tunes of the final checkpoint, near-orthogonal and additive (or neither)
            self.metrics += [("task_vector_cosine", f"{pid}@4000", (0.05 if holds else -0.5) * j),
                             ("base_task_error", f"{pid}@4000", 0.3), ("finetune_task_error", f"{pid}@4000", 0.1),
                             ("task_addition_task_error", f"{pid}@4000", 0.15 if holds else 0.35),
                             ("ties_task_error", f"{pid}@4000", 0.14 if holds else 0.3),
                             ("task_addition_normalised_accuracy", f"{pid}@4000", 0.94 if holds else 0.72)]
            # F19: a width sweep of MLPs whose matched barrier falls (holds) or rises with width
            for w, falls, rises in ((8, 0.3, 0.1), (16, 0.2, 0.2), (32, 0.1, 0.3)):
                wid = f"w{w}-s{seed}"
                self._run(wid, seed, variant=f"w{w}", model="mlp", width=w)
                self._ckpt(wid, 0, test_error=0.9, train_loss=2.3)
                c = self._ckpt(wid, 40, test_error=0.12, train_loss=0.05)
                if seed != seeds[-1]:
                    self.metrics += [("matched_loss_barrier_test", c, (falls if holds else rises) * j),
                                     ("cross_init_loss_barrier_test", c, 0.5 * j)]
            # variants: adversarial, large batch, patch networks (from t/T = 0.9 on: converged)
            for name, kw, sharp, lam in (
                ("adversarial", {"adversarial": "pgd"}, 1.0 if holds else 0.5, None),
                ("large_batch", {"batch_size": 512}, 1.5 if holds else 1.0, None),
                ("patch1", {"model": "patchnet", "patches": 1}, None, 10.0),
                ("patch4", {"model": "patchnet", "patches": 4}, None, 7.0 if holds else 10.0),
                ("patch9", {"model": "patchnet", "patches": 9}, None, 5.0 if holds else 10.0),
            ):
                vid = f"{name}-s{seed}"
                self._run(vid, seed, variant=name, **kw)
                self._ckpt(vid, 0, test_error=0.9, train_loss=2.3)
                self._ckpt(vid, 36, test_error=0.12, train_loss=0.051)
                c = self._ckpt(vid, 40, test_error=0.12, train_loss=0.05)
                if sharp is not None:
                    for m in ("sharpness_1d", "adversarial_sharpness", "curvature_1d"):
                        self.metrics.append((m, c, sharp * j))
                if lam is not None:
                    self.metrics.append(("hessian_top_eigenvalue", c, lam * j))

    _run, _ckpt = Frames.run, Frames.ckpt


_STORES: dict[tuple, Store] = {}


def study_store(holds: bool = True) -> Store:
    """The synthetic study written to a real store once per test process (read-only use)."""
    import tempfile

    key = (holds,)
    if key not in _STORES:
        _STORES[key] = Study(holds).write(tempfile.mkdtemp(prefix="lsdb-study-"))[0]
    return _STORES[key]
