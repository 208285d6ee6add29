"""lsdb: a declarative experiment database for loss-landscape research.

    import lsdb
    db = lsdb.open("lsdb-store")
    db.sql("SELECT metric, count(*) FROM metric_series GROUP BY metric")
"""

from lsdb._version import __version__  # noqa: F401


def open(store=None):  # noqa: A001 - mirrors the builtin on purpose: lsdb.open(path)
    """Open a store for queries; returns an ``lsdb.query.Session``."""
    from lsdb.query.session import Session

    return Session.open(store)


def __getattr__(name):  # lazy, so `import lsdb` stays light
    if name == "Recorder":
        from lsdb.ingest.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'lsdb' has no attribute {name!r}")
