"""lsdb: a declarative experiment database for loss-landscape research.

    import lsdb
    db = lsdb.open("lsdb-store")
    db.sql("SELECT metric, count(*) FROM metric_series GROUP BY metric")
"""

from lsdb._version import __version__  # noqa: F401


def open(store=None, experiment: str | None = None, variant: str | None = None):  # noqa: A001 - mirrors the builtin
    """Open a store for queries; returns an ``lsdb.query.Session``.

    ``store``: a store directory (default ``$LSDB_STORE``, else ``./lsdb-store``).
    ``experiment``: see only this experiment (its name, or an id prefix of an earlier version of
    an edited spec); ``variant``: only this variant of it. Without them ``sql``, ``runs`` and
    ``metrics`` see the whole store, and ``correlate``, ``transition``, ``findings``, ``chart``
    and ``report`` use the store's only experiment or ask for the choice.

        db = lsdb.open("lsdb-store", experiment="quick")
        db.findings()
    """
    from lsdb.query.session import Session

    return Session.open(store, experiment, variant)


def __getattr__(name):  # lazy, so `import lsdb` stays light
    if name == "Recorder":
        from lsdb.ingest.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'lsdb' has no attribute {name!r}")
