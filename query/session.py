"""``lsdb.open(store)`` → a ``Session``: the Python twin of the read commands of the CLI."""

from __future__ import annotations

from lsdb.errors import QueryError
from lsdb.store import Store

_READ_ONLY_TYPES = {"SELECT", "EXPLAIN", "PRAGMA", "SET", "VARIABLE_SET"}


class Session:
    """Read-only access to a store. Every method opens the database briefly, so a running
    ``lsdb run`` can still ingest between calls."""

    def __init__(self, store: Store):
        self.store = store

    @classmethod
    def open(cls, store=None) -> "Session":
        return cls(store if isinstance(store, Store) else Store.open(store))

    # ------------------------------------------------------------------------------- SQL
    def sql(self, query: str, params: list | None = None):
        """Run a read-only query; returns a polars DataFrame."""
        import duckdb

        with self.store.read() as con:
            _refuse_writes(con, query)
            try:
                return con.execute(query, params or []).pl()
            except duckdb.Error as e:
                raise QueryError(_first_line(e)) from None

    def sql_batches(self, query: str, batch_rows: int = 100_000):
        """Stream a large result as Arrow record batches (the CLI uses this for big exports)."""
        import duckdb

        with self.store.read() as con:
            _refuse_writes(con, query)
            try:
                reader = con.execute(query).to_arrow_reader(batch_rows)
            except duckdb.Error as e:
                raise QueryError(_first_line(e)) from None
            yield from reader

    # ------------------------------------------------------------------------- overview
    def runs(self):
        return self.sql(RUNS_SQL)

    def show(self, run_id: str):
        """One run: its hyperparameters (a one-row frame) and its checkpoints."""
        runs = self.sql("SELECT * FROM run WHERE id = ? OR id LIKE ? || '%'", [run_id, run_id])
        if runs.height == 0:
            raise QueryError(f"no run '{run_id}' in {self.store.root}; list runs with: lsdb runs")
        if runs.height > 1:
            raise QueryError(f"run prefix '{run_id}' is ambiguous ({runs.height} runs); give more characters")
        rid = runs["id"][0]
        checkpoints = self.sql(
            "SELECT id, step, epoch, frac, train_loss, train_error, test_loss, test_error, lr "
            "FROM checkpoint WHERE run_id = ? ORDER BY step", [rid])
        return runs, checkpoints

    def metrics(self):
        return self.sql("SELECT metric, count(*) AS n, count(DISTINCT run_id) AS runs "
                        "FROM metric_series GROUP BY metric ORDER BY metric")

    # --------------------------------------------------------------------- analysis twins
    def correlate(self, *args, **kwargs):
        from lsdb.query.correlate import correlate

        return correlate(self, *args, **kwargs)

    def transition(self, *args, **kwargs):
        from lsdb.query.transition import transition

        return transition(self, *args, **kwargs)

    def findings(self, *args, **kwargs):
        from lsdb.query.findings import findings

        return findings(self, *args, **kwargs)

    def report(self, out, **kwargs):
        from lsdb.query.report import report

        return report(self, out, **kwargs)

    def chart(self, *args, **kwargs):
        from lsdb.query.charts import chart

        return chart(self, *args, **kwargs)


RUNS_SQL = """
SELECT r.id, r.variant, r.kind, r.seed, r.model, r.width, r.lr, r.batch_size, r.epochs,
       r.spawn_epoch, r.child_index, r.status, count(c.id) AS checkpoints,
       arg_max(c.test_error, c.step) AS final_test_error
FROM run r LEFT JOIN checkpoint c ON c.run_id = r.id
GROUP BY ALL ORDER BY r.variant, r.seed, r.kind DESC, r.spawn_epoch NULLS FIRST, r.child_index NULLS FIRST
"""


def _refuse_writes(con, query: str) -> None:
    import duckdb

    try:
        statements = con.extract_statements(query)
    except duckdb.Error as e:
        raise QueryError(_first_line(e)) from None
    for st in statements:
        kind = str(st.type).split(".")[-1]
        if kind not in _READ_ONLY_TYPES:
            raise QueryError(f"lsdb sql is read-only: {kind} statements are refused; "
                             f"change the store through a spec and lsdb run")


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0]
