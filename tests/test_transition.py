"""transition: the piecewise-linear fit recovers known breaks; the query reads a real store."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from lsdb.query.session import Session
from lsdb.query.transition import segment_fit, transition, transition_of

from .conftest_query import StoreBuilder


def test_one_break_is_recovered_exactly():
    x = np.linspace(0, 5, 21)
    y = 1 + 2 * x - 1.5 * np.maximum(0, x - x[8])
    fit = segment_fit(x, y, breaks=1)
    assert fit["knots"][0] == pytest.approx(x[8]) and fit["slopes"] == pytest.approx([2.0, 0.5])
    assert fit["rss"] == pytest.approx(0, abs=1e-18)


def test_two_breaks_are_recovered_exactly():
    x = np.linspace(0, 5, 21)
    y = 1 + 0.1 * x + 2 * np.maximum(0, x - x[5]) - 2.05 * np.maximum(0, x - x[12])
    fit = segment_fit(x, y, breaks=2)
    assert fit["knots"] == pytest.approx([x[5], x[12]]) and fit["slopes"] == pytest.approx([0.1, 2.1, 0.05])


def test_transition_is_the_end_of_the_fast_phase_in_log_time():
    epochs = np.array([0, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2, 3, 4, 6, 8, 12, 16, 24, 32, 40.0])
    # flat, then linear in log(epoch + 0.01) until epoch 2, then constant: the break is at epoch 2
    x = np.log(epochs + 0.01)
    y = np.clip(x, np.log(0.26), np.log(2.01))
    got = transition_of(epochs, y)
    assert got["t_break"] == pytest.approx(2.0) and got["shape"] == "fast→slow"
    assert got["t_low"] <= 2.0 + 1e-9 and got["t_high"] >= 2.0 - 1e-9 and got["slope_late"] == pytest.approx(0.0, abs=1e-9)


def test_series_that_speeds_up_is_flagged():
    epochs = np.array([0, 0.1, 0.5, 1, 2, 4, 8, 16, 24, 32, 40.0])
    got = transition_of(epochs, np.maximum(0, np.log(epochs + 0.01) - np.log(8.01)))
    assert got["shape"] == "slow→fast" and math.isnan(got["slope_late"])


def test_too_short_or_constant_series_give_none():
    assert transition_of([0, 1, 2, 3], [1, 2, 3, 4]) is None
    assert transition_of(np.arange(10.0), np.ones(10)) is None


def test_transition_query_on_a_store(tmp_path):
    b = StoreBuilder(tmp_path)
    epochs = [0, 0.05, 0.1, 0.25, 0.5, 1, 2, 3, 4, 8, 16, 24, 32, 40]
    for seed, tau in ((0, 1.0), (1, 2.0)):
        b.run(f"p{seed}", seed=seed)
        for e in epochs:
            b.checkpoint(f"p{seed}", e, test_loss=math.exp(-e / tau), train_loss=1.0)
    df = transition(Session.open(b.flush()), ["test_loss", "train_loss"])
    runs = df.filter(pl.col("scope") == "run")
    assert runs["metric"].to_list() == ["test_loss", "test_loss"]  # constant train_loss: no fit
    t = dict(zip(runs["seed"], runs["t_break"]))
    assert t[0] < t[1]  # the slower decay ends its fast phase later
    pooled = df.filter(pl.col("scope") == "pooled").row(0, named=True)
    assert pooled["n"] == 2 and pooled["t_break"] == pytest.approx((t[0] + t[1]) / 2)
    assert runs["frac_break"].to_list() == pytest.approx([v / 40 for v in runs["t_break"]])
