"""``slice``: filter-normalised 1D and 2D loss/error surfaces around a checkpoint (Li et al. 2018).

With d₁, d₂ filter-normalised Gaussian directions (``_directions.filter_normalised_direction``,
drawn from ``direction_seed``, so every checkpoint uses the same draws before normalisation):

- dims = 1: the points w + a·d₁ for ``points_1d`` values of a evenly spaced on [range_min, range_max];
- dims = 2: the points w + a·d₁ + b·d₂ on a ``points_2d`` × ``points_2d`` grid of the same range.

At each point the mean cross-entropy and the error are measured on a fixed subset of
``train_subset`` training examples (drawn with ``subset_seed``) and on the first ``test_subset``
test examples (0 = all), one row per point and split. Opt-in; by default only each finished run's
final checkpoint (``which`` = "final"), or every checkpoint (``which`` = "all"). No metrics: the
rows feed line and contour charts.

BatchNorm (``BATCHNORM`` = "recomputed", the ``batchnorm`` column of ``probe_job``): directions are
zero on BatchNorm parameters and buffers, and at every grid point, the centre included, the running
statistics are recomputed from one train-mode pass over the train subset (reset, then a cumulative
average; ``_directions.recompute_bn_stats``) before both splits are evaluated in eval mode, as the
barrier probe does along its path. ``bn_recompute = false`` keeps the checkpoint's statistics at
every point ("running"). A no-op for BatchNorm-free models ("none").
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lsdb.errors import ProbeError, SpecError
from lsdb.spec import MAX_BATCH, MAX_EXAMPLES, MAX_SEED, between, check, one_of, positive

from . import _directions as D
from .base import JobRequest, ProbeContext, Study, each_checkpoint

VERSION = 1
TABLES = ("slice",)
BATCHNORM = "recomputed"  # unless bn_recompute = false


MAX_POINTS_1D = 10_001  # points on a 1D slice
MAX_POINTS_2D = 1_001  # points per side of a 2D slice (about a million grid points)


@dataclass(frozen=True)
class Params:
    which: str = field(default="final", metadata=one_of("final", "all"))
    dims: tuple[int, ...] = field(default=(1, 2), metadata=check(
        lambda v: len(v) > 0 and all(d in (1, 2) for d in v), "must list one or both of 1, 2"))
    points_1d: int = field(default=51, metadata=between(2, MAX_POINTS_1D))
    points_2d: int = field(default=21, metadata=between(2, MAX_POINTS_2D))
    range_min: float = -1.0
    range_max: float = 1.0
    train_subset: int = field(default=1000, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    test_subset: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = the whole split)"))
    subset_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    direction_seed: int = field(default=0, metadata=between(0, MAX_SEED))
    batch_size: int = field(default=1000, metadata=positive(MAX_BATCH))
    mode: str = field(default="auto", metadata=one_of(*D.MODES))
    bn_recompute: bool = True

    @staticmethod
    def cross_check(values: dict) -> tuple[str, str] | None:
        """The slice spans [range_min, range_max]: an empty or reversed range has no points."""
        if not values["range_min"] < values["range_max"]:
            return "range_max", f"must be > range_min = {values['range_min']!r}"
        return None


def plan(study: Study, params: Params) -> list[JobRequest]:
    if params.which == "all":
        return each_checkpoint(study)
    if params.which != "final":
        raise SpecError(f"probes.slice.which = '{params.which}' must be 'final' or 'all'")
    return [JobRequest((r.final.id,), r.final.id) for r in study.runs if r.status == "finished" and r.checkpoints]


def grid_coefficients(dims: int, params: Params) -> torch.Tensor:
    """Rows (1, a) or (1, a, b): the coefficients of w, d₁ (and d₂) at every point, a-major."""
    if dims == 1:
        a = torch.linspace(params.range_min, params.range_max, params.points_1d, dtype=torch.float64)
        return torch.stack([torch.ones_like(a), a], dim=1)
    if dims == 2:
        t = torch.linspace(params.range_min, params.range_max, params.points_2d, dtype=torch.float64)
        a, b = torch.meshgrid(t, t, indexing="ij")
        return torch.stack([torch.ones(a.numel(), dtype=torch.float64), a.reshape(-1), b.reshape(-1)], dim=1)
    raise SpecError(f"probes.slice.dims: {dims} must be 1 or 2")


def compute(ctx: ProbeContext, params: Params) -> dict[str, list[dict]]:
    if not params.dims:
        raise ProbeError("probes.slice.dims is empty; give [1], [2] or [1, 2]")
    model = ctx.model
    state = D.prepare_state(model, ctx.states[0], ctx.device, ctx.dtype)
    floats, fixed = D.split_float(state)
    data = ctx.data
    tr = D.fixed_subset(data.x_train.shape[0], params.train_subset, params.subset_seed, ctx.device)
    n_test = data.x_test.shape[0] if params.test_subset <= 0 else min(params.test_subset, data.x_test.shape[0])
    splits = {"train": (data.x_train[tr], data.y_train[tr]), "test": (data.x_test[:n_test], data.y_test[:n_test])}

    x0, y0 = splits["train"]
    stats = x0 if params.bn_recompute else None
    centre = D.evaluate_points(model, [floats], torch.ones(1, 1, dtype=torch.float64), fixed, x0, y0,
                               bn_stats=stats, batch_size=params.batch_size, mode=params.mode)
    D.require_finite(centre.loss)  # a diverged checkpoint; far points that overflow are kept as they are

    gen = torch.Generator().manual_seed(params.direction_seed)
    d1 = D.filter_normalised_direction(model, floats, gen)
    d2 = D.filter_normalised_direction(model, floats, gen)
    rows = []
    for dims in sorted(set(params.dims)):
        coeffs = grid_coefficients(dims, params)
        basis = [floats, d1] if dims == 1 else [floats, d1, d2]
        for split, (x, y) in splits.items():
            ev = D.evaluate_points(model, basis, coeffs, fixed, x, y, bn_stats=stats,
                                   batch_size=params.batch_size, mode=params.mode)
            for c, loss, err in zip(coeffs, ev.loss.tolist(), ev.error.tolist()):
                rows.append({"dims": dims, "a": float(c[1]), "b": float(c[2]) if dims == 2 else None,
                             "split": split, "loss": loss, "error": err})
    return {"slice": rows}
