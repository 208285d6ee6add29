"""Progress of `lsdb run`: totals planned before work starts, plain lines when stderr is not a
terminal, bars on stderr, nothing with --no-progress."""

from __future__ import annotations

import re
import subprocess

import pytest

from lsdb import runner
from lsdb.plan import parse_spec
from lsdb.progress import PROBE, TRAIN, Progress, _duration
from lsdb.store import Store
from tests.conftest import TINY_SPEC, lsdb_cmd
from tests.timeouts import hang_timeout

ONE_SEED = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")  # a parent and two children: seconds
PLANNED = re.compile(r"^planned: (\d+) training runs, (\d+) probe jobs$", re.M)
LINE = re.compile(r"^(training runs|probe jobs): (\d+)/(\d+) \((\d+)%\), \S+ elapsed(, ETA \S+)?$")


def progress_lines(err: str) -> dict[str, list[tuple[int, int, int]]]:
    """(done, total, percent) of every progress line, by phase."""
    out: dict[str, list[tuple[int, int, int]]] = {}
    for line in err.splitlines():
        m = LINE.match(line)
        if m:
            out.setdefault(m[1], []).append((int(m[2]), int(m[3]), int(m[4])))
    return out


def assert_ends_at_100(lines: list[tuple[int, int, int]]) -> None:
    assert [d for d, *_ in lines] == sorted(d for d, *_ in lines)  # percentages drop when a total grows
    done, total, percent = lines[-1]
    assert done == total and percent == 100


# ------------------------------------------------------------------------ real runs, tiny spec

@pytest.mark.slow
def test_the_totals_announced_up_front_are_the_work_done(tmp_path, capsys):
    summary = runner.run(parse_spec(ONE_SEED), Store.init(tmp_path / "s"), progress="lines")
    err = capsys.readouterr().err
    runs, jobs = map(int, PLANNED.search(err).groups())
    assert (runs, jobs) == (summary.trained, summary.jobs_done + summary.jobs_skipped + summary.jobs_failed)
    assert runs == 3 and jobs > 0
    lines = progress_lines(err)
    for phase, total in ((TRAIN, runs), (PROBE, jobs)):
        assert_ends_at_100(lines[phase])
        assert {t for _, t, _ in lines[phase]} == {total}  # never grew, never shrank
    assert "more than planned" not in err and "not needed" not in err


@pytest.mark.slow
def test_a_probe_that_needs_other_results_grows_the_total_once_and_says_so(tmp_path, capsys):
    spec = parse_spec(ONE_SEED + "\n[probes.ntk]\n\n[probes.ntk_distance]\n")
    summary = runner.run(spec, Store.init(tmp_path / "s"), progress="lines")
    err = capsys.readouterr().err
    _, jobs = map(int, PLANNED.search(err).groups())
    grown = re.findall(r"^probe jobs: (\d+) more than planned \(probes that need other probes' results", err, re.M)
    assert len(grown) == 1 and jobs + int(grown[0]) == summary.jobs_done
    assert_ends_at_100(progress_lines(err)[PROBE])


@pytest.mark.slow
def test_lsdb_run_prints_progress_lines_when_stderr_is_not_a_terminal(tmp_path, cli_env):
    spec = tmp_path / "tiny.toml"
    spec.write_text(ONE_SEED)
    r = subprocess.run(lsdb_cmd() + ["run", str(spec), "--store", str(tmp_path / "a")], capture_output=True,
                       text=True, env=cli_env, timeout=hang_timeout(300))
    assert r.returncode == 0, r.stderr
    trained, jobs = map(int, re.search(r"trained (\d+) runs .*probe jobs: (\d+) done", r.stdout).groups())
    assert PLANNED.search(r.stderr).groups() == (str(trained), str(jobs))
    lines = progress_lines(r.stderr)
    assert_ends_at_100(lines[TRAIN])
    assert_ends_at_100(lines[PROBE])
    assert "\x1b[" not in r.stderr  # no terminal escapes in a log

    quiet = subprocess.run(lsdb_cmd() + ["run", str(spec), "--store", str(tmp_path / "b"), "--no-progress"],
                           capture_output=True, text=True, env=cli_env, timeout=hang_timeout(300))
    assert quiet.returncode == 0, quiet.stderr
    assert not PLANNED.search(quiet.stderr) and progress_lines(quiet.stderr) == {}


# ------------------------------------------------------------------- the reporter on its own

def drive(progress: Progress, phase: str, passes: list[int]) -> None:
    with progress:
        for n in passes:
            progress.begin(phase, n)
            for _ in range(n):
                progress.advance(phase)
        progress.end(phase)


def test_lines_come_every_tenth_not_every_task(capsys):
    drive(Progress("lines", {TRAIN: 0, PROBE: 1000}), PROBE, [1000])
    err = capsys.readouterr().err
    lines = progress_lines(err)[PROBE]
    assert len(lines) == 10 and [p for *_, p in lines] == list(range(10, 101, 10))
    assert err.splitlines()[0] == "planned: 0 training runs, 1000 probe jobs"


def test_a_slow_phase_prints_a_line_every_30_seconds(capsys, monkeypatch):
    clock = iter(range(0, 10_000, 31))  # each call: 31 s later
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    drive(Progress("lines", {TRAIN: 1000, PROBE: 0}), TRAIN, [3])
    lines = progress_lines(capsys.readouterr().err)[TRAIN]
    assert [(d, t) for d, t, _ in lines] == [(1, 1000), (2, 1000), (3, 1000), (3, 3)]  # then the end


def test_more_work_than_planned_grows_the_total_and_says_so(capsys):
    drive(Progress("lines", {TRAIN: 0, PROBE: 10}), PROBE, [10, 5])
    err = capsys.readouterr().err
    assert "probe jobs: 5 more than planned" in err and "15 in all" in err
    assert progress_lines(err)[PROBE][-1] == (15, 15, 100)


def test_less_work_than_planned_ends_at_100_percent_and_says_so(capsys):
    drive(Progress("lines", {TRAIN: 6, PROBE: 0}), TRAIN, [2])
    err = capsys.readouterr().err
    assert "training runs: 4 planned ones not needed (children whose parent diverged" in err
    assert progress_lines(err)[TRAIN][-1] == (2, 2, 100)


def test_bars_go_to_stderr_and_silence_prints_nothing(capsys):
    drive(Progress("bars", {TRAIN: 3, PROBE: 0}), TRAIN, [3])
    out, err = capsys.readouterr()
    assert out == "" and "training runs" in err
    for quiet in (None, False):
        drive(Progress(quiet, {TRAIN: 3, PROBE: 0}), TRAIN, [3])
        assert capsys.readouterr() == ("", "")


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="'bars', 'lines' or 'auto'"):
        Progress("fancy", {})


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59.4, "59s"), (65, "1m05s"), (3720, "1h02m")])
def test_durations_read_like_a_clock(seconds, text):
    assert _duration(seconds) == text
