"""Altair charts over a store, by name or by metric.

    import lsdb
    db = lsdb.open("lsdb-store")
    db.chart(["test_error", "kernel_velocity"], out="metrics.html")    # metric vs time, seed band
    db.chart(["test_error"], x="kernel_velocity", out="tradeoff.pdf")  # one metric against another
    db.chart("barrier", out="barrier.svg")                              # a named chart (CHARTS)

Data is aggregated in DuckDB (``load_series`` averages per checkpoint) and polars (seed mean ±
std per variant and time) before it reaches Altair, so specs stay small. Time axes are
log-scaled on epoch + LOG_TIME_OFFSET so that epoch 0 shows (TIME_TITLE says so in words) and
end at the data's first and last time, not at the next power of ten. With ``x=METRIC`` each
point is one (run, checkpoint) that has both metrics, joined per checkpoint, a line per run in
time order. Every chart takes a ``width`` in pixels (the report passes a page-wide one); axis
titles are set once per view and legends label numbers with a short format.

``save`` writes ``.html`` (self-contained, Vega JS inlined, works offline), ``.svg``, ``.png``,
``.pdf`` (all three via vl-convert) and ``.json`` (the Vega-Lite spec).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable

from lsdb.errors import QueryError
from lsdb.query.correlate import check_metrics, load_series, resolve_runs
from lsdb.query.thresholds import LOG_TIME_OFFSET

WIDTH, HEIGHT = 420, 220  # a chart on its own; the report passes a wider width
TIME_TITLE = f"epoch (log scale; epoch 0 drawn at {LOG_TIME_OFFSET:g})"
SPAWN_METRICS = ("error_barrier_test", "loss_barrier_test", "entezari_loss_barrier_test", "child_disagreement",
                 "sibling_kernel_distance", "relative_sibling_distance", "sibling_weight_distance",
                 "kernel_distance_spawn_to_final")
FORMATS = (".html", ".svg", ".png", ".pdf", ".json")
# Heatmap cells: below CELL_MIN px the metric names on the axes (font 10) overlap; the r values
# are printed in the cells only from TEXT_CELL px, where "-0.9" at font 9 fits.
CELL_MIN, CELL_MAX, TEXT_CELL = 14, 40, 26
LEGEND_FORMAT = ".3~g"  # d3 format: 3 significant digits, no trailing zeros (0.3, 12, 0.05)
SOLID_LEGEND = {"symbolOpacity": 1}  # a legend merged from faint layers (bands, run lines) would be faint


class NoChartData(QueryError):
    """The store has nothing to draw for this chart (yet)."""


def _alt():
    import altair as alt

    return alt


def _time_x(field: str = "t", title: str = TIME_TITLE, domain=None, padding: int = 0):
    """A log time axis. nice=False and the data's extent as domain: a nice log scale rounds its end
    up to the next power of ten, which drew a 20-epoch run out to 100 epochs. Layers share one
    scale, so pass every layer the same title (different ones are joined into one long title).
    ``padding`` (px) keeps point marks at the first and last time off the plot's edges."""
    alt = _alt()
    extra = {"domain": list(domain)} if domain else {}
    if padding:
        extra["padding"] = padding
    return alt.X(f"{field}:Q", scale=alt.Scale(type="log", nice=False, **extra), title=title)


def _extent(*columns):
    """(min, max) of the positive values in some polars columns, for a log axis; None if none."""
    values = [v for col in columns for v in col.drop_nulls().to_list() if v > 0]
    return (min(values), max(values)) if values else None


def _height(width: int) -> int:
    return max(HEIGHT, round(width * 0.35))  # wide report charts get taller too, not flatter


def _square(width: int) -> int:
    return min(width, max(300, width // 2))


def _parents(session, runs):
    ids = resolve_runs(session, runs)
    if ids is None:
        ids = session.sql("SELECT id FROM run WHERE kind = 'parent' ORDER BY id")["id"].to_list()
    return ids


def _series(session, metrics, runs):
    import polars as pl

    df = load_series(session, metrics, _parents(session, runs))
    if df.height == 0:
        raise NoChartData(f"no rows of {', '.join(metrics)} in this store")
    return df.with_columns((pl.col("epoch") + LOG_TIME_OFFSET).alias("t"))


def _band(df):
    """Seed mean ± std per (variant, metric, time)."""
    import polars as pl

    return (df.group_by("variant", "metric", pl.col("epoch").round(9).alias("epoch"))
            .agg(pl.col("value").mean().alias("mean"), pl.col("value").std().fill_null(0).alias("std"),
                 pl.len().alias("seeds"))
            .with_columns((pl.col("epoch") + LOG_TIME_OFFSET).alias("t"), (pl.col("mean") - pl.col("std")).alias("lo"),
                          (pl.col("mean") + pl.col("std")).alias("hi"))
            .sort("variant", "metric", "epoch"))


def metric_chart(session, metrics: list[str], runs=None, points: bool = False, width: int = WIDTH):
    """Each metric vs time: one thin line per run, the seed mean as a thick line, ± std as a band."""
    import polars as pl

    alt = _alt()
    check_metrics(session, metrics)
    df = _series(session, metrics, runs)
    band = _band(df)
    panels = []
    for m in metrics:
        d, b = df.filter(pl.col("metric") == m), band.filter(pl.col("metric") == m)
        if d.height == 0:
            continue
        x = _time_x(domain=_extent(d["t"]))
        color = alt.Color("variant:N", title="variant", legend=SOLID_LEGEND)
        area = alt.Chart(b).mark_area(opacity=0.2).encode(x, alt.Y("lo:Q", title=m), alt.Y2("hi:Q"), color)
        mean = alt.Chart(b).mark_line(point=points, strokeWidth=2.5).encode(
            x, alt.Y("mean:Q", title=m), color,
            tooltip=["variant", "epoch", alt.Tooltip("mean:Q", format=".4g"), alt.Tooltip("std:Q", format=".3g"),
                     "seeds"])
        lines = alt.Chart(d).mark_line(opacity=0.35, strokeWidth=1).encode(
            x, alt.Y("value:Q", title=m), color, detail="run_id:N",
            tooltip=["run_id", "seed", "epoch", alt.Tooltip("value:Q", format=".4g")])
        panels.append(alt.layer(area, lines, mean).properties(width=width, height=_height(width), title=m))
    return alt.vconcat(*panels) if len(panels) > 1 else panels[0]


def xy_chart(session, metrics: list[str], x: str, runs=None, width: int = WIDTH):
    """Each metric against metric ``x``: one point per (run, checkpoint) where both were measured
    (each averaged per checkpoint, as ``load_series`` does), a line per run in time order."""
    import polars as pl

    alt = _alt()
    try:
        check_metrics(session, [*metrics, x])
    except QueryError as e:
        raise QueryError(f"{e} (see: lsdb metrics)") from None
    df = load_series(session, [*metrics, x], _parents(session, runs))
    xs = df.filter(pl.col("metric") == x).select("run_id", "checkpoint_id", pl.col("value").alias("x"))
    panels = []
    for m in metrics:
        d = df.filter(pl.col("metric") == m).join(xs, on=["run_id", "checkpoint_id"]).sort("run_id", "epoch")
        if d.height == 0:
            raise NoChartData(f"no checkpoint has both {m} and {x}, so there is nothing to pair "
                              "(see which metrics have rows: lsdb metrics)")
        base = alt.Chart(d).encode(
            alt.X("x:Q", title=x, scale=alt.Scale(zero=False)), alt.Y("value:Q", title=m, scale=alt.Scale(zero=False)),
            alt.Color("variant:N", title="variant", legend=SOLID_LEGEND), detail="run_id:N", order="epoch:Q",
            tooltip=["run_id", "seed", "epoch", alt.Tooltip("x:Q", title=x, format=".4g"),
                     alt.Tooltip("value:Q", title=m, format=".4g")])
        panels.append((base.mark_line(opacity=0.35, strokeWidth=1) + base.mark_point(filled=True, size=30))
                      .properties(width=width, height=_height(width),
                                  title=f"{m} against {x} (a point per checkpoint, a line per run)"))
    return alt.vconcat(*panels) if len(panels) > 1 else panels[0]


def spawn_chart(session, runs=None, metrics=SPAWN_METRICS, width: int = WIDTH):
    """Every spawn-indexed metric (barriers, disagreement, sibling distances) vs spawn time."""
    have = set(session.sql("SELECT DISTINCT metric FROM metric_series")["metric"].to_list())
    present = [m for m in metrics if m in have]
    if not present:
        raise NoChartData("no spawn-indexed metrics (add [probes.barrier] and [spawn] times to the spec)")
    return metric_chart(session, present, runs, points=True, width=width).properties(
        title="Spawn-indexed measures vs spawn time (children spawned from the parent at that time)")


def barrier_chart(session, runs=None, width: int = WIDTH):
    return spawn_chart(session, runs, ("error_barrier_test", "loss_barrier_test"), width=width)


def kernel_velocity_chart(session, runs=None, width: int = WIDTH):
    _need(session, "kernel_velocity", "ntk_distance")
    return metric_chart(session, ["kernel_velocity"], runs, width=width)


def correlation_chart(session, runs=None, method: str = "spearman", width: int = WIDTH):
    """Heatmap of the pooled (Fisher-z) correlation between every pair of metrics over time."""
    import polars as pl

    from lsdb.query.correlate import correlate

    df = correlate(session, None, runs, by="pooled", method=method)
    df = df.filter(pl.col("r").is_not_nan() & pl.col("r").is_not_null())
    if df.height == 0:
        raise NoChartData("no pair of metrics with enough aligned samples to correlate")
    return correlation_heatmap(df, method, width)


def correlation_heatmap(pairs, method: str = "spearman", width: int = WIDTH):
    """Heatmap of ``pairs`` (columns metric_a, metric_b, r, n; each pair once).

    At 50 metrics a sorted grid with a number in every cell is unreadable. We keep every metric
    (dropping some would hide exactly the pair a reader looks for) and instead order them by
    hierarchical clustering on 1 - |r|, so measures that move together, in either direction, form
    blocks along the diagonal; cells shrink to fit ``width`` but not below CELL_MIN, and the r values
    are printed only while a cell is at least TEXT_CELL wide (the tooltip always has them)."""
    import polars as pl

    alt = _alt()
    flipped = pairs.select(pl.col("metric_b").alias("metric_a"), pl.col("metric_a").alias("metric_b"), "r", "n")
    both = pl.concat([pairs.select("metric_a", "metric_b", "r", "n"), flipped])
    names = cluster_order(both)
    diag = pl.DataFrame({"metric_a": names, "metric_b": names, "r": [1.0] * len(names), "n": [None] * len(names)},
                        schema=both.schema)
    data = pl.concat([both, diag])
    base = alt.Chart(data).encode(alt.X("metric_a:N", title=None, sort=names, axis=alt.Axis(labelAngle=-45)),
                                  alt.Y("metric_b:N", title=None, sort=names))
    rect = base.mark_rect().encode(
        alt.Color("r:Q", scale=alt.Scale(domain=[-1, 1], scheme="redblue", reverse=True), title=f"{method} r"),
        tooltip=["metric_a", "metric_b", alt.Tooltip("r:Q", format=".2f"), "n"])
    cell = heatmap_cell(len(names), width)
    layers = [rect]
    if cell >= TEXT_CELL:
        layers.append(base.mark_text(fontSize=9).encode(alt.Text("r:Q", format=".1f")))
    order = ", metrics clustered by |r|" if len(names) > 3 else ""
    return alt.layer(*layers).properties(
        width=cell * len(names), height=cell * len(names),
        title=f"Pooled {method} correlation over training time (Fisher-z across runs){order}")


def heatmap_cell(n: int, width: int) -> int:
    """Side of one heatmap cell in px: the grid fills about ``width``, within CELL_MIN..CELL_MAX."""
    return max(CELL_MIN, min(CELL_MAX, width // max(n, 1)))


def cluster_order(pairs) -> list[str]:
    """Metric names ordered by average-linkage clustering on the distance 1 - |r| (a missing pair
    counts as uncorrelated), leaves in optimal order; three or fewer metrics stay sorted."""
    import numpy as np

    names = sorted(set(pairs["metric_a"]) | set(pairs["metric_b"]))
    if len(names) <= 3:
        return names
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    index = {m: i for i, m in enumerate(names)}
    dist = np.ones((len(names), len(names)))
    for a, b, r in pairs.select("metric_a", "metric_b", "r").iter_rows():
        if r is not None and np.isfinite(r):
            dist[index[a], index[b]] = dist[index[b], index[a]] = 1 - min(abs(r), 1.0)
    np.fill_diagonal(dist, 0)
    tree = linkage(squareform(dist, checks=False), method="average", optimal_ordering=True)
    return [names[i] for i in leaves_list(tree)]


def transition_chart(session, runs=None, metrics=None, width: int = WIDTH):
    """Transition time (end of the fast phase) of each metric, per run, with its interval."""
    import polars as pl

    from lsdb.query.transition import transition

    alt = _alt()
    df = transition(session, metrics, runs, summary=False).filter(pl.col("shape") == "fast→slow")
    if df.height == 0:
        raise NoChartData("no metric with a fast-then-slow shape and enough checkpoints")
    df = df.with_columns(*(pl.col(c) + LOG_TIME_OFFSET for c in ("t_break", "t_low", "t_high")),
                         pl.col("seed").cast(pl.Utf8))
    title, domain = f"end of the fast phase, {TIME_TITLE}", _extent(df["t_low"], df["t_break"], df["t_high"])
    base = alt.Chart(df).encode(alt.Y("metric:N", title=None), alt.Color("seed:N", title="seed", legend=SOLID_LEGEND))
    bars = base.mark_rule(opacity=0.5).encode(_time_x("t_low", title, domain, padding=12), alt.X2("t_high:Q"))
    pts = base.mark_point(filled=True, size=50).encode(
        _time_x("t_break", title, domain, padding=12),
        tooltip=["metric", "run_id", alt.Tooltip("t_break:Q", format=".3g"), alt.Tooltip("frac_break:Q", format=".2f")])
    return (bars + pts).properties(width=width, height=max(120, 16 * df["metric"].n_unique()),
                                   title="Transition times (three-segment fit in log-time; bars: 95% profile interval)")


def hessian_spectrum_chart(session, runs=None, max_checkpoints: int = 6, width: int = WIDTH):
    """Top-k Hessian eigenvalues by rank at up to ``max_checkpoints`` checkpoints of one parent run."""
    import polars as pl

    alt = _alt()
    _need_table(session, "hessian_eigenvalue", "hessian")
    ids = _parents(session, runs)
    df = session.sql(
        "SELECT c.run_id, c.epoch, e.rank, avg(e.value) AS value FROM hessian_eigenvalue e "
        "JOIN probe_job j ON j.id = e.job_id JOIN checkpoint c ON c.id = e.checkpoint_id "
        f"WHERE j.state = 'done' AND c.run_id IN ({', '.join('?' * len(ids))}) "
        "GROUP BY c.run_id, c.epoch, e.rank ORDER BY c.run_id, c.epoch, e.rank", ids) if ids else None
    if df is None or df.height == 0:
        raise NoChartData("no Hessian eigenvalues (add [probes.hessian] to the spec)")
    run = df["run_id"][0]
    df = df.filter(pl.col("run_id") == run)
    epochs = sorted(set(df["epoch"].to_list()))
    step = max(1, len(epochs) // max_checkpoints)
    keep = set(epochs[::step][: max_checkpoints - 1] + [epochs[-1]])
    df = df.filter(pl.col("epoch").is_in(list(keep)))
    # epochs are floats summed from steps (0.30000000000000004): the legend prints them short
    return alt.Chart(df).mark_line(point=True).encode(
        alt.X("rank:O", title="rank (1 = largest)"),
        alt.Y("value:Q", scale=alt.Scale(type="symlog"), title="eigenvalue (symlog)"),
        alt.Color("epoch:O", scale=alt.Scale(scheme="viridis"), title="epoch", legend=alt.Legend(format=LEGEND_FORMAT)),
        tooltip=[alt.Tooltip("epoch:Q", format=LEGEND_FORMAT), "rank", alt.Tooltip("value:Q", format=".4g")],
    ).properties(width=width, height=_height(width), title=f"Hessian spectrum (top-k), run {run[:12]}")


def merge_width_chart(session, runs=None, width: int = WIDTH):
    """Test-loss barrier between parents of different seeds against model width, before and after
    weight matching (``merge`` probe): a point per pair, the mean per width as a line."""
    import polars as pl

    alt = _alt()
    _need_table(session, "merge", "merge")
    df = session.sql(
        "SELECT r.model, r.width, r.variant, m.naive_loss_barrier_test AS naive, m.matched_loss_barrier_test AS matched "
        "FROM merge m JOIN probe_job j ON j.id = m.job_id JOIN checkpoint c ON c.id = m.anchor_checkpoint_id "
        "JOIN run r ON r.id = c.run_id WHERE j.state = 'done'")
    if df.height == 0:
        raise NoChartData("no merge rows (add [probes.merge] and ≥ 2 seeds to the spec)")
    long = df.unpivot(["naive", "matched"], index=["model", "width", "variant"], variable_name="path",
                      value_name="barrier").with_columns(pl.col("path").replace({"naive": "naive", "matched": "weight-matched"}))
    mean = long.group_by("model", "width", "path").agg(pl.col("barrier").mean()).sort("width")
    x = alt.X("width:Q", scale=alt.Scale(type="log", nice=False), title="model width (channels or units; log)")
    y = alt.Y("barrier:Q", title="test-loss barrier between seeds")
    color = alt.Color("path:N", title="path")
    points = alt.Chart(long).mark_point(opacity=0.5).encode(x, y, color, tooltip=["variant", "width", "path",
                                                                                   alt.Tooltip("barrier:Q", format=".4g")])
    lines = alt.Chart(mean).mark_line().encode(x, y, color, alt.Detail("model:N"))
    return (points + lines).properties(width=width, height=_height(width),
                                       title="Barrier between seeds vs width, before and after weight matching")


def task_arithmetic_chart(session, runs=None, width: int = WIDTH):
    """Task arithmetic against λ (``task_arithmetic`` probe): the merged network's error on the
    tasks' own test examples (mean over tasks and bases) and on the whole test split, for plain
    addition and TIES-merging; λ = 0 is the base."""
    import polars as pl

    alt = _alt()
    _need_table(session, "task_arithmetic", "task_arithmetic")
    df = session.sql(
        "SELECT t.method, t.lam, CASE WHEN t.finetune IS NULL THEN 'whole test split' ELSE 'each task (mean)' END "
        "AS evaluated_on, avg(t.error) AS error FROM task_arithmetic t JOIN probe_job j ON j.id = t.job_id "
        "WHERE j.state = 'done' GROUP BY ALL ORDER BY t.method, t.lam")
    if df.height == 0:
        raise NoChartData("no task arithmetic rows (declare [finetunes.NAME] and add [probes.task_arithmetic])")
    df = df.with_columns(pl.col("method").replace({"sum": "addition", "ties": "TIES"}))
    return alt.Chart(df).mark_line(point=True).encode(
        alt.X("lam:Q", title="λ (w_base + λ·merged task vector; 0 = the base)"),
        alt.Y("error:Q", title="test error"),
        alt.Color("method:N", title="merge"),
        alt.StrokeDash("evaluated_on:N", title="evaluated on"),
        tooltip=["method", "evaluated_on", "lam", alt.Tooltip("error:Q", format=".4g")],
    ).properties(width=width, height=_height(width), title="Task arithmetic: error against λ")


#: soup rows drawn per group, in order: (column, label)
SOUP_BARS = (("members_mean_test_loss", "members (mean)"), ("best_member_test_loss", "best member"),
             ("uniform_test_loss", "uniform soup"), ("greedy_test_loss", "greedy soup"),
             ("ensemble_test_loss", "ensemble (mean logits)"), ("matched_uniform_test_loss", "weight-matched soup"))


def soup_chart(session, runs=None, width: int = WIDTH):
    """Test loss of each soup group's members, best member, uniform and greedy soups, ensemble and
    (for different seeds) weight-matched soup: the mean over groups of one kind (``soup`` probe)."""
    import polars as pl

    alt = _alt()
    _need_table(session, "soup", "soup")
    cols = ", ".join(f"avg(s.{c}) AS {c}" for c, _ in SOUP_BARS)
    df = session.sql(f"SELECT j.role AS groups, count(*) AS n, {cols} FROM soup s JOIN probe_job j ON j.id = s.job_id "
                     "WHERE j.state = 'done' GROUP BY j.role ORDER BY j.role")
    if df.height == 0:
        raise NoChartData("no soup rows (add [probes.soup] to the spec)")
    labels = dict(SOUP_BARS)
    long = (df.unpivot([c for c, _ in SOUP_BARS], index=["groups", "n"], variable_name="model", value_name="test_loss")
            .drop_nulls("test_loss").with_columns(pl.col("model").replace(labels)))
    return alt.Chart(long).mark_bar().encode(
        alt.X("model:N", sort=[label for _, label in SOUP_BARS], title=None),
        alt.Y("test_loss:Q", title="test loss (report half)"),
        alt.Color("model:N", sort=[label for _, label in SOUP_BARS], legend=None),
        alt.Column("groups:N", title="groups (mean over groups)"),
        tooltip=["groups", "n", "model", alt.Tooltip("test_loss:Q", format=".4g")],
    ).properties(width=max(120, width // max(1, df.height) - 20), height=_height(width),
                 title="Weight averages against their members and their ensemble"
                 ).resolve_scale(y="independent")  # naive soups of different seeds are 10× worse


def _slice_frame(session, runs, dims: int):
    _need_table(session, "slice", "slice")
    ids = _parents(session, runs)
    if not ids:
        raise NoChartData("no runs")
    df = session.sql(
        "WITH s AS (SELECT t.*, c.run_id, c.epoch, c.step FROM slice t JOIN probe_job j ON j.id = t.job_id "
        f"JOIN checkpoint c ON c.id = t.checkpoint_id WHERE j.state = 'done' AND t.dims = {dims} "
        f"AND c.run_id IN ({', '.join('?' * len(ids))})), "
        "pick AS (SELECT run_id, checkpoint_id FROM s ORDER BY run_id, step DESC LIMIT 1) "
        "SELECT s.run_id, s.epoch, s.split, s.a, s.b, avg(s.loss) AS loss, avg(s.error) AS error "
        "FROM s JOIN pick USING (checkpoint_id) GROUP BY ALL ORDER BY s.split, s.a, s.b", ids)
    if df.height == 0:
        raise NoChartData(f"no {dims}D loss slices (add [probes.slice] to the spec)")
    return df


def slice_1d_chart(session, runs=None, width: int = WIDTH):
    """Filter-normalised 1D loss slice L(w + a·d) around the latest sliced checkpoint."""
    alt = _alt()
    df = _slice_frame(session, runs, 1)
    return alt.Chart(df).mark_line(point=True).encode(
        alt.X("a:Q", title="a (filter-normalised direction)"), alt.Y("loss:Q", title="loss"), alt.Color("split:N"),
        tooltip=["split", "a", alt.Tooltip("loss:Q", format=".4g"), alt.Tooltip("error:Q", format=".3f")],
    ).properties(width=width, height=_height(width),
                 title=f"1D loss slice, run {df['run_id'][0][:12]} at epoch {df['epoch'][0]:g}")


def slice_2d_chart(session, runs=None, split: str | None = None, width: int = WIDTH):
    """Filter-normalised 2D loss surface L(w + a·d₁ + b·d₂) as a heatmap (log colour)."""
    import polars as pl

    alt = _alt()
    df = _slice_frame(session, runs, 2)
    split = split or ("test" if "test" in set(df["split"]) else df["split"][0])
    df = df.filter(pl.col("split") == split).with_columns(pl.col("a").round(6), pl.col("b").round(6))
    return alt.Chart(df).mark_rect().encode(
        alt.X("a:O", title="a (direction 1)", axis=alt.Axis(labelOverlap=True, format=".2f")),
        alt.Y("b:O", title="b (direction 2)", sort="descending", axis=alt.Axis(labelOverlap=True, format=".2f")),
        alt.Color("loss:Q", scale=alt.Scale(type="log", scheme="viridis"), title=f"{split} loss"),
        tooltip=["a", "b", alt.Tooltip("loss:Q", format=".4g"), alt.Tooltip("error:Q", format=".3f")],
    ).properties(width=_square(width), height=_square(width),
                 title=f"2D loss surface ({split}), run {df['run_id'][0][:12]} at epoch {df['epoch'][0]:g}")


def slice_2d_variants_chart(session, runs=None, split: str | None = None, width: int = WIDTH):
    """The 2D loss surface of every variant side by side on one colour scale (F11: standard and
    adversarially trained nets): per variant, its lowest-seed parent's latest sliced checkpoint."""
    import polars as pl

    alt = _alt()
    _need_table(session, "slice", "slice")
    df = session.sql(
        "WITH s AS (SELECT t.*, c.run_id, c.epoch, c.step, r.variant, r.seed FROM slice t "
        "JOIN probe_job j ON j.id = t.job_id JOIN checkpoint c ON c.id = t.checkpoint_id JOIN run r ON r.id = c.run_id "
        "WHERE j.state = 'done' AND t.dims = 2 AND r.kind = 'parent'), "
        "pick AS (SELECT variant, arg_min(checkpoint_id, seed * 1e12 - step) AS checkpoint_id FROM s GROUP BY variant) "
        "SELECT s.variant, s.run_id, s.epoch, s.split, s.a, s.b, avg(s.loss) AS loss FROM s JOIN pick USING "
        "(variant, checkpoint_id) GROUP BY ALL ORDER BY s.variant, s.split, s.a, s.b")
    if df.height == 0 or df["variant"].n_unique() < 2:
        raise NoChartData("needs 2D loss slices of at least two variants (add [probes.slice] and variants)")
    split = split or ("test" if "test" in set(df["split"]) else df["split"][0])
    df = df.filter(pl.col("split") == split).with_columns(pl.col("a").round(6), pl.col("b").round(6))
    variants = df["variant"].unique(maintain_order=True).to_list()
    side = max(140, min(_square(width), width // len(variants) - 60))
    lo, hi = float(df["loss"].min()), float(df["loss"].max())
    color = alt.Color("loss:Q", scale=alt.Scale(type="log", scheme="viridis", domain=[lo, hi]), title=f"{split} loss",
                      legend=alt.Legend(format=LEGEND_FORMAT))
    panels = []
    for i, v in enumerate(variants):  # one view per variant (a facet would repeat the axis titles in one view)
        part = df.filter(pl.col("variant") == v)
        panels.append(alt.Chart(part).mark_rect().encode(
            alt.X("a:O", title="a (direction 1)", axis=alt.Axis(labelOverlap=True, format=".2f")),
            alt.Y("b:O", title="b (direction 2)" if i == 0 else None, sort="descending",
                  axis=alt.Axis(labelOverlap=True, format=".2f")),
            color, tooltip=["variant", "a", "b", alt.Tooltip("loss:Q", format=".4g")],
        ).properties(width=side, height=side, title=f"{v} (epoch {part['epoch'][0]:g})"))
    return alt.hconcat(*panels).resolve_scale(color="shared").properties(
        title=f"2D loss surfaces ({split}) by variant, one colour scale")


def kernel_accuracy_chart(session, runs=None, width: int = WIDTH):
    """Linearised-model (and kernel-regression) test error vs expansion time, with the low-lr
    children's final error at the same spawn times and the full network's final test error as a
    dashed reference line."""
    import polars as pl

    alt = _alt()
    have = set(session.sql("SELECT DISTINCT metric FROM metric_series")["metric"].to_list())
    metrics = [m for m in ("linearised_test_error", "kernel_regression_test_error") if m in have]
    if not metrics:
        raise NoChartData("no kernel accuracy (add [probes.kernel_accuracy] to the spec)")
    ids = _parents(session, runs)
    df = _band(_series(session, metrics, ids))
    lowlr = session.sql(
        "SELECT r.variant, 'low-lr child (final)' AS metric, p.epoch, avg(f.test_error) AS mean, "
        "coalesce(stddev_samp(f.test_error), 0) AS std, count(*) AS seeds "
        "FROM run r JOIN checkpoint p ON p.id = r.parent_checkpoint_id "
        "JOIN (SELECT run_id, arg_max(test_error, step) AS test_error FROM checkpoint GROUP BY run_id) f "
        f"ON f.run_id = r.id WHERE r.kind = 'lowlr_child' AND r.parent_run_id IN ({', '.join('?' * len(ids))}) "
        "GROUP BY ALL", ids)
    if lowlr.height:
        lowlr = lowlr.with_columns((pl.col("epoch") + LOG_TIME_OFFSET).alias("t"),
                                   (pl.col("mean") - pl.col("std")).alias("lo"),
                                   (pl.col("mean") + pl.col("std")).alias("hi"))
        df = pl.concat([df, lowlr.select(df.columns).cast(df.schema)])
    # the reference is the final error of the same parents whose kernels were measured (not
    # other variants, e.g. patch networks, that have no kernel accuracy)
    final = session.sql(
        "SELECT avg(e) AS final FROM (SELECT arg_max(test_error, step) AS e FROM checkpoint "
        f"WHERE run_id IN ({', '.join('?' * len(ids))}) AND run_id IN (SELECT DISTINCT run_id FROM metric_series "
        "WHERE metric IN ('linearised_test_error', 'kernel_regression_test_error')) GROUP BY run_id)", ids)
    color = alt.Color("metric:N", title="model")
    x = _time_x(title=f"expansion / spawn time, {TIME_TITLE}", domain=_extent(df["t"]))
    lines = alt.Chart(df).mark_line(point=True).encode(
        x, alt.Y("mean:Q", title="test error"), color, strokeDash=alt.StrokeDash("variant:N"),
        tooltip=["metric", "variant", "epoch", alt.Tooltip("mean:Q", format=".3f"), "seeds"])
    band = alt.Chart(df).mark_area(opacity=0.15).encode(x, alt.Y("lo:Q", title="test error"), alt.Y2("hi:Q"), color,
                                                        detail="variant:N")
    layers = [band, lines]
    if final.height and final["final"][0] is not None:
        ref = pl.DataFrame({"final": [float(final["final"][0])], "label": ["full network, final test error"]})
        layers.append(alt.Chart(ref).mark_rule(strokeDash=[6, 4], color="black").encode(
            alt.Y("final:Q"), tooltip=["label", alt.Tooltip("final:Q", format=".3f")]))
        layers.append(alt.Chart(ref).mark_text(align="left", dx=4, dy=-6, fontSize=10).encode(
            alt.Y("final:Q"), text="label:N", x=alt.value(0)))
    return alt.layer(*layers).properties(width=width, height=_height(width),
                                         title="Kernel accuracy: test error of the model linearised at time t")


def _need(session, metric: str, probe: str) -> None:
    if session.sql("SELECT count(*) AS n FROM metric_series WHERE metric = ?", [metric])["n"][0] == 0:
        raise NoChartData(f"no {metric} in this store (add [probes.{probe}] to the spec)")


def _need_table(session, table: str, probe: str) -> None:
    n = session.sql("SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = ?", [table])["n"][0]
    if n == 0:
        raise NoChartData(f"no table {table} in this store (add [probes.{probe}] to the spec)")


#: Named charts: ``lsdb chart --name NAME`` and the report use these.
CHARTS: dict[str, Callable] = {
    "barrier": barrier_chart,
    "spawn": spawn_chart,
    "kernel_velocity": kernel_velocity_chart,
    "kernel_accuracy": kernel_accuracy_chart,
    "correlation": correlation_chart,
    "transition": transition_chart,
    "hessian_spectrum": hessian_spectrum_chart,
    "slice_1d": slice_1d_chart,
    "slice_2d": slice_2d_chart,
    "slice_2d_variants": slice_2d_variants_chart,
    "merge_width": merge_width_chart,
    "soup": soup_chart,
    "task_arithmetic": task_arithmetic_chart,
}


def build(session, what, runs=None, x: str | None = None, width: int = WIDTH):
    """An Altair chart: ``what`` is a chart name from CHARTS, a metric name, or a list of metrics,
    drawn against time, or against metric ``x`` when given (then ``what`` is always metrics)."""
    if isinstance(what, str):
        if what in CHARTS and x is None:
            return CHARTS[what](session, runs, width=width)
        what = [what]
    if not what:
        raise QueryError(f"name a chart ({', '.join(CHARTS)}) or one or more metrics")
    if x is not None:
        return xy_chart(session, list(what), x, runs, width=width)
    return metric_chart(session, list(what), runs, width=width)


def save(chart, out) -> Path:
    """Write ``chart`` as .html (self-contained, offline), .svg, .png, .pdf or .json by suffix."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in FORMATS:
        raise QueryError(f"cannot write a chart as '{suffix or out.name}'; use one of {', '.join(FORMATS)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".html":
        out.write_text(html_page(chart.to_dict(), title=out.stem), encoding="utf-8")
    elif suffix == ".json":
        out.write_text(chart.to_json())
    else:
        chart.save(str(out), format=suffix[1:])
    return out


@functools.lru_cache(maxsize=1)
def vega_bundle() -> str:
    """Vega, Vega-Lite and vega-embed as one JS module (from vl-convert; no network). It takes
    seconds to assemble, so it is built once per process."""
    import vl_convert as vlc

    return vlc.javascript_bundle()


def html_page(spec: dict, title: str = "lsdb chart") -> str:
    """A self-contained page drawing one Vega-Lite spec as SVG. When drawn, ``body[data-rendered]``
    is set (tests wait on it); on failure ``body[data-failed]`` holds the error."""
    import html
    import json

    data = json.dumps(spec).replace("</", "<\\/")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title></head>"
            f"<body><div id='chart'></div><script type='application/json' id='spec'>{data}</script>"
            f"<script type='module'>{vega_bundle()}</script><script type='module'>"
            "vegaEmbed('#chart', JSON.parse(document.getElementById('spec').textContent), "
            "{renderer: 'svg', actions: false}).then(() => { document.body.dataset.rendered = '1'; })"
            ".catch(e => { document.body.dataset.failed = String(e); console.error(e); });"
            "</script></body></html>\n")


def chart(session, what, runs=None, out=None, x: str | None = None, width: int = WIDTH):
    """Build a chart (see ``build``) and, when ``out`` is given, save it there. Returns the chart.

    ``chart(session, ["test_error"], x="kernel_velocity", out="f.pdf")`` plots test error against
    kernel velocity, a point per (run, checkpoint)."""
    c = build(session, what, runs, x=x, width=width)
    if out is not None:
        save(c, out)
    return c
