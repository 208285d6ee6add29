"""Help as written and re-flowed for every registered command; `lsdb --version` and `python -m lsdb`."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
import typer.main
from typer.testing import CliRunner

from lsdb._version import __version__
from lsdb.cli import app

runner = CliRunner()
SECTIONS = ("Arguments:", "Options:", "Commands:")


def commands() -> dict:
    """Every command the app registers (read from the app, so a new command is covered too)."""
    return dict(typer.main.get_command(app).commands)


def help_text(args: list[str], columns: int) -> str:
    res = runner.invoke(app, args + ["--help"], env={"COLUMNS": str(columns)})
    assert res.exit_code == 0, res.output
    return res.stdout


def description(text: str) -> list[list[str]]:
    """The paragraphs between the usage line and the first section (Arguments:, Options:, ...)."""
    lines = [line.rstrip() for line in text.splitlines()]
    end = next((i for i, line in enumerate(lines) if line in SECTIONS or line.startswith("╭")), len(lines))
    paragraphs, current = [], []
    for line in lines[1:end]:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append(current)
            current = []
    return paragraphs + ([current] if current else [])


def _flat(text: str) -> str:
    """Whitespace collapsed, and a word wrapped at its hyphen joined again."""
    return re.sub(r"-\s+", "-", " ".join(text.split()))


def _kept_as_written(paragraph: str) -> bool:
    return paragraph.startswith(("\b", "Example", "Quick start"))


@pytest.mark.parametrize("columns", [80, 120])
@pytest.mark.parametrize("name", [None, *commands()])
def test_help_reflows_the_docstring_and_keeps_its_text(name, columns):
    args = [] if name is None else [name]
    text = help_text(args, columns)
    width = min(columns, 80) - 2  # click's help width: the terminal's, at most 80, less a margin of 2
    doc = inspect.cleandoc(typer.main.get_command(app).help if name is None else commands()[name].help)
    for paragraph in doc.split("\n\n"):
        if not _kept_as_written(paragraph):
            assert _flat(paragraph) in _flat(text), f"lsdb {name or ''} --help lost text of: {paragraph!r}"
    for lines in description(text):
        if _kept_as_written(lines[0].strip()):
            continue
        # re-flowed: no line is short, and none could have taken the next line's first word
        short = [line for line in lines[:-1] if len(line) < 0.4 * width]
        roomy = [a for a, b in zip(lines, lines[1:]) if len(a) + len(b.split()[0]) < width]
        assert not short and not roomy, f"lsdb {name or ''} --help at {columns} columns: ragged {short or roomy}"


def test_example_lines_stay_on_their_own_lines():
    text = help_text([], 80)
    assert "\n    lsdb run examples/quick.toml\n" in text
    for name, cmd in commands().items():
        for paragraph in inspect.cleandoc(cmd.help).split("\n\n"):
            if paragraph.lstrip("\b\n").startswith("Example"):
                lines = paragraph.lstrip("\b\n").splitlines()
                shown = help_text([name], 80)
                assert all(line.strip() in shown for line in lines), name


def test_correlate_help_shows_brackets_and_the_p_value_rule():
    text = help_text(["correlate"], 80)
    assert "[i]" in text and "[i+LAG]" in text
    assert "exact" in _flat(text) and "1/n!" in text


def test_command_list_shows_whole_first_paragraphs():
    text = help_text([], 80)
    assert "Run the embedded Fort et al. (2020) style study" in _flat(text)  # not cut at "al."
    assert "..." not in text.split("\nCommands:\n")[1]  # click's truncation mark


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout == f"lsdb {__version__}\n"
    assert __version__ == "0.2.0"


def test_python_dash_m_lsdb():
    run = [sys.executable, "-m", "lsdb"]
    res = subprocess.run(run + ["--version"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout == f"lsdb {__version__}\n"
    res = subprocess.run(run + ["--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.startswith("Usage: lsdb [OPTIONS] COMMAND")
