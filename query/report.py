"""One self-contained HTML page: the findings table and every chart that has data.

    lsdb findings --report report.html
    from lsdb.query.report import report; report(lsdb.open("lsdb-store"), "report.html")

The page needs no network: Vega, Vega-Lite and vega-embed are inlined once (from vl-convert's
bundle) and each chart's Vega-Lite spec is embedded as JSON and drawn as SVG. When every chart
has drawn, the page sets ``document.body.dataset.rendered`` to the number drawn (tests wait on it).
"""

from __future__ import annotations

import html
import json
from datetime import datetime, timezone
from pathlib import Path

from lsdb.query.charts import NoChartData, build, vega_bundle

# The page is PAGE_WIDTH px wide at most; a chart's plot area is narrower by its axis labels
# and legend (up to about 250 px), so the whole chart fills the column without scrolling.
PAGE_WIDTH = 1100
CHART_WIDTH = 800

#: (chart name or metric list, heading, caption for a newcomer)
SECTIONS = [
    (["test_error", "train_loss"], "Training curves",
     "Test error and training loss of every parent run against training time (log scale). Thin lines are "
     "single runs (seeds); the thick line is the mean over seeds and the band ± one standard deviation."),
    ("barrier", "Error and loss barriers vs spawn time (F1, F14)",
     "Children are copies of a parent network taken at a spawn time and trained on with different data "
     "order. The barrier is how much worse the straight-line average of two children is than the children "
     "themselves. When it drops to about zero, the children end in the same linearly connected basin: "
     "the basin was fixed by that spawn time."),
    ("spawn", "Every spawn-indexed measure (F2, F8)",
     "Barriers, prediction disagreement, kernel and weight distances between sibling children, each at "
     "the spawn time of the children. Fort et al. report that these fall together."),
    ("kernel_velocity", "Kernel velocity (F3)",
     "How fast the empirical neural tangent kernel changes: kernel distance between consecutive "
     "checkpoints divided by the time between them. Fort et al.: fast early, then roughly constant."),
    ("kernel_accuracy", "Kernel accuracy vs expansion time (F5–F7)",
     "Test error of the network linearised around the weights at time t and then trained (a kernel "
     "method with the tangent kernel of time t). The dashed line is the fully trained network's final "
     "error; the low-lr child line is a nonlinear network trained gently from the same point."),
    ("transition", "Transition times",
     "For each measure, the time where its fast early change gives way to slow drift (a three-segment "
     "fit in log-time; bars show an approximate 95% interval). Fort et al. claim these coincide."),
    ("correlation", "How the measures move together",
     "Spearman correlation over training time between every pair of measures, combined across runs "
     "(Fisher z). Red: rise and fall together; blue: one rises as the other falls. Measures that move "
     "together (either way) are placed next to each other; hover over a cell for its r and sample count."),
    ("hessian_spectrum", "Hessian spectrum (F9, F10)",
     "The largest eigenvalues of the loss Hessian at a few checkpoints. A few large outliers (about one "
     "per class) above a bulk near zero is the expected picture."),
    ("slice_2d_variants", "2D loss surfaces side by side (F11)",
     "The 2D loss surface of one network of each variant (e.g. standard, FGSM- and PGD-trained) on one colour "
     "scale: a wider dark region is a flatter minimum. F11 compares their flatness at matched clean accuracy."),
    ("soup", "Weight averages: soups against members and ensembles (F16)",
     "The test loss of the average of several networks' weights (uniform and greedy soups) next to the "
     "networks themselves and to averaging their outputs (ensemble), for the children of each spawn, "
     "children spawned late, and networks of different seeds (naively averaged and after weight "
     "matching). Networks in one basin average well; networks of different seeds do not."),
    ("task_arithmetic", "Task arithmetic (F18)",
     "Fine-tunes of one base network on different tasks, added back to it: the base plus λ times the sum of "
     "their weight changes (or their TIES-merge). Error on each task's own test examples and on the whole "
     "test split; λ = 0 is the base. A λ picked from this chart is picked on test data."),
    ("merge_width", "Barrier between seeds vs width (F14, F19)",
     "The loss barrier on the straight line between two networks of different seeds, before and after "
     "permuting one network's hidden units to match the other's (weight matching). Wider networks leave "
     "a smaller barrier after matching."),
    ("slice_1d", "1D loss slice", "Loss along a random filter-normalised direction through the final weights "
     "(Li et al. 2018): a wider valley means a flatter minimum."),
    ("slice_2d", "2D loss surface", "Loss on a plane spanned by two filter-normalised directions through the "
     "final weights; colour is log loss."),
]

VERDICT_CLASS = {"holds": "holds", "does not hold": "fails", "inconclusive": "inc", "not measured": "nm"}


def report(session, out, only: list[str] | None = None) -> Path:
    """Write the report to ``out`` and return its path."""
    from lsdb.query.findings import findings_results

    results = findings_results(session, only)
    charts, skipped = [], []
    for what, heading, caption in SECTIONS:
        try:
            spec = build(session, what, width=CHART_WIDTH).to_dict()
        except NoChartData as e:
            skipped.append((heading, str(e)))
            continue
        charts.append((heading, caption, spec))
    page = _page(session, results, charts, skipped)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def _summary(session) -> str:
    runs = session.sql("SELECT variant, kind, count(*) AS n FROM run GROUP BY ALL ORDER BY variant, kind")
    ck = session.sql("SELECT count(*) AS n FROM checkpoint")["n"][0]
    metrics = session.metrics()
    parts = ", ".join(f"{n} {k} run{'s' if n != 1 else ''} of variant <b>{html.escape(v)}</b>"
                      for v, k, n in runs.iter_rows())
    return (f"<p>This store holds {parts or 'no runs'}; {ck} checkpoints; {metrics.height} measured quantities "
            f"({', '.join(html.escape(m) for m in metrics['metric'].to_list())}).</p>")


def _findings_table(results) -> str:
    rows = []
    for r in results:
        rows.append(
            f"<tr class='{VERDICT_CLASS.get(r.verdict, 'nm')}'><td>{r.id}</td><td><b>{html.escape(r.title)}</b>"
            f"<div class='small'>{html.escape(r.metric)}</div></td><td class='verdict'>{html.escape(r.label)}</td>"
            f"<td>{html.escape(r.measured) or '—'}</td><td class='small'>{html.escape(r.expected)}</td>"
            f"<td class='small'>{html.escape(r.detail)}</td></tr>")
    return ("<table class='findings'><thead><tr><th>id</th><th>finding (metric)</th><th>verdict</th>"
            "<th>measured (seed mean ± std)</th><th>expected</th><th>notes</th></tr></thead><tbody>"
            + "".join(rows) + "</tbody></table>")


def _page(session, results, charts, skipped) -> str:
    from lsdb._version import __version__

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    blocks = "".join(
        f"<section><h3>{html.escape(h)}</h3><p class='caption'>{html.escape(c)}</p>"
        f"<div class='chart' id='chart{i}'></div></section>" for i, (h, c, _) in enumerate(charts))
    not_drawn = "".join(f"<li>{html.escape(h)}: {html.escape(why)}</li>" for h, why in skipped)
    specs = json.dumps([spec for _, _, spec in charts]).replace("</", "<\\/")
    counts = {v: sum(r.verdict == v for r in results) for v in VERDICT_CLASS}
    embed = (
        "const specs = JSON.parse(document.getElementById('specs').textContent);\n"
        "Promise.all(specs.map((s, i) => vegaEmbed('#chart' + i, s, {renderer: 'svg', actions: false})))\n"
        "  .then(r => { document.body.dataset.rendered = String(r.length); })\n"
        "  .catch(e => { document.body.dataset.failed = String(e); console.error(e); });\n")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>lsdb findings report</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: {PAGE_WIDTH}px; margin: 2em auto; padding: 0 1em; color: #222; }}
h1 {{ margin-bottom: 0.2em; }} .small {{ font-size: 0.85em; color: #555; }} .caption {{ max-width: 60em; }}
table.findings {{ border-collapse: collapse; width: 100%; font-size: 0.92em; }}
table.findings td, table.findings th {{ border: 1px solid #ccc; padding: 0.35em 0.5em; vertical-align: top; text-align: left; }}
tr.holds td.verdict {{ background: #d8f0d8; }} tr.fails td.verdict {{ background: #f6d5d5; }}
tr.nm td.verdict {{ background: #eee; color: #666; }} tr.inc td.verdict {{ background: #fdf0c8; }} section {{ margin: 2em 0; }}
</style></head>
<body data-charts="{len(charts)}">
<h1>Loss-landscape findings</h1>
<p class="small">Generated by lsdb {__version__} on {when} from the store <code>{html.escape(str(session.store.root))}</code>.</p>
<h2>What this page is</h2>
<p>lsdb trained the networks declared in an experiment spec, saved checkpoints along training, and
measured each checkpoint with probes (loss and error, weight distances, the neural tangent kernel,
barriers between networks, Hessian eigenvalues, flatness). Below, each published finding about how
training shapes the loss landscape is checked against those measurements. "holds" and "does not hold"
use thresholds fixed in advance (<code>lsdb.query.thresholds</code>); "inconclusive" means the seeds'
spread or a bootstrap interval straddles the threshold, too few seeds were measured, or a stated
precondition failed; "not measured" says what to add to the spec (each finding's test:
<code>docs/findings.md</code> in the lsdb repository). Numbers are means ± standard deviation over seeds (independent parent runs); error is a
fraction (0.01 = one percentage point); time is in epochs, or as t/T, a fraction of training.</p>
{_summary(session)}
<h2>Findings</h2>
<p>{counts['holds']} hold, {counts['does not hold']} do not hold, {counts['inconclusive']} inconclusive,
{counts['not measured']} not measured.</p>
{_findings_table(results)}
<h2>Charts</h2>
{blocks or '<p>No chart has data yet.</p>'}
{f'<h3>Not drawn (no data)</h3><ul class="small">{not_drawn}</ul>' if not_drawn else ''}
<p class="small">Reproduce: <code>lsdb findings --store {html.escape(str(session.store.root))} --report report.html</code>;
explore: <code>lsdb sql "SELECT * FROM metric_series LIMIT 10"</code>, <code>lsdb correlate</code>, <code>lsdb chart --name NAME</code>.</p>
<script type="application/json" id="specs">{specs}</script>
<script type="module">{vega_bundle()}</script>
<script type="module">{embed}</script>
</body></html>
"""
