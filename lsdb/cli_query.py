"""Query commands of the CLI: correlate, transition, findings, chart, determinism.

Each command parses options, opens the store, makes one library call (``lsdb.query.*``) and
prints with ``emit``. ``register(app)`` adds them to the main Typer app.
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from lsdb.cli_common import ExperimentOpt, Format, FormatOpt, OutOpt, StoreOpt, VariantOpt, emit


class By(str, enum.Enum):
    run = "run"
    seed = "seed"
    pooled = "pooled"


class Method(str, enum.Enum):
    spearman = "spearman"
    pearson = "pearson"
    kendall = "kendall"


class Align(str, enum.Enum):
    nearest = "nearest"
    interp = "interp"


MetricsArg = Annotated[Optional[list[str]], typer.Argument(
    help="Metric names as in metric_series (list them with: lsdb metrics).", show_default=False)]
RunsOpt = Annotated[Optional[list[str]], typer.Option(
    "--runs", "-r", help="Only these runs: ids or id prefixes, comma-separated or repeated (see: lsdb runs).",
    show_default=False)]


def _split(values: list[str] | None) -> list[str] | None:
    out = [v.strip() for item in values or [] for v in item.split(",") if v.strip()]
    return out or None


def _session(store, experiment=None, variant=None):
    """The session an aggregating command reads: scoped to the experiment chosen, or to the
    store's only one (several without a choice is an error naming them)."""
    from lsdb.query.session import Session

    return Session.open(store, experiment, variant).for_analysis()


def correlate(
    metrics: MetricsArg = None,
    runs: RunsOpt = None,
    by: Annotated[By, typer.Option(help="One correlation per run, per (variant, seed), or only the pooled summary.")] = By.run,
    method: Annotated[Method, typer.Option(help=(
        "Correlation coefficient. p_value is exact up to 8 pairs (a permutation test over all n! "
        "pairings: 1/3, not 0, for a perfect r of 3 pairs), scipy's asymptotic p above (never below "
        "1/n!), null under 3 pairs; the pooled p combines the groups' p-values (weighted "
        "Stouffer)."))] = Method.spearman,
    lag: Annotated[int, typer.Option(help="Pair a[i] with b[i+LAG] on the aligned grid (positive: does B follow A?).")] = 0,
    since: Annotated[Optional[float], typer.Option(help="Only times at or after this epoch.")] = None,
    until: Annotated[Optional[float], typer.Option(help="Only times at or before this epoch.")] = None,
    align: Annotated[Align, typer.Option(help="Nearest checkpoint or linear interpolation, in log(epoch).")] = Align.nearest,
    bootstrap: Annotated[int, typer.Option(help="Bootstrap resamples for the intervals (0: Fisher-z intervals).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    store: StoreOpt = None,
    experiment: ExperimentOpt = None,
    variant: VariantOpt = None,
    format: FormatOpt = Format.table,
    out: OutOpt = None,
):
    """Correlate metrics over training time, per run and pooled across runs.

    With two or more METRICs every pair is correlated; with none, every pair of metrics in the
    store. Rows with scope 'run' (or 'seed') hold one correlation each, with n aligned samples and
    a 95% interval; the 'pooled' row combines them (Fisher z; r_mean ± r_std across runs).
    Metrics sampled at different checkpoints are aligned by the rule printed first.

    Example: lsdb correlate kernel_velocity test_loss --by seed --method kendall
    """
    from lsdb.query.correlate import alignment_rule
    from lsdb.query.correlate import correlate as run

    df = run(_session(store, experiment, variant), _split(metrics), _split(runs), by=by.value, method=method.value, lag=lag,
             since=since, until=until, align=align.value, bootstrap=bootstrap, seed=seed)
    typer.echo(f"alignment: {alignment_rule(align.value)}", err=True)
    emit(df.drop("align") if format == Format.table else df, format, out)


def transition(
    metrics: MetricsArg = None,
    runs: RunsOpt = None,
    store: StoreOpt = None,
    experiment: ExperimentOpt = None,
    variant: VariantOpt = None,
    format: FormatOpt = Format.table,
    out: OutOpt = None,
):
    """When each metric's fast early phase gives way to its slow late phase.

    A three-segment least-squares fit in log-time per metric and run; t_break is where the
    steepest segment ends (epochs, with an approximate 95% interval t_low..t_high), frac_break
    the same as a fraction of training. 'pooled' rows average over runs. Default: every metric
    of every parent run. Fort et al. (2020) claim these times coincide across measures.

    Example: lsdb transition test_error kernel_distance_to_init error_barrier_test
    """
    from lsdb.query.transition import METHOD
    from lsdb.query.transition import transition as run

    df = run(_session(store, experiment, variant), _split(metrics), _split(runs))
    typer.echo(f"method: {METHOD}", err=True)
    emit(df, format, out)


def findings(
    only: Annotated[Optional[str], typer.Option(help="Only these findings, e.g. F1,F3.", show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option(
        help="Also write a self-contained HTML report (findings table and every chart) to this file.",
        show_default=False)] = None,
    store: StoreOpt = None,
    experiment: ExperimentOpt = None,
    variant: VariantOpt = None,
    format: FormatOpt = Format.table,
    out: OutOpt = None,
):
    """Check the published findings F1–F19 against the store.

    Each finding prints the measured numbers (seed mean ± std), the expected shape and a verdict:
    holds, does not hold, inconclusive (the spread straddles the threshold, too few seeds, or a
    precondition failed), or not measured (with what to add to the spec). Thresholds are fixed in
    lsdb.query.thresholds; docs/findings.md gives each finding's source, test and thresholds.

    Example: lsdb findings --only F1,F3 --report report.html
    """
    from lsdb.query.findings import as_text, findings_results, to_frame

    session = _session(store, experiment, variant)
    ids = _split([only]) if only else None
    results = findings_results(session, ids)
    if format == Format.table and out is None:
        typer.echo(as_text(results))  # long cells: a block per finding reads better than a grid
    else:
        emit(to_frame(results), format, out)
    if report is not None:
        from lsdb.query.report import report as write_report

        path = write_report(session, report, ids)
        typer.echo(f"report: {path}", err=True)


def chart(
    metrics: MetricsArg = None,
    name: Annotated[Optional[str], typer.Option(
        "--name", "-n", help="A named chart instead of metrics: barrier, spawn, kernel_velocity, kernel_accuracy, "
        "correlation, transition, hessian_spectrum, slice_1d, slice_2d.", show_default=False)] = None,
    x: Annotated[Optional[str], typer.Option(
        "--x", help="Draw the METRICs against this metric instead of time: a point per (run, checkpoint) "
        "that has both, a line per run.", metavar="METRIC", show_default=False)] = None,
    runs: RunsOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output file: .html (offline), .svg, .png, .pdf or .json.",
                                      show_default=False)] = ...,
    store: StoreOpt = None,
    experiment: ExperimentOpt = None,
    variant: VariantOpt = None,
):
    """Draw METRICs against training time (seed mean ± std band, log time axis), against another
    metric (--x), or a named chart.

    Examples: lsdb chart test_error kernel_velocity --out curves.html
              lsdb chart test_error --x kernel_velocity --out tradeoff.pdf
              lsdb chart --name barrier --out barrier.svg
    """
    from lsdb.errors import QueryError
    from lsdb.query.charts import CHARTS
    from lsdb.query.charts import chart as draw

    what = _split(metrics)
    if name and x:
        raise QueryError("--x draws metrics against a metric; give METRICs, not --name")
    if name and what:
        raise QueryError("give either metrics or --name, not both")
    if name and name not in CHARTS:
        raise QueryError(f"unknown chart '{name}'; valid: {', '.join(CHARTS)}")
    if not name and not what:
        raise QueryError(f"name one or more metrics (see: lsdb metrics) or a chart with --name ({', '.join(CHARTS)})")
    draw(_session(store, experiment, variant), name or what, _split(runs), out=out, x=x)
    typer.echo(f"wrote {out}", err=True)


def determinism(
    pooled: Annotated[bool, typer.Option("--pooled", help="One row per source, variant and spawn time: the pairs' means.")] = False,
    store: StoreOpt = None,
    experiment: ExperimentOpt = None,
    variant: VariantOpt = None,
    format: FormatOpt = Format.table,
    out: OutOpt = None,
):
    """How much the end point depends on the data order versus the initialisation.

    One row per pair of final checkpoints: 'data order' pairs are two children of one spawn (same
    start, different data order), 'initialisation' pairs two parents of different seeds. Side by
    side: prediction disagreement, weight distance, loss and error barrier on the straight path,
    and the distance between the final NTKs. A measure not taken is empty: the initialisation
    barrier needs [probes.barrier] cross_init = true, kernel distances [probes.ntk] on final
    checkpoints and [probes.ntk_distance] roles "siblings" and "cross_init".

    Example: lsdb determinism --pooled
    """
    from lsdb.query.session import Session

    emit(Session.open(store, experiment, variant).determinism(pooled=pooled), format, out)


def register(app: typer.Typer) -> None:
    """Add the query commands to ``app``."""
    for fn in (correlate, transition, findings, chart, determinism):
        app.command()(fn)
