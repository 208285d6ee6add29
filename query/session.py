"""``lsdb.open(store)`` → a ``Session``: the Python twin of the read commands of the CLI.

A session can be scoped to one experiment (and one of its variants): every query it runs then
sees only that experiment's runs, their checkpoints, jobs and results. The scope is a set of temporary views with the tables' own names on
the query's connection, so the same SQL serves a whole store and one experiment.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from lsdb.errors import QueryError
from lsdb.store import Store


@dataclass(frozen=True)
class Scope:
    """One experiment (its most recent version by default) and optionally one variant."""

    experiment_id: str
    name: str
    variant: str | None
    run_ids: tuple[str, ...]


class Session:
    """Read-only access to a store, whole or scoped to one experiment.

    Every method opens the database briefly, so a running ``lsdb run`` can still ingest between
    calls. Open one with ``lsdb.open(store, experiment=None, variant=None)``."""

    def __init__(self, store: Store, scope: Scope | None = None):
        self.store = store
        self.scope = scope

    @classmethod
    def open(cls, store=None, experiment: str | None = None, variant: str | None = None) -> "Session":
        """Open ``store`` (a path, a ``Store``, or None for ``$LSDB_STORE`` / ``./lsdb-store``).

        ``experiment`` (a name, or an id prefix for an earlier version of an edited spec) and
        ``variant`` scope every query; unknown names raise ``QueryError`` listing the valid ones."""
        session = cls(store if isinstance(store, Store) else Store.open(store))
        return session.within(experiment, variant) if experiment or variant else session

    # ------------------------------------------------------------------------ scoping
    def experiments(self):
        """Every experiment recorded in the store: name, id, data set, runs it declares, when it
        was recorded, and whether it is the current (most recent) version of its name."""
        return Session(self.store).sql(EXPERIMENTS_SQL)

    def within(self, experiment: str | None = None, variant: str | None = None) -> "Session":
        """A session that sees only ``experiment`` (default: the only one in the store) and, if
        given, only its runs of ``variant``."""
        exps = Session(self.store).sql(EXPERIMENTS_SQL)
        if exps.height == 0:
            raise QueryError(f"store {self.store.root} holds no experiment yet; run one with: lsdb run SPEC")
        return self._scoped(exps, experiment, variant)

    def _scoped(self, exps, experiment: str | None, variant: str | None) -> "Session":
        whole = Session(self.store)
        if experiment is None and self.scope is not None:
            row = exps.filter(exps["id"] == self.scope.experiment_id).row(0, named=True)
        else:
            row = _pick_experiment(exps, experiment, self.store.root)
        links = whole.sql("SELECT l.run_id, r.variant FROM experiment_run l JOIN run r ON r.id = l.run_id "
                          "WHERE l.experiment_id = ? ORDER BY l.run_id", [row["id"]])
        if variant is not None:
            have = sorted(set(links["variant"].to_list()))
            if variant not in have:
                raise QueryError(f"experiment {row['name']} has no variant '{variant}'; its variants: "
                                 f"{', '.join(have) or '(none)'}")
            links = links.filter(links["variant"] == variant)
        return Session(self.store, Scope(row["id"], row["name"], variant, tuple(links["run_id"].to_list())))

    def for_analysis(self) -> "Session":
        """This session if it is scoped; else scoped to the store's only experiment. Pooling runs
        of different experiments (data sets, models) into one finding or chart is never what a
        researcher means, so a store with several asks for the choice."""
        if self.scope is not None:
            return self
        exps = Session(self.store).sql(EXPERIMENTS_SQL)
        return self._scoped(exps, None, None) if exps.height else self

    # ------------------------------------------------------------------------------- SQL
    def sql(self, query: str, params: list | None = None, *, allow_files: bool = False):
        """Run a read-only query; returns a polars DataFrame.

        The query is checked statement by statement with DuckDB's own parser (see
        ``check_read_only``) and runs on a connection that cannot touch files, load extensions or
        change settings. ``allow_files=True`` lets it read local files (``read_csv``,
        ``read_parquet``, ...); writing stays refused. In a scoped session the tables and views
        hold only the experiment's rows."""
        import duckdb

        with self.store.read(untrusted=True, allow_files=allow_files) as con:
            check_read_only(con, query)
            self._narrow(con)
            try:
                return con.execute(query, params or []).pl()
            except duckdb.Error as e:
                raise QueryError(_error_line(e)) from None

    def sql_batches(self, query: str, batch_rows: int = 100_000, *, allow_files: bool = False):
        """Stream a large result as Arrow record batches (the CLI uses this for big exports);
        checked and scoped like ``sql``."""
        import duckdb

        with self.store.read(untrusted=True, allow_files=allow_files) as con:
            check_read_only(con, query)
            self._narrow(con)
            try:
                reader = con.execute(query).to_arrow_reader(batch_rows)
            except duckdb.Error as e:
                raise QueryError(_error_line(e)) from None
            empty = True
            for batch in reader:
                empty = False
                yield batch
            if empty:  # an empty result still has columns: the caller writes a header-only file
                import pyarrow as pa

                yield pa.RecordBatch.from_pylist([], schema=reader.schema)

    def _narrow(self, con) -> None:
        """Shadow the store's tables with views of the scope's rows (temporary objects come first
        in DuckDB's name lookup; the views read the originals through the database's own name)."""
        if self.scope is None:
            return
        from lsdb.schema import result_tables

        db = '"' + con.execute("SELECT current_database()").fetchone()[0].replace('"', '""') + '"'
        con.execute("CREATE TEMP TABLE lsdb_scope_run AS SELECT unnest(?::VARCHAR[]) AS run_id",
                    [list(self.scope.run_ids)])
        con.execute("CREATE TEMP TABLE lsdb_scope_experiment AS SELECT ?::VARCHAR AS id", [self.scope.experiment_id])
        # table names below are the schema's own, never input
        views = {
            "experiment": f"SELECT * FROM {db}.main.experiment WHERE id IN (SELECT id FROM lsdb_scope_experiment)",
            "experiment_run": f"SELECT * FROM {db}.main.experiment_run WHERE run_id IN "
                              f"(SELECT run_id FROM lsdb_scope_run) AND experiment_id IN (SELECT id FROM lsdb_scope_experiment)",
            "run": f"SELECT * FROM {db}.main.run WHERE id IN (SELECT run_id FROM lsdb_scope_run)",
            "checkpoint": f"SELECT * FROM {db}.main.checkpoint WHERE run_id IN (SELECT run_id FROM lsdb_scope_run)",
            "probe_job": f"SELECT * FROM {db}.main.probe_job WHERE checkpoint_id IN (SELECT id FROM checkpoint)",
        }
        for name in result_tables():
            views[name] = f'SELECT * FROM {db}.main."{name}" WHERE job_id IN (SELECT id FROM probe_job)'
        for name, body in views.items():
            con.execute(f'CREATE TEMP VIEW "{name}" AS {body}')

    # ------------------------------------------------------------------------- overview
    def runs(self):
        """Every run (one row per experiment that declares it): experiment, variant, kind, seed,
        data set, model and hyperparameters, status, checkpoints stored and final test error."""
        return self.sql(RUNS_SQL)

    def show(self, run_id: str):
        """One run: its hyperparameters (a one-row frame) and its checkpoints. ``run_id`` may be
        a unique prefix."""
        runs = self.sql("SELECT * FROM run WHERE id = ? OR id LIKE ? || '%'", [run_id, run_id])
        if runs.height == 0:
            raise QueryError(f"no run '{run_id}' in {self._where()}; list runs with: lsdb runs")
        if runs.height > 1:
            raise QueryError(f"run prefix '{run_id}' is ambiguous ({runs.height} runs); give more characters")
        rid = runs["id"][0]
        checkpoints = self.sql(
            "SELECT id, step, epoch, frac, train_loss, train_error, test_loss, test_error, lr "
            "FROM checkpoint WHERE run_id = ? ORDER BY step", [rid])
        return runs, checkpoints

    def metrics(self):
        """Every metric with rows: its name, where it comes from (the trainer or a probe's table),
        what it measures when two names look alike, how many values and runs."""
        import polars as pl

        from lsdb.schema import metric_sources

        counts = self.sql("SELECT metric, count(*) AS n, count(DISTINCT run_id) AS runs "
                          "FROM metric_series GROUP BY metric ORDER BY metric")
        sources = pl.DataFrame(metric_sources(), schema=["metric", "source", "meaning"], orient="row")
        return counts.join(sources, on="metric", how="left").select("metric", "source", "meaning", "n", "runs")

    def _where(self) -> str:
        scope = f" (experiment {self.scope.name})" if self.scope else ""
        return f"{self.store.root}{scope}"

    # --------------------------------------------------------------------- analysis twins
    # Each scopes itself first (for_analysis): see the function's own docstring for its arguments.
    def correlate(self, *args, **kwargs):
        """``lsdb correlate``: see ``lsdb.query.correlate.correlate``."""
        from lsdb.query.correlate import correlate

        return correlate(self.for_analysis(), *args, **kwargs)

    def transition(self, *args, **kwargs):
        """``lsdb transition``: see ``lsdb.query.transition.transition``."""
        from lsdb.query.transition import transition

        return transition(self.for_analysis(), *args, **kwargs)

    def findings(self, *args, **kwargs):
        """``lsdb findings``: see ``lsdb.query.findings.findings``."""
        from lsdb.query.findings import findings

        return findings(self.for_analysis(), *args, **kwargs)

    def report(self, out, **kwargs):
        """``lsdb findings --report OUT``: see ``lsdb.query.report.report``."""
        from lsdb.query.report import report

        return report(self.for_analysis(), out, **kwargs)

    def determinism(self, pooled: bool = False):
        """``lsdb determinism``: see ``lsdb.query.determinism`` (``pooled``: the mean per source,
        variant and spawn time)."""
        from lsdb.query import determinism

        return determinism.summary(self) if pooled else determinism.determinism(self)

    def chart(self, *args, **kwargs):
        """``lsdb chart``: see ``lsdb.query.charts.chart``."""
        from lsdb.query.charts import chart

        return chart(self.for_analysis(), *args, **kwargs)


def _pick_experiment(exps, wanted: str | None, root) -> dict:
    """The current version of experiment name ``wanted``, or the version whose id starts with it."""
    current = exps.filter(exps["current"])
    if wanted is None:
        if current.height > 1:
            raise QueryError(f"store {root} holds {current.height} experiments "
                             f"({', '.join(current['name'].to_list())}); choose one with --experiment NAME "
                             f"(Python: lsdb.open(store, experiment=NAME))")
        return current.row(0, named=True)
    by_name = current.filter(current["name"] == wanted)
    if by_name.height:
        return by_name.row(0, named=True)
    by_id = exps.filter(exps["id"].str.starts_with(wanted)) if len(wanted) >= 4 else exps.clear()
    if by_id.height == 1:
        return by_id.row(0, named=True)
    if by_id.height > 1:
        raise QueryError(f"experiment id prefix '{wanted}' is ambiguous ({by_id.height} versions); give more characters")
    raise QueryError(f"no experiment '{wanted}' in {root}; experiments: {', '.join(current['name'].to_list())} "
                     f"(list them with: lsdb experiments)")


RUNS_SQL = """
SELECT e.name AS experiment, r.id, r.variant, r.kind, r.seed, r.dataset, r.model,
       r.width, r.lr, r.batch_size, r.epochs, r.spawn_epoch, r.child_index, r.finetune, r.status, count(c.id) AS checkpoints,
       arg_max(c.test_error, c.step) AS final_test_error
FROM run r
LEFT JOIN (experiment_run l JOIN experiment_current e ON e.id = l.experiment_id) ON l.run_id = r.id
LEFT JOIN checkpoint c ON c.run_id = r.id
GROUP BY ALL
ORDER BY experiment NULLS LAST, variant, r.seed, r.kind DESC, r.spawn_epoch NULLS FIRST, r.child_index NULLS FIRST
"""

EXPERIMENTS_SQL = """
SELECT e.name, e.id, e.dataset, count(l.run_id) AS runs, e.created_at,
       e.id IN (SELECT id FROM experiment_current) AS current
FROM experiment e LEFT JOIN experiment_run l ON l.experiment_id = e.id
GROUP BY ALL ORDER BY e.name, e.created_at DESC
"""


# ---------------------------------------------------------------------- read-only guard
# What DuckDB's parser reports as SELECT covers SELECT, WITH, VALUES, FROM-first queries, PIVOT and
# UNPIVOT, DESCRIBE, SHOW, SUMMARIZE and the read-only PRAGMAs (which it rewrites into SELECTs).
# Every other statement type (SET, PRAGMA, CALL, COPY, ATTACH, LOAD/INSTALL, EXPORT, CREATE, ...) is
# refused; EXPLAIN is allowed without ANALYZE and only of a statement that is itself allowed.
_READ_TYPES = frozenset({"SELECT"})

# PRAGMAs a query may name; DuckDB turns each into a SELECT over a catalog table function.
READ_PRAGMAS = frozenset({
    "table_info", "show", "show_tables", "show_tables_expanded", "show_databases", "database_list",
    "database_size", "storage_info", "metadata_info", "version", "platform", "user_agent",
    "functions", "collations", "extension_versions",
})

# Table and scalar functions that a SELECT can call but that change settings (profiling, logging;
# DuckDB lets these past lock_configuration), write files or the database, run SQL given as text
# (which would skip this check), or read raw memory through Python pointers.
REFUSED_FUNCTIONS = frozenset({
    "enable_profiling", "disable_profiling", "enable_logging", "disable_logging",
    "truncate_duckdb_logs", "write_log", "checkpoint", "force_checkpoint",
    "query", "json_execute_serialized_sql",
    "arrow_scan", "arrow_scan_dumb", "pandas_scan", "python_map_function",
})

_HINTS = {
    "CALL": "query the function with SELECT * FROM instead",
    "SET": "settings cannot be changed from lsdb sql",
    "LOAD": "extensions cannot be installed or loaded from lsdb sql",
    "COPY": "export a result with lsdb sql QUERY --format csv|parquet --out FILE",
    "EXPORT": "export a result with lsdb sql QUERY --format csv|parquet --out FILE",
}
_ANALYZE = ("analyze", "analyse")
_WORD = re.compile(r"[^\W\d][\w$]*")


def check_read_only(con, query: str) -> None:
    """Raise ``QueryError`` unless every statement of ``query`` only reads.

    ``con`` parses (``extract_statements``): a connection opened with ``Store.read(untrusted=True)``,
    so that the parser itself cannot read files (``IMPORT DATABASE`` reads them while parsing)."""
    if not isinstance(query, str):
        raise QueryError(f"a query is a string, not {type(query).__name__}")
    statements = _statements(con, query)
    if not statements:
        raise QueryError("empty query: nothing to run; give a statement, e.g. SELECT * FROM run")
    tokens = _tokens(query)
    _check_pragmas(tokens)
    _check_functions(tokens)
    _check_statements(con, query, statements, tokens)


def _statements(con, text: str):
    import duckdb

    try:
        return con.extract_statements(text)
    except duckdb.Error as e:
        raise QueryError(_error_line(e)) from None


def _check_statements(con, text: str, statements, tokens) -> None:
    # PIVOT without an IN list makes the parser add a CREATE (a temporary ENUM of the pivot
    # values) with no text of its own; a CREATE the user typed always has its text
    pivot = any(word in ("pivot", "pivot_wider") for _, kind, word in tokens if kind == "keyword")
    for st in statements:
        kind = _type_name(st)
        if kind in _READ_TYPES:
            _check_functions(_tokens(st.query))  # a PRAGMA's rewritten SELECT
            continue
        if kind == "CREATE" and pivot and not st.query.strip():
            continue
        if not st.query.strip():  # e.g. the TRANSACTION and EXPLAIN DuckDB makes of EXPLAIN PIVOT
            raise QueryError(f"lsdb sql is read-only: {kind} statements are refused (one DuckDB generated "
                             f"from the query, which lsdb cannot check); run the query without EXPLAIN")
        if kind == "EXPLAIN":
            _check_explain(con, st.query)
            continue
        if kind == "PRAGMA":
            name = _pragma_name(_tokens(st.query))
            raise QueryError(f"lsdb sql is read-only: PRAGMA {name} is refused; "
                             f"read-only PRAGMAs: {', '.join(sorted(READ_PRAGMAS))}")
        raise QueryError(f"lsdb sql is read-only: {kind} statements are refused ({_snippet(st.query)}); "
                         + _HINTS.get(kind, "change the store through a spec and lsdb run"))


def _check_explain(con, text: str) -> None:
    """EXPLAIN plans without running; EXPLAIN ANALYZE runs the statement, so it is refused, and
    so is EXPLAIN of anything that is not itself allowed."""
    tokens = _tokens(text)
    i = 1  # tokens[0] is EXPLAIN
    if i < len(tokens) and tokens[i][2] in _ANALYZE:
        raise QueryError("lsdb sql is read-only: EXPLAIN ANALYZE is refused (it runs the statement); "
                         "use EXPLAIN without ANALYZE")
    if i < len(tokens) and tokens[i][2] == "(":  # EXPLAIN (FORMAT json, ...) statement
        depth = 0
        while i < len(tokens):
            word = tokens[i][2]
            if word in _ANALYZE:
                raise QueryError("lsdb sql is read-only: EXPLAIN (ANALYZE) is refused (it runs the statement); "
                                 "use EXPLAIN without ANALYZE")
            depth += (word == "(") - (word == ")")
            i += 1
            if depth == 0:
                break
    if i >= len(tokens):
        return  # nothing to explain: DuckDB reports the syntax error
    inner = text[tokens[i][0]:]
    statements = _statements(con, inner)
    for st in statements:
        kind = _type_name(st)
        if kind not in _READ_TYPES and not (kind == "CREATE" and not st.query.strip()):
            article = "an" if kind[0] in "AEIOU" else "a"
            raise QueryError(f"lsdb sql is read-only: EXPLAIN of {article} {kind} statement is refused "
                             f"({_snippet(inner)})")
    _check_statements(con, inner, statements, _tokens(inner))


def _check_pragmas(tokens) -> None:
    """Every PRAGMA must be a read-only one, whatever statement type DuckDB makes of it
    (``PRAGMA profiling_output='f'`` is a SET, ``PRAGMA enable_profiling`` a PRAGMA)."""
    start = True
    for i, (_, kind, word) in enumerate(tokens):
        if kind == "operator" and word == ";":
            start = True
            continue
        if start and word == "pragma":
            name = _pragma_name(tokens[i:])
            if name not in READ_PRAGMAS:
                raise QueryError(f"lsdb sql is read-only: PRAGMA {name} is refused; "
                                 f"read-only PRAGMAs: {', '.join(sorted(READ_PRAGMAS))}")
        start = False


def _check_functions(tokens) -> None:
    """A name followed by ``(`` is a call (DuckDB needs the parentheses for table functions too)."""
    for (_, kind, word), (_, _, after) in zip(tokens, tokens[1:]):
        if kind in ("identifier", "keyword") and after == "(" and word in REFUSED_FUNCTIONS:
            raise QueryError(f"lsdb sql is read-only: the function {word}() is refused "
                             f"(it changes settings, writes files or runs SQL given as text)")


def _pragma_name(tokens) -> str:
    return tokens[1][2] if len(tokens) > 1 else "(no name)"


def _tokens(text: str) -> list[tuple[int, str, str]]:
    """(position, kind, word) from DuckDB's own lexer; words of names and keywords lower-cased and
    unquoted, operators as their first character."""
    import duckdb

    try:
        raw = duckdb.tokenize(text)
    except duckdb.Error as e:
        raise QueryError(_error_line(e)) from None
    out = []
    for pos, kind in raw:
        kind = kind.name
        if kind in ("identifier", "keyword"):
            if text.startswith('"', pos):
                end = pos + 1
                while True:
                    end = text.find('"', end)
                    if end == -1 or not text.startswith('""', end):
                        break
                    end += 2
                word = text[pos + 1:end if end != -1 else len(text)].replace('""', '"')
            else:
                m = _WORD.match(text, pos)
                word = m.group(0) if m else text[pos:pos + 1]
            out.append((pos, kind, word.lower()))
        else:
            out.append((pos, kind, text[pos:pos + 1]))
    return out


def _type_name(statement) -> str:
    return str(statement.type).split(".")[-1]


def _snippet(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _error_line(e: Exception) -> str:
    line = _first_line(e)
    if "disabled by configuration" in line:
        line += ("; lsdb sql reads only the store: pass --allow-files (lsdb sql) or allow_files=True "
                 "(Session.sql) to read local files")
    return line


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
