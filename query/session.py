"""``lsdb.open(store)`` → a ``Session``: the Python twin of the read commands of the CLI."""

from __future__ import annotations

import re

from lsdb.errors import QueryError
from lsdb.store import Store

class Session:
    """Read-only access to a store. Every method opens the database briefly, so a running
    ``lsdb run`` can still ingest between calls."""

    def __init__(self, store: Store):
        self.store = store

    @classmethod
    def open(cls, store=None) -> "Session":
        return cls(store if isinstance(store, Store) else Store.open(store))

    # ------------------------------------------------------------------------------- SQL
    def sql(self, query: str, params: list | None = None, *, allow_files: bool = False):
        """Run a read-only query; returns a polars DataFrame.

        The query is checked statement by statement with DuckDB's own parser (see
        ``check_read_only``) and runs on a connection that cannot touch files, load extensions or
        change settings. ``allow_files=True`` lets it read local files (``read_csv``,
        ``read_parquet``, ...); writing stays refused."""
        import duckdb

        with self.store.read(untrusted=True, allow_files=allow_files) as con:
            check_read_only(con, query)
            try:
                return con.execute(query, params or []).pl()
            except duckdb.Error as e:
                raise QueryError(_error_line(e)) from None

    def sql_batches(self, query: str, batch_rows: int = 100_000, *, allow_files: bool = False):
        """Stream a large result as Arrow record batches (the CLI uses this for big exports)."""
        import duckdb

        with self.store.read(untrusted=True, allow_files=allow_files) as con:
            check_read_only(con, query)
            try:
                reader = con.execute(query).to_arrow_reader(batch_rows)
            except duckdb.Error as e:
                raise QueryError(_error_line(e)) from None
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
