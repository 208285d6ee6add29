"""Torch threads from the cores free now, so a busy machine is not oversubscribed."""

from __future__ import annotations

import os

import pytest
import torch

from lsdb.errors import LsdbError
from lsdb.probes import executors
from lsdb.probes.executors import THREADS_VAR, free_cores, make_executor


@pytest.fixture
def machine(monkeypatch):
    """A 4-core machine whose load average the test sets."""
    monkeypatch.delenv(THREADS_VAR, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)

    def load(value):
        monkeypatch.setattr(os, "getloadavg", lambda: (value, value, value))
    return load


@pytest.mark.parametrize("load, threads", [(0.0, 4), (0.4, 4), (1.0, 3), (2.6, 1), (3.5, 1), (9.0, 1)])
def test_free_cores_subtracts_what_others_keep_busy(machine, load, threads):
    machine(load)
    assert free_cores() == threads


def test_lsdb_threads_pins_the_count(machine, monkeypatch):
    machine(3.9)
    monkeypatch.setenv(THREADS_VAR, "3")
    assert free_cores() == 3
    monkeypatch.setenv(THREADS_VAR, "many")
    with pytest.raises(LsdbError, match=r"\$LSDB_THREADS='many': expected a whole number"):
        free_cores()


def test_inline_sets_the_threads_for_its_work_and_restores_them(machine, monkeypatch):
    machine(3.0)
    before = torch.get_num_threads()
    ex = make_executor(1)
    try:
        assert torch.get_num_threads() == 1
        assert list(ex.map(lambda: torch.get_num_threads(), [()])) == [1]
    finally:
        ex.close()
    assert torch.get_num_threads() == before


def test_the_pool_shares_the_free_cores(machine, monkeypatch):
    machine(2.0)
    seen = {}
    monkeypatch.setattr(executors, "ProcessPoolExecutor", lambda *a, **k: seen.update(k) or object())
    executors.ProcessExecutor(2)
    assert seen["initargs"][0] == 1  # 2 free cores, 2 workers: one thread each
