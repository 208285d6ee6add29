"""merge probe: weight matching preserves the function, recovers a hidden permutation, and the
barriers agree with a plain loop over α (float64, tiny nets)."""

from __future__ import annotations

import functools

import pytest
import torch

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.probes import merge
from lsdb.probes.base import JobRequest
from tests import tiny_cases as tc

DT = tc.DT
# the cases by test id: cnn1d and mlp on the same data (60 train / 40 test signals of length 12, 4 classes);
# cnn2d only in the permutation test, on random 6×6 images
CASES = {"cnn1d": tc.case("cnn12_w6"), "mlp": tc.case("mlp12"), "cnn2d": tc.case("cnn2d6")}
CNN, MLP = CASES["cnn1d"], CASES["mlp"]


def _ctx(model, states, data, tmp_path):
    return tc.context(model, data, tmp_path, states=states, role="cross_init")


def _random_perms(chain, state, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(state[layer.weight].shape[0], generator=g) for layer in chain[:-1]]


def _logits(case, state, x):
    m = case.model(None)
    m.load_state_dict(state)
    with torch.no_grad():
        return m(x)


def _distance(s1, s2):
    return float(torch.sqrt(sum(((s1[k] - s2[k]) ** 2).sum() for k in s1)))


@pytest.mark.parametrize("name", ["cnn1d", "mlp", "cnn2d"])
def test_permuted_model_computes_same_function(name):
    case = CASES[name]
    x = torch.randn(20, 1, 6, 6, dtype=DT) if name == "cnn2d" else case.data().x_test
    (state,) = case.states(3)
    chain = merge.layer_chain(case.make())
    perms = _random_perms(chain, state, 11)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms)
    permuted = merge.permute_state(chain, state, perms)
    assert _distance(state, permuted) > 0.1  # really moved in weight space
    torch.testing.assert_close(_logits(case, permuted, x), _logits(case, state, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_matching_recovers_hidden_permutation(tmp_path, name):
    case = CASES[name]
    data = case.data()
    (state,) = case.states(5)
    chain = merge.layer_chain(case.make())
    shuffled = merge.permute_state(chain, state, _random_perms(chain, state, 7))
    row = merge.compute(_ctx(case.model(None), [state, shuffled], data, tmp_path),
                        merge.Params(points=5, train_subset=30))["merge"][0]
    assert row["weight_distance_naive"] > 0.1
    assert row["weight_distance_matched"] < 1e-12
    for q in ("matched_loss_barrier_test", "matched_error_barrier_test", "matched_loss_barrier_train"):
        assert abs(row[q]) < 1e-12
    assert row["sweeps"] >= 2  # one that found the permutation, one that changed nothing


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_matching_preserves_function_and_never_moves_away(name):
    case = CASES[name]
    x = case.data().x_test
    sa, sb = case.states(1, 2)
    chain = merge.layer_chain(case.make())
    perms, sweeps = merge.match_weights(chain, sa, sb, max_sweeps=20, seed=0)
    matched = merge.permute_state(chain, sb, perms)
    torch.testing.assert_close(_logits(case, matched, x), _logits(case, sb, x), rtol=0, atol=1e-12)
    assert _distance(sa, matched) <= _distance(sa, sb) + 1e-12
    assert 1 <= sweeps <= 20


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_barriers_match_plain_loop(tmp_path, name):
    case = CASES[name]
    data = case.data()
    sa, sb = case.states(1, 2)
    params = merge.Params(points=7, train_subset=0)
    model = case.model(None)
    row = merge.compute(_ctx(model, [sa, sb], data, tmp_path), params)["merge"][0]
    chain = merge.layer_chain(case.make())
    perms, sweeps = merge.match_weights(chain, sa, sb, params.sweeps, params.seed)
    sm = merge.permute_state(chain, sb, perms)
    alphas = [i / 6 for i in range(7)]
    for path, other in (("naive", sb), ("matched", sm)):
        for split, x, y in (("test", data.x_test, data.y_test), ("train", data.x_train, data.y_train)):
            loss, err = tc.interpolation_curve(model, sa, other, alphas, x, y)
            expected = float(loss.max() - 0.5 * (loss[0] + loss[-1]))
            assert row[f"{path}_loss_barrier_{split}"] == pytest.approx(expected, abs=1e-12)
            expected = float(err.max() - 0.5 * (err[0] + err[-1]))
            assert row[f"{path}_error_barrier_{split}"] == pytest.approx(expected, abs=1e-12)
        mid, _ = tc.interpolation_curve(model, sa, other, [0.5], data.x_test, data.y_test)
        assert row[f"{path}_midpoint_test_loss"] == pytest.approx(float(mid[0]), abs=1e-12)
    assert row["weight_distance_naive"] == pytest.approx(_distance(sa, sb), abs=1e-12)
    assert row["weight_distance_matched"] == pytest.approx(_distance(sa, sm), abs=1e-12)
    assert row["sweeps"] == sweeps and row["points"] == 7 and row["n_train"] == 60 and row["n_test"] == 40


def test_barrier_at_endpoints_is_exact(tmp_path):
    """Both paths share their endpoints' functions, so a 2-point grid gives barriers of exactly
    ½|Q(0) − Q(1)| and the same number on both paths."""
    data = MLP.data()
    sa, sb = MLP.states(1, 2)
    model = MLP.model(None)
    row = merge.compute(_ctx(model, [sa, sb], data, tmp_path), merge.Params(points=2))["merge"][0]
    la, _ = tc.interpolation_curve(model, sa, sb, [0.0, 1.0], data.x_test, data.y_test)
    assert row["naive_loss_barrier_test"] == pytest.approx(0.5 * abs(float(la[0] - la[1])), abs=1e-12)
    assert row["matched_loss_barrier_test"] == pytest.approx(row["naive_loss_barrier_test"], abs=1e-12)


def test_unsupported_model_is_a_probe_error(tmp_path):
    patch = tc.case("patch12")
    (s,) = patch.states(0)
    with pytest.raises(ProbeError, match="PatchNet"):
        merge.compute(_ctx(patch.model(None), [s, s], patch.data(), tmp_path), merge.Params(points=3))


def test_non_finite_checkpoint_is_skipped(tmp_path):
    sa, sb = CNN.states(1, 2)
    sb["readout.weight"] = torch.full_like(sb["readout.weight"], float("nan"))
    with pytest.raises(ProbeSkipped, match="non-finite"):
        merge.compute(_ctx(CNN.model(None), [sa, sb], CNN.data(), tmp_path), merge.Params(points=3))


def test_infinite_loss_is_skipped(tmp_path):
    sa, sb = MLP.states(1, 2)
    sb["net.4.bias"] = torch.tensor([1e308, -1e308, 0.0, 0.0], dtype=DT)  # finite weights, inf loss
    with pytest.raises(ProbeSkipped, match="non-finite"):
        merge.compute(_ctx(MLP.model(None), [sa, sb], MLP.data(), tmp_path), merge.Params(points=3))


def test_plan_pairs_seeds_of_one_variant():
    run = functools.partial(tc.run_ref, steps=(0, 10))
    study = tc.FakeStudy([
        run("b2", seed=2), run("b0", seed=0), run("b1", seed=1),
        run("w0", seed=0, variant="wide"), run("w1", seed=1, variant="wide", status="running"),
        run("n0", seed=0, variant="narrow"), run("n3", seed=3, variant="narrow", status="diverged"),
        run("c", seed=5, kind="child"),
    ])
    jobs = merge.plan(study, merge.Params())
    assert sorted(jobs, key=lambda j: j.checkpoint_ids) == [
        JobRequest(("b0-10", "b1-10"), "b0-10", "cross_init"),
        JobRequest(("b0-10", "b2-10"), "b0-10", "cross_init"),
        JobRequest(("b1-10", "b2-10"), "b1-10", "cross_init"),
    ]


def test_metrics_feed_f14():
    from lsdb.schema import Base, metrics_of

    names = {m.name: (m.column, m.role) for m in metrics_of(Base.metadata.tables["merge"])}
    assert names == {
        "cross_init_loss_barrier_test": ("naive_loss_barrier_test", "cross_init"),
        "matched_loss_barrier_test": ("matched_loss_barrier_test", "cross_init"),
        "cross_init_error_barrier_test": ("naive_error_barrier_test", "cross_init"),
        "matched_error_barrier_test": ("matched_error_barrier_test", "cross_init"),
    }
    assert merge.TABLES == ("merge",)
