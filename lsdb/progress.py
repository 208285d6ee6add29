"""Progress of ``lsdb run`` on stderr: bars on a terminal, plain lines in logs and CI.

Totals are planned before any work starts (see ``Progress``), so the ETA holds from the start.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

TRAIN, PROBE = "training runs", "probe jobs"
LINE_EVERY_S = 30.0  # "lines" mode: at least this often, and at every tenth of a phase
# Why a phase may find more, or less, work than plan() counted up front (see Progress).
MORE_BECAUSE = {TRAIN: "found while training",
                PROBE: "probes that need other probes' results, planned once those exist"}
LESS_BECAUSE = {TRAIN: "children whose parent diverged before their spawn time",
                PROBE: "checkpoints that diverged runs never saved"}


@dataclass
class _Phase:
    total: int
    done: int = 0
    started: float | None = None
    last_line: float = 0.0
    last_tenth: int = 0
    task: object = None  # its rich task, in "bars" mode


class Progress:
    """Progress of training and probing against totals planned before any work starts.

    The totals come from ``plan``: the runs to train, and every job the spec's probes ask for on
    the checkpoints the finished runs will hold (children's too, from the schedule, before they
    exist), so the ETA holds from the start. Two things ``plan`` cannot know: probes that read other
    probes' results (``ntk_distance``) plan only once those exist, and a run that diverges saves
    fewer checkpoints. So a pass that finds more than the total has left grows it, once per pass,
    with a note; a phase that ends short shrinks its total to what was done, with a note, so every
    phase ends at 100 %. Modes: see ``run``."""

    def __init__(self, mode, totals: dict[str, int]):
        self.mode = _progress_mode(mode)
        self.phases = {name: _Phase(total) for name, total in totals.items()}
        self.bars = None

    def __enter__(self):
        if self.mode == "bars":
            self._open_bars()
        elif self.mode == "lines":
            self._say("planned: " + ", ".join(f"{p.total} {name}" for name, p in self.phases.items()))
        return self

    def __exit__(self, *exc):
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def begin(self, name: str, found: int) -> None:
        """A pass of ``found`` tasks starts (training waves; probe passes)."""
        p = self.phases[name]
        if p.started is None:
            p.started = time.monotonic()
            p.last_line = p.started
        more = found - (p.total - p.done)
        if more > 0:
            p.total += more
            p.last_tenth = p.done * 10 // p.total  # tenths of the new total
            self._say(f"{name}: {more} more than planned ({MORE_BECAUSE[name]}); {p.total} in all")
        if self.bars is not None:
            if p.task is None:
                p.task = self.bars.add_task(name, total=p.total)
            self.bars.start_task(p.task)
            self.bars.update(p.task, total=p.total)

    def advance(self, name: str) -> None:
        p = self.phases[name]
        p.done += 1
        if self.bars is not None:
            self.bars.advance(p.task)
        elif self.mode == "lines" and p.done < p.total:  # the last line is end()'s
            now, tenth = time.monotonic(), p.done * 10 // p.total
            if tenth > p.last_tenth or now - p.last_line >= LINE_EVERY_S:
                p.last_line, p.last_tenth = now, tenth
                self._say(_line(name, p, now))

    def end(self, name: str) -> None:
        """The phase is over: a last line at 100 % (the total shrunk to what was done, if less)."""
        p = self.phases[name]
        if p.started is None:
            return
        if p.done < p.total:
            self._say(f"{name}: {p.total - p.done} planned ones not needed ({LESS_BECAUSE[name]})")
            p.total = p.done
        if self.bars is not None:
            self.bars.update(p.task, total=p.total)
        elif self.mode == "lines":
            self._say(_line(name, p, time.monotonic()))

    def _open_bars(self):
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        self.bars = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=Console(stderr=True), transient=False)
        self.bars.__enter__()
        for name, p in self.phases.items():  # every total on screen from the start; clocks start with the phase
            if p.total:
                p.task = self.bars.add_task(name, total=p.total, start=False)

    def _say(self, text: str) -> None:
        if self.bars is not None:
            self.bars.console.print(text, highlight=False, markup=False)
        elif self.mode == "lines":
            print(text, file=sys.stderr, flush=True)  # looked up now: tests and callers may swap stderr


def _progress_mode(progress) -> str | None:
    if progress is None or progress is False:
        return None
    if progress is True or progress == "auto":
        return "bars" if sys.stderr.isatty() else "lines"  # bars in a log file are noise
    if progress in ("bars", "lines"):
        return progress
    raise ValueError(f"progress={progress!r}: use None, 'bars', 'lines' or 'auto'")


def _line(name: str, p: _Phase, now: float) -> str:
    """E.g. ``training runs: 12/40 (30%), 1m05s elapsed, ETA 2m30s``."""
    elapsed = now - p.started
    text = f"{name}: {p.done}/{p.total} ({p.done * 100 // max(p.total, 1)}%), {_duration(elapsed)} elapsed"
    if 0 < p.done < p.total:
        text += f", ETA {_duration(elapsed / p.done * (p.total - p.done))}"
    return text


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"
