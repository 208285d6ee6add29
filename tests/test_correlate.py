"""correlate: alignment, lag, coefficients, pooling — small exact cases and a real store."""

from __future__ import annotations

import itertools
import math

import numpy as np
import polars as pl
import pytest
from scipy import stats
from typer.testing import CliRunner

from lsdb.errors import QueryError
from lsdb.query.correlate import (EXACT_MAX_N, align_pair, apply_lag, corr, correlate, exact_p, fisher_combine,
                                  fisher_interval, log_time, matrix, p_floor, stouffer_p)
from lsdb.query.session import Session
from lsdb.query.thresholds import LOG_TIME_OFFSET

from .conftest_query import StoreBuilder

EPOCHS = [0, 0.1, 0.5, 1, 2, 4, 8, 16, 40]


def test_align_identical_schedules_pair_exactly():
    t = np.array(EPOCHS, float)
    a, b = align_pair(t[::-1], t[::-1] * 2, t, t + 1)  # unsorted input is sorted first
    assert np.array_equal(a, t * 2) and np.array_equal(b, t + 1)


def test_align_nearest_uses_the_sparser_grid_without_extrapolation():
    ta, ya = np.array([0, 1, 2, 4, 8, 16.0]), np.arange(6.0)
    tb, yb = np.array([0.9, 3.5, 30.0]), np.array([10.0, 20.0, 30.0])  # sparser: the grid
    a, b = align_pair(ta, ya, tb, yb, "nearest")
    # nearest in log(epoch + offset): 0.9 -> 1, 3.5 -> 4; 30 is beyond a's last sample (16): dropped
    assert a.tolist() == [1.0, 3.0] and b.tolist() == [10.0, 20.0]


def test_align_interp_is_linear_in_log_time():
    ta = np.array([0, 1, 4, 16.0])
    ya = 3 * log_time(ta) + 1  # exactly linear in log-time: interpolation is exact
    tb = np.array([0.5, 2.0])
    a, b = align_pair(ta, ya, tb, np.array([7.0, 8.0]), "interp")
    assert np.allclose(a, 3 * np.log(tb + LOG_TIME_OFFSET) + 1) and b.tolist() == [7.0, 8.0]


def test_lag_shifts_the_second_series():
    a, b = np.arange(5.0), np.arange(10.0, 15.0)
    assert [x.tolist() for x in apply_lag(a, b, 2)] == [[0, 1, 2], [12, 13, 14]]
    assert [x.tolist() for x in apply_lag(a, b, -1)] == [[1, 2, 3, 4], [10, 11, 12, 13]]


@pytest.mark.parametrize("method,ref", [("spearman", stats.spearmanr), ("pearson", stats.pearsonr),
                                        ("kendall", stats.kendalltau)])
def test_corr_matches_scipy(method, ref):
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    r, p = corr(x, y, method)
    want = ref(x, y)
    assert r == pytest.approx(want.statistic) and p == pytest.approx(want.pvalue)
    assert math.isnan(corr([1, 1, 1, 1], [1, 2, 3, 4])[0])  # constant input: undefined, not an error


def test_fisher_combination_by_hand():
    rs, ns = [0.5, 0.8], [13, 23]
    r, lo, hi = fisher_combine(rs, ns, "pearson")
    w = np.array([10, 20.0])
    z = (w * np.arctanh(rs)).sum() / w.sum()
    assert r == pytest.approx(math.tanh(z))
    assert (lo, hi) == pytest.approx((math.tanh(z - 1.959963984540054 / math.sqrt(30)),
                                      math.tanh(z + 1.959963984540054 / math.sqrt(30))))
    # fed the groups' Fisher-z p-values, Stouffer's pooled p is Fisher's z·sqrt(Σw) ~ N(0, 1)
    ps = 2 * stats.norm.sf(np.arctanh(rs) * np.sqrt(w))
    assert stouffer_p(rs, ps, ns, "pearson") == pytest.approx(2 * stats.norm.sf(z * math.sqrt(30)))
    lo1, hi1 = fisher_interval(0.5, 13, "spearman")  # Spearman's variance is 1.06/(n-3)
    assert hi1 - lo1 > hi - lo


def brute_force_p(x, y, ref):
    """Two-sided permutation p by a plain loop over every pairing, with scipy's coefficient."""
    r0 = abs(ref(x, y).statistic)
    rs = [abs(ref(x, np.asarray(y)[list(perm)]).statistic) for perm in itertools.permutations(range(len(y)))]
    return np.mean([r >= r0 - 1e-9 for r in rs])


@pytest.mark.parametrize("x,y", [
    ([0.3, 1.2, 0.7, 2.5, 1.9, 3.1], [1.0, 0.2, 0.9, 1.7, 2.2, 1.1]),  # no ties
    ([1, 2, 2, 3, 5, 5, 7], [2, 1, 3, 3, 6, 4, 4]),  # ties in both
])
def test_exact_spearman_p_matches_enumerating_every_pairing(x, y):
    r, p = corr(x, y, "spearman")
    assert r == pytest.approx(stats.spearmanr(x, y).statistic)
    assert p == pytest.approx(brute_force_p(x, y, stats.spearmanr), abs=1e-12)
    assert exact_p(x, y, "pearson") == pytest.approx(brute_force_p(x, y, stats.pearsonr), abs=1e-12)


def test_exact_kendall_p_is_scipys_exact_distribution():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=7), rng.normal(size=7)
    assert corr(x, y, "kendall")[1] == pytest.approx(stats.kendalltau(x, y, method="exact").pvalue)


@pytest.mark.parametrize("method", ["spearman", "pearson", "kendall"])
def test_perfect_correlation_of_three_points_is_not_p_zero(method):
    r, p = corr([1, 2, 3], [3, 2, 1], method)
    assert r == pytest.approx(-1.0) and p == pytest.approx(1 / 3)  # 2 of the 3! pairings are as extreme


def test_asymptotic_p_is_floored_at_one_over_n_factorial():
    n = EXACT_MAX_N + 4
    r, p = corr(np.arange(n), -np.arange(n) ** 3, "spearman")  # scipy's t approximation says p = 0
    assert r == -1.0 and p == pytest.approx(1 / math.factorial(n)) and p > 0
    assert p_floor(500) > 0 and math.isnan(corr([1, 2], [2, 1])[1])


def test_pooled_p_of_small_perfect_groups_is_their_exact_evidence():
    """Three runs of n = 5 with r = -1 each: exact p = 2/5! per run; Stouffer pools those (not atanh(±1))."""
    rs, ns = [-1.0] * 3, [5] * 3
    ps = [corr(np.arange(5.0), -np.arange(5.0), "spearman")[1]] * 3
    assert ps[0] == pytest.approx(2 / 120)
    want = 2 * stats.norm.sf(stats.norm.isf(1 / 120) * math.sqrt(3))
    assert stouffer_p(rs, ps, ns, "spearman") == pytest.approx(want)


def test_no_p_value_is_zero_in_a_store_of_tiny_perfect_runs(tmp_path):
    b = StoreBuilder(tmp_path / "tiny")
    for rid, seed in (("p0", 0), ("p1", 1)):
        b.run(rid, seed=seed)
        for i, e in enumerate((1, 2, 4)):  # three checkpoints: train_loss falls as test_loss rises
            b.checkpoint(rid, e, train_loss=3.0 - i, test_loss=1.0 + i * i)
    df = correlate(Session.open(b.flush()), ["train_loss", "test_loss"], method="pearson")
    runs = df.filter(pl.col("scope") == "run")
    assert runs["n"].to_list() == [3, 3] and (runs["p_value"] > 0.1).all()
    pooled = df.filter(pl.col("scope") == "pooled").row(0, named=True)
    assert pooled["p_value"] is None or math.isnan(pooled["p_value"])  # n = 3 groups weigh nothing


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """Two parents (seeds 0, 1) and a child of seed 0. train_loss = a (irregular, > 0),
    test_loss = a², train_error = -a, test_error = a one checkpoint earlier."""
    b = StoreBuilder(tmp_path_factory.mktemp("corr"))
    for rid, seed, kind in (("p0", 0, "parent"), ("p1", 1, "parent"), ("c0", 0, "child")):
        b.run(rid, seed=seed, kind=kind, parent_run_id="p0" if kind == "child" else None)
        for i, e in enumerate(EPOCHS):
            a = 2 + math.sin(i) + 0.1 * seed
            prev = 2 + math.sin(i - 1) + 0.1 * seed  # the value a had one checkpoint earlier
            b.checkpoint(rid, e, train_loss=a, test_loss=a**2, train_error=-a, test_error=prev)
    return b.flush()


def test_two_metrics_per_run_and_pooled(store):
    df = correlate(Session.open(store), ["train_loss", "test_loss"])
    runs = df.filter(pl.col("scope") == "run")
    assert sorted(runs["group"]) == ["c0", "p0", "p1"] and set(runs["n"]) == {len(EPOCHS)}
    assert runs["r"].to_list() == pytest.approx([1.0] * 3)
    pooled = df.filter(pl.col("scope") == "pooled").row(0, named=True)
    assert pooled["groups"] == 3 and pooled["n"] == 3 * len(EPOCHS) and pooled["r"] == pytest.approx(1.0)
    assert "nearest" in pooled["align"]


def test_by_seed_pools_the_runs_of_a_seed(store):
    df = correlate(Session.open(store), ["train_loss", "train_error"], by="seed", method="kendall")
    seeds = df.filter(pl.col("scope") == "seed")
    assert sorted(seeds["group"]) == ["base/seed0", "base/seed1"]
    assert dict(zip(seeds["group"], seeds["n"])) == {"base/seed0": 2 * len(EPOCHS), "base/seed1": len(EPOCHS)}
    assert seeds.filter(pl.col("group") == "base/seed1")["r"][0] == pytest.approx(-1.0)


def test_lag_recovers_a_delayed_copy(store):
    s = Session.open(store)
    at0 = correlate(s, ["train_loss", "test_error"], runs=["p0"], method="pearson", lag=0)
    at1 = correlate(s, ["train_loss", "test_error"], runs=["p0"], method="pearson", lag=1)
    r0, r1 = (d.filter(pl.col("scope") == "run").row(0, named=True) for d in (at0, at1))
    assert r1["n"] == len(EPOCHS) - 1 and r1["lag"] == 1 and r1["r"] == pytest.approx(1.0)
    assert r0["n"] == len(EPOCHS) and r0["r"] < 0.9


def test_since_until_and_bootstrap_are_deterministic(store):
    s = Session.open(store)
    one = correlate(s, ["train_loss", "test_loss"], since=0.5, until=16, bootstrap=200, seed=3)
    two = correlate(s, ["train_loss", "test_loss"], since=0.5, until=16, bootstrap=200, seed=3)
    assert one.equals(two)
    assert set(one.filter(pl.col("scope") == "run")["n"]) == {6}  # epochs 0.5 … 16


def test_full_matrix_over_every_metric(store):
    df = correlate(Session.open(store), by="pooled")
    metrics = {"lr", "test_error", "test_loss", "train_error", "train_loss"}
    assert {(a, b) for a, b in df.select("metric_a", "metric_b").iter_rows()} == {
        (a, b) for a in sorted(metrics) for b in sorted(metrics) if a < b}
    m = matrix(df)
    assert m.columns[0] == "metric" and m.height == len(metrics)
    row = dict(zip(m["metric"], m["train_error"]))
    assert row["train_loss"] == pytest.approx(-1.0)


def test_errors_name_the_valid_choices(store):
    s = Session.open(store)
    with pytest.raises(QueryError, match="unknown metric 'train_los'.*did you mean 'train_loss'"):
        correlate(s, ["train_los", "test_loss"])
    with pytest.raises(QueryError, match="two metrics"):
        correlate(s, ["train_loss"])
    with pytest.raises(QueryError, match="no run 'zz'"):
        correlate(s, ["train_loss", "test_loss"], runs=["zz"])


def test_cli_correlate_and_transition(store):
    from lsdb.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["correlate", "train_loss", "test_loss", "--store", str(store.root), "--by", "pooled",
                              "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "alignment: aligned on the sparser metric's checkpoints" in res.stderr
    out = pl.read_csv(res.stdout.encode())
    assert out["scope"].to_list() == ["pooled"] and out["r"][0] == pytest.approx(1.0)
    res = runner.invoke(app, ["transition", "train_loss", "--store", str(store.root), "-f", "csv"])
    assert res.exit_code == 0, res.output and "three-segment" in res.stderr
    assert "pooled" in res.stdout
    res = runner.invoke(app, ["correlate", "nope", "test_loss", "--store", str(store.root)])
    assert res.exit_code != 0 and isinstance(res.exception, QueryError)
