"""Options and output helpers shared by every CLI command (defined once, used everywhere)."""

from __future__ import annotations

import contextlib
import enum
import inspect
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup


class Format(str, enum.Enum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


StoreOpt = Annotated[
    Optional[Path],
    typer.Option("--store", "-s", help="Store directory (default: $LSDB_STORE, else ./lsdb-store).",
                 show_default=False),
]
ExperimentOpt = Annotated[
    Optional[str],
    typer.Option("--experiment", "-e", help="Only this experiment: its name (the latest version of an edited "
                 "spec) or an id prefix (see: lsdb experiments). Needed when the store holds several.",
                 show_default=False),
]
VariantOpt = Annotated[
    Optional[str],
    typer.Option("--variant", help="Only this variant of the experiment.", show_default=False),
]
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Write to this file instead of stdout (an empty result still writes "
                 "the file: a CSV header, [] or an empty parquet table). parquet without --out goes to "
                 "stdout only when that is a pipe or a file."),
]


def _print_version(value: bool) -> None:
    if value:
        from lsdb._version import __version__

        typer.echo(f"lsdb {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version (lsdb X.Y.Z) and exit.")]


class HelpGroup(TyperGroup):
    """The command group, for plain click help (the app sets ``rich_markup_mode=None``).

    Plain help shows text as written (Rich markup would eat ``[i]``) and re-flows each paragraph
    to the terminal, so docstrings may be hard-wrapped anywhere. Two fixes on top: the command list
    shows each command's whole first paragraph (click's first sentence stops at "et al."), and a
    paragraph that starts with "Example" keeps its line breaks (click's ``\\b`` marker), one
    command a line."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            _tidy_help(command)


def _tidy_help(command) -> None:
    if not command.help:
        return
    paragraphs = inspect.cleandoc(command.help).split("\n\n")
    command.short_help = command.short_help or " ".join(paragraphs[0].split())
    command.help = "\n\n".join("\b\n" + p if p.startswith("Example") else p for p in paragraphs)


def emit(df, fmt: Format = Format.table, out: Path | None = None) -> None:
    """Print (or write to ``out``) a polars DataFrame in the chosen format.

    csv and json are the same UTF-8 bytes on stdout and in a file. json is one document: a list of
    row objects (``[]`` when empty; NaN and inf become null). parquet goes to ``out``, or to stdout
    when that is a pipe or a file (refused on a terminal). An empty result still writes ``out``;
    as a table it prints "no rows" on stderr rather than an empty grid."""
    import polars as pl

    if fmt == Format.parquet:
        with _sink(fmt, out) as sink:
            df.write_parquet(sink)
        return
    if fmt == Format.table and df.height == 0:
        typer.echo(f"no rows (columns: {', '.join(df.columns)})", err=True)
        if out is None:
            return
    if fmt == Format.csv:
        text = df.write_csv()
    elif fmt == Format.json:
        text = df.write_json()
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            text = str(df)
    with _sink(fmt, out) as sink:
        sink.write((text if text.endswith("\n") else text + "\n").encode())


def emit_sections(sections: dict, out: Path | None = None) -> None:
    """One JSON document ``{name: [row objects]}`` for a command that shows several frames (show)."""
    import json

    doc = {name: json.loads(df.write_json()) for name, df in sections.items()}
    with _sink(Format.json, out) as sink:
        sink.write((json.dumps(doc, ensure_ascii=False, separators=(",", ":")) + "\n").encode())


def emit_batches(batches, fmt: Format, out: Path | None = None) -> None:
    """Write Arrow record batches as csv or parquet without holding them all in memory.

    The bytes are those ``emit`` writes for the same rows (csv through polars, the header once).
    A reader that yields no batch at all (an empty result) writes nothing and says so on stderr."""
    import polars as pl

    if fmt not in (Format.csv, Format.parquet):
        raise ValueError(f"emit_batches writes csv or parquet, not {fmt.value}")
    batches = iter(batches)
    first = next(batches, None)
    if first is None:
        typer.echo("no rows: nothing written" + (f" to {out}" if out is not None else ""), err=True)
        return
    with _sink(fmt, out) as sink:
        if fmt == Format.csv:
            sink.write(pl.from_arrow(first).write_csv().encode())
            for batch in batches:
                sink.write(pl.from_arrow(batch).write_csv(include_header=False).encode())
            return
        import pyarrow.parquet as pq

        with pq.ParquetWriter(sink, first.schema) as writer:
            writer.write_batch(first)
            for batch in batches:
                writer.write_batch(batch)


@contextlib.contextmanager
def _sink(fmt: Format, out: Path | None):
    """A binary stream: the file ``out``, else stdout (parquet only when stdout is not a terminal)."""
    if out is not None:
        with open(out, "wb") as f:
            yield f
        return
    if fmt == Format.parquet and sys.stdout.isatty():
        from lsdb.errors import LsdbError

        raise LsdbError("--format parquet writes binary: give --out FILE or redirect stdout (> FILE)")
    sys.stdout.flush()  # text echoed earlier comes first
    yield sys.stdout.buffer
    sys.stdout.buffer.flush()
