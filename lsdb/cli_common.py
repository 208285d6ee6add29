"""Options and output helpers shared by every CLI command (defined once, used everywhere)."""

from __future__ import annotations

import enum
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer


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
FormatOpt = Annotated[Format, typer.Option("--format", "-f", help="Output format.")]
OutOpt = Annotated[
    Optional[Path],
    typer.Option("--out", "-o", help="Write to this file instead of stdout (required for parquet)."),
]


def emit(df, fmt: Format = Format.table, out: Path | None = None) -> None:
    """Print (or write) a polars DataFrame in the chosen format."""
    import polars as pl

    if fmt == Format.parquet:
        if out is None:
            raise typer.BadParameter("--format parquet needs --out FILE")
        df.write_parquet(out)
        return
    if fmt == Format.csv:
        text = df.write_csv()
    elif fmt == Format.json:
        text = df.write_json()
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, tbl_width_chars=200, fmt_str_lengths=40,
                       tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True):
            text = str(df)
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
    else:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
