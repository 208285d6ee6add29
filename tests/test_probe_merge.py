"""merge probe: weight matching preserves the function, recovers a hidden permutation, and the
barriers agree with a plain loop over α (float64, tiny nets)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lsdb.errors import ProbeError, ProbeSkipped
from lsdb.probes import merge
from lsdb.probes.base import Artifacts, CheckpointRef, JobRequest, ProbeContext, RunRef
from lsdb.train.data import Data
from lsdb.train.models import CNN1d, CNN2d, MLP, PatchNet

DT = torch.float64
LENGTH, CLASSES = 12, 4


def _data(n_train=60, n_test=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Data("toy", torch.randn(n_train, 1, LENGTH, generator=g, dtype=DT),
                torch.randint(0, CLASSES, (n_train,), generator=g),
                torch.randn(n_test, 1, LENGTH, generator=g, dtype=DT),
                torch.randint(0, CLASSES, (n_test,), generator=g), CLASSES)


def _cnn():
    return CNN1d((1, LENGTH), CLASSES, width=6, kernels=(3, 3))


def _mlp():
    return MLP((1, LENGTH), CLASSES, width=7, depth=2)


MODELS = {"cnn1d": _cnn, "mlp": _mlp}


def _state(model_fn, seed):
    torch.manual_seed(seed)
    return {k: v.clone() for k, v in model_fn().double().state_dict().items()}


def _ctx(model, states, data, tmp_path):
    ck = [CheckpointRef(f"c{i}", "r", i, float(i), "0" * 64) for i in range(len(states))]
    return ProbeContext(model=model, states=states, checkpoints=ck, runs=[], data=data,
                        probe_indices=torch.arange(8), device=torch.device("cpu"), dtype=DT,
                        artifacts=Artifacts(tmp_path), role="cross_init")


def _random_perms(chain, state, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randperm(state[layer.weight].shape[0], generator=g) for layer in chain[:-1]]


def _logits(model_fn, state, x):
    m = model_fn().double()
    m.load_state_dict(state)
    with torch.no_grad():
        return m(x)


def _distance(s1, s2):
    return float(torch.sqrt(sum(((s1[k] - s2[k]) ** 2).sum() for k in s1)))


@pytest.mark.parametrize("name", ["cnn1d", "mlp", "cnn2d"])
def test_permuted_model_computes_same_function(name):
    model_fn = MODELS.get(name, lambda: CNN2d((1, 6, 6), CLASSES, width=5, depth=2))
    x = torch.randn(20, 1, 6, 6, dtype=DT) if name == "cnn2d" else _data().x_test
    state = _state(model_fn, 3)
    chain = merge.layer_chain(model_fn())
    perms = _random_perms(chain, state, 11)
    assert all(not torch.equal(p, torch.arange(len(p))) for p in perms)
    permuted = merge.permute_state(chain, state, perms)
    assert _distance(state, permuted) > 0.1  # really moved in weight space
    torch.testing.assert_close(_logits(model_fn, permuted, x), _logits(model_fn, state, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_matching_recovers_hidden_permutation(tmp_path, name):
    model_fn = MODELS[name]
    data = _data()
    state = _state(model_fn, 5)
    chain = merge.layer_chain(model_fn())
    shuffled = merge.permute_state(chain, state, _random_perms(chain, state, 7))
    row = merge.compute(_ctx(model_fn().double(), [state, shuffled], data, tmp_path),
                        merge.Params(points=5, train_subset=30))["merge"][0]
    assert row["weight_distance_naive"] > 0.1
    assert row["weight_distance_matched"] < 1e-12
    for q in ("matched_loss_barrier_test", "matched_error_barrier_test", "matched_loss_barrier_train"):
        assert abs(row[q]) < 1e-12
    assert row["sweeps"] >= 2  # one that found the permutation, one that changed nothing


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_matching_preserves_function_and_never_moves_away(name):
    model_fn = MODELS[name]
    x = _data().x_test
    sa, sb = _state(model_fn, 1), _state(model_fn, 2)
    chain = merge.layer_chain(model_fn())
    perms, sweeps = merge.match_weights(chain, sa, sb, max_sweeps=20, seed=0)
    matched = merge.permute_state(chain, sb, perms)
    torch.testing.assert_close(_logits(model_fn, matched, x), _logits(model_fn, sb, x), rtol=0, atol=1e-12)
    assert _distance(sa, matched) <= _distance(sa, sb) + 1e-12
    assert 1 <= sweeps <= 20


def _plain_curve(model_fn, s1, s2, alphas, x, y):
    """The reference: build each interpolated state dict, load it, evaluate."""
    losses, errors = [], []
    for a in alphas:
        logits = _logits(model_fn, {k: (1 - a) * s1[k] + a * s2[k] for k in s1}, x)
        losses.append(float(F.cross_entropy(logits, y)))
        errors.append(float((logits.argmax(1) != y).double().mean()))
    return torch.tensor(losses, dtype=DT), torch.tensor(errors, dtype=DT)


@pytest.mark.parametrize("name", ["cnn1d", "mlp"])
def test_barriers_match_plain_loop(tmp_path, name):
    model_fn = MODELS[name]
    data = _data()
    sa, sb = _state(model_fn, 1), _state(model_fn, 2)
    params = merge.Params(points=7, train_subset=0)
    row = merge.compute(_ctx(model_fn().double(), [sa, sb], data, tmp_path), params)["merge"][0]
    chain = merge.layer_chain(model_fn())
    perms, sweeps = merge.match_weights(chain, sa, sb, params.sweeps, params.seed)
    sm = merge.permute_state(chain, sb, perms)
    alphas = [i / 6 for i in range(7)]
    for path, other in (("naive", sb), ("matched", sm)):
        for split, x, y in (("test", data.x_test, data.y_test), ("train", data.x_train, data.y_train)):
            loss, err = _plain_curve(model_fn, sa, other, alphas, x, y)
            expected = float(loss.max() - 0.5 * (loss[0] + loss[-1]))
            assert row[f"{path}_loss_barrier_{split}"] == pytest.approx(expected, abs=1e-12)
            expected = float(err.max() - 0.5 * (err[0] + err[-1]))
            assert row[f"{path}_error_barrier_{split}"] == pytest.approx(expected, abs=1e-12)
        mid, _ = _plain_curve(model_fn, sa, other, [0.5], data.x_test, data.y_test)
        assert row[f"{path}_midpoint_test_loss"] == pytest.approx(float(mid[0]), abs=1e-12)
    assert row["weight_distance_naive"] == pytest.approx(_distance(sa, sb), abs=1e-12)
    assert row["weight_distance_matched"] == pytest.approx(_distance(sa, sm), abs=1e-12)
    assert row["sweeps"] == sweeps and row["points"] == 7 and row["n_train"] == 60 and row["n_test"] == 40


def test_barrier_at_endpoints_is_exact(tmp_path):
    """Both paths share their endpoints' functions, so a 2-point grid gives barriers of exactly
    ½|Q(0) − Q(1)| and the same number on both paths."""
    data = _data()
    sa, sb = _state(_mlp, 1), _state(_mlp, 2)
    row = merge.compute(_ctx(_mlp().double(), [sa, sb], data, tmp_path), merge.Params(points=2))["merge"][0]
    la, _ = _plain_curve(_mlp, sa, sb, [0.0, 1.0], data.x_test, data.y_test)
    assert row["naive_loss_barrier_test"] == pytest.approx(0.5 * abs(float(la[0] - la[1])), abs=1e-12)
    assert row["matched_loss_barrier_test"] == pytest.approx(row["naive_loss_barrier_test"], abs=1e-12)


def test_unsupported_model_is_a_probe_error(tmp_path):
    def fn():
        return PatchNet((1, LENGTH), CLASSES, width=4, patches=2)

    s = _state(fn, 0)
    with pytest.raises(ProbeError, match="PatchNet"):
        merge.compute(_ctx(fn().double(), [s, s], _data(), tmp_path), merge.Params(points=3))


def test_non_finite_checkpoint_is_skipped(tmp_path):
    sa, sb = _state(_cnn, 1), dict(_state(_cnn, 2))
    sb["readout.weight"] = torch.full_like(sb["readout.weight"], float("nan"))
    with pytest.raises(ProbeSkipped, match="non-finite"):
        merge.compute(_ctx(_cnn().double(), [sa, sb], _data(), tmp_path), merge.Params(points=3))


def test_infinite_loss_is_skipped(tmp_path):
    sa, sb = _state(_mlp, 1), dict(_state(_mlp, 2))
    sb["net.4.bias"] = torch.tensor([1e308, -1e308, 0.0, 0.0], dtype=DT)  # finite weights, inf loss
    with pytest.raises(ProbeSkipped, match="non-finite"):
        merge.compute(_ctx(_mlp().double(), [sa, sb], _data(), tmp_path), merge.Params(points=3))


class _Study:
    def __init__(self, runs):
        self.runs = runs


def _run(rid, seed, variant="base", kind="parent", status="finished", cks=(0, 10)):
    refs = tuple(CheckpointRef(f"{rid}-{s}", rid, s, s / 10, "0" * 64) for s in cks)
    return RunRef(rid, kind, seed, variant, status, None, None, None, None, 4.0, 0.1, 8, 0.9, 0.0, 0, refs)


def test_plan_pairs_seeds_of_one_variant():
    study = _Study([
        _run("b2", 2), _run("b0", 0), _run("b1", 1),
        _run("w0", 0, "wide"), _run("w1", 1, "wide", status="running"),
        _run("n0", 0, "narrow"), _run("n3", 3, "narrow", status="diverged"),
        _run("c", 5, kind="child"),
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
