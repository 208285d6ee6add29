"""Query layer: SQL over the store, correlate, transition, findings, charts and reports.

Every function returns a polars DataFrame (or an Altair chart) so notebooks and the CLI share it.
"""


def correlate(session, *args, **kwargs):
    """``lsdb correlate``: see ``lsdb.query.correlate.correlate``."""
    from lsdb.query.correlate import correlate as _correlate

    return _correlate(session, *args, **kwargs)


def transition(session, *args, **kwargs):
    """``lsdb transition``: see ``lsdb.query.transition.transition``."""
    from lsdb.query.transition import transition as _transition

    return _transition(session, *args, **kwargs)


def findings(session, *args, **kwargs):
    """``lsdb findings``: see ``lsdb.query.findings.findings``."""
    from lsdb.query.findings import findings as _findings

    return _findings(session, *args, **kwargs)


def chart(session, *args, **kwargs):
    """``lsdb chart``: see ``lsdb.query.charts.chart``."""
    from lsdb.query.charts import chart as _chart

    return _chart(session, *args, **kwargs)
