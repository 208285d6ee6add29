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


def run(spec, store=None, *, workers: int = 1, device: str | None = None, progress=None, probes: bool = True,
        executor: str | None = None, address: str | None = None, gpus_per_job: float | None = None,
        path=()):
    """The Python twin of ``lsdb run``: train and probe everything ``spec`` (a path or a parsed
    ``Spec``) declares that ``store`` lacks; returns the ``RunSummary`` (check ``.ok``).

    ``path``: folders holding the modules of the spec's model or data factory. The other
    arguments are ``lsdb.runner.run``'s (``executor``: "inline", "process" or "ray")."""
    from lsdb import runner
    from lsdb.plan import load_spec
    from lsdb.spec import Spec
    from lsdb.store import Store, resolve_store_path
    from lsdb.train.factories import add_import_path

    add_import_path(*map(str, path))
    sp = spec if isinstance(spec, Spec) else load_spec(spec)
    return runner.run(sp, Store(resolve_store_path(store)), workers=workers, device=device, progress=progress,
                      probes=probes, executor=executor, address=address, gpus_per_job=gpus_per_job)


def __getattr__(name):  # lazy, so `import lsdb` stays light
    if name == "Recorder":
        from lsdb.ingest.recorder import Recorder

        return Recorder
    raise AttributeError(f"module 'lsdb' has no attribute {name!r}")
