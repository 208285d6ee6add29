"""barrier probe against a plain loop over α with load_state_dict (float64, tiny nets)."""

from __future__ import annotations

import copy

import pytest
import torch

from lsdb.errors import ProbeSkipped
from lsdb.probes import _directions as D
from lsdb.probes import barrier
from lsdb.probes.base import JobRequest
from tests import tiny_cases as tc

DT = tc.DT
CNN, BN = tc.case("cnn12"), tc.case("bn12")  # both on the same data: 60 train / 40 test signals


def _setup(case=CNN):
    """The data, a model to load states into, and two independently initialised states (seeds 1, 2)."""
    return case.data(), case.model(None), *case.states(1, 2)


def _ctx(model, states, data, tmp_path):
    return tc.context(model, data, tmp_path, states=states, role="siblings")


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_curve_matches_plain_loop(tmp_path, mode):
    data, model, s1, s2 = _setup()
    params = barrier.Params(points=11, train_subset=25, mode=mode)
    out = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), params)
    curve = out["barrier_curve"]
    alphas = [r["alpha"] for r in curve]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(alphas) == 11

    idx = tc.train_subset(60, 25)
    ref_tr = tc.interpolation_curve(model, s1, s2, alphas, data.x_train[idx], data.y_train[idx])
    ref_te = tc.interpolation_curve(model, s1, s2, alphas, data.x_test, data.y_test)
    got = {k: torch.tensor([r[k] for r in curve], dtype=DT) for k in curve[0]}
    torch.testing.assert_close(got["train_loss"], ref_tr[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["train_error"], ref_tr[1], rtol=0, atol=0)
    torch.testing.assert_close(got["test_loss"], ref_te[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got["test_error"], ref_te[1], rtol=0, atol=0)

    row = out["barrier"][0]
    tl = ref_te[0]
    a = torch.tensor(alphas, dtype=DT)
    assert row["loss_barrier_test"] == pytest.approx(float(tl.max() - 0.5 * (tl[0] + tl[-1])), abs=1e-12)
    excess = tl - ((1 - a) * tl[0] + a * tl[-1])
    assert row["entezari_loss_barrier_test"] == pytest.approx(float(excess.max()), abs=1e-12)
    assert row["entezari_argmax_alpha_loss_test"] == alphas[int(excess.argmax())]
    te = ref_te[1]
    assert row["error_barrier_test"] == pytest.approx(float(te.max() - 0.5 * (te[0] + te[-1])), abs=1e-12)

    # child disagreement and weight distance from scratch
    with torch.no_grad():
        m = copy.deepcopy(model)
        m.load_state_dict(s1)
        p1 = m(data.x_test).argmax(1)
        m.load_state_dict(s2)
        p2 = m(data.x_test).argmax(1)
    dis = float((p1 != p2).double().mean())
    assert row["disagreement"] == pytest.approx(dis)
    assert row["disagreement_over_error"] == pytest.approx(dis / (0.5 * float(te[0] + te[-1])))
    dist = torch.sqrt(sum(((s1[k] - s2[k]) ** 2).sum() for k in s1))
    assert row["weight_distance"] == pytest.approx(float(dist), rel=1e-12)


def test_endpoints_exact(tmp_path):
    data, model, s1, s2 = _setup()
    curve = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), barrier.Params(points=5, train_subset=0))["barrier_curve"]
    for state, row in ((s1, curve[0]), (s2, curve[-1])):
        # equal up to summation order (grouped vs plain convolution)
        for split, x, y in (("test", data.x_test, data.y_test), ("train", data.x_train, data.y_train)):
            assert row[f"{split}_loss"] == pytest.approx(tc.loss_and_error(model, x, y, state)[0], rel=1e-14)
    # the path's end points are the checkpoints bit for bit
    ends = D.combine([s1, s2], torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT))
    for k in s1:
        if s1[k].is_floating_point():
            assert torch.equal(ends[k][0], s1[k]) and torch.equal(ends[k][1], s2[k])


def test_identical_endpoints_zero_barrier(tmp_path):
    data, model, s1, _ = _setup()
    row = barrier.compute(_ctx(model, [s1, dict(s1)], data, tmp_path), barrier.Params(points=7))["barrier"][0]
    for key in ("loss_barrier_train", "loss_barrier_test", "error_barrier_test", "entezari_loss_barrier_test",
                "entezari_error_barrier_train", "disagreement", "weight_distance"):
        assert abs(row[key]) < 1e-12, key


def test_batchnorm_stats_recomputed(tmp_path):
    data, model, s1, s2 = _setup(BN)
    # give the stored running statistics values that a recompute must overwrite
    s2["bn.running_mean"] += 3.0
    params = barrier.Params(points=5, train_subset=30, batch_size=1000)
    out = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), params)
    assert out["barrier"][0]["bn_recomputed"] is True
    alphas = [r["alpha"] for r in out["barrier_curve"]]
    idx = tc.train_subset(60, 30)
    ref = tc.interpolation_curve(model, s1, s2, alphas, data.x_test, data.y_test, bn_stats_from=data.x_train[idx])
    got = torch.tensor([r["test_loss"] for r in out["barrier_curve"]], dtype=DT)
    torch.testing.assert_close(got, ref[0], rtol=1e-10, atol=1e-12)
    # and without the recompute the interpolated stored statistics are used
    out2 = barrier.compute(_ctx(model, [s1, s2], data, tmp_path),
                           barrier.Params(points=5, train_subset=30, bn_recompute=False))
    ref2 = tc.interpolation_curve(model, s1, s2, alphas, data.x_test, data.y_test)
    got2 = torch.tensor([r["test_loss"] for r in out2["barrier_curve"]], dtype=DT)
    torch.testing.assert_close(got2, ref2[0], rtol=1e-10, atol=1e-12)
    assert out2["barrier"][0]["bn_recomputed"] is False


def test_non_finite_is_skipped(tmp_path):
    data, model, s1, s2 = _setup()
    s2 = dict(s2)
    s2["readout.weight"] = torch.full_like(s2["readout.weight"], float("nan"))
    with pytest.raises(ProbeSkipped, match="non-finite"):
        barrier.compute(_ctx(model, [s1, s2], data, tmp_path), barrier.Params(points=3))


def _child(rid, steps, index):
    return tc.run_ref(rid, steps, kind="child", parent="p", parent_checkpoint="p-10", spawn_epoch=1.0,
                      child_index=index)


def test_plan_pairs():
    p = tc.run_ref("p", [0, 10, 20])
    c1 = _child("c1", [10, 30], 0)
    c2 = _child("c2", [10, 40], 1)
    running = tc.run_ref("q", [0, 5], status="running")
    study = tc.FakeStudy([p, c1, c2, running])
    jobs = barrier.plan(study, barrier.Params(pairs=("p@10 c1@final", "q@0 q@final")))
    assert JobRequest(("c1-30", "c2-40"), "p-10", "siblings") in jobs
    assert JobRequest(("p-0", "p-20"), "p-0", "init_final") in jobs
    assert JobRequest(("p-10", "c1-30"), "p-10", "pair") in jobs
    assert len(jobs) == 3  # the running parent gets no init_final pair and no 'final' yet
