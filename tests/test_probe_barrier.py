"""barrier probe against a plain loop over α with load_state_dict (float64, tiny nets)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lsdb.errors import ProbeSkipped
from lsdb.probes import _directions as D
from lsdb.probes import barrier
from lsdb.probes.base import Artifacts, CheckpointRef, JobRequest, ProbeContext, RunRef
from lsdb.train.data import Data
from lsdb.train.models import CNN1d

DT = torch.float64


def _data(n_train=60, n_test=40, length=12, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Data("toy", torch.randn(n_train, 1, length, generator=g, dtype=DT),
                torch.randint(0, classes, (n_train,), generator=g),
                torch.randn(n_test, 1, length, generator=g, dtype=DT),
                torch.randint(0, classes, (n_test,), generator=g), classes)


def _states(model_fn, seeds=(1, 2)):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append({k: v.clone() for k, v in model_fn().double().state_dict().items()})
    return out


def _ctx(model, states, data, tmp_path):
    ck = [CheckpointRef(f"c{i}", "r", i, float(i), "0" * 64) for i in range(len(states))]
    return ProbeContext(model=model, states=states, checkpoints=ck, runs=[], data=data,
                        probe_indices=torch.arange(8), device=torch.device("cpu"), dtype=DT,
                        artifacts=Artifacts(tmp_path), role="siblings")


def _plain_loop(model, s1, s2, alphas, x, y, bn=False, x_stats=None):
    """The reference: build each interpolated state dict, load it, evaluate."""
    m = copy.deepcopy(model)
    losses, errors = [], []
    for a in alphas:
        sd = {k: ((1 - a) * s1[k] + a * s2[k]) if s1[k].is_floating_point() else s1[k] for k in s1}
        m.load_state_dict(sd)
        if bn:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            with torch.no_grad():
                m(x_stats)
        m.eval()
        with torch.no_grad():
            logits = m(x)
        losses.append(float(F.cross_entropy(logits, y)))
        errors.append(float((logits.argmax(1) != y).double().mean()))
    return torch.tensor(losses, dtype=DT), torch.tensor(errors, dtype=DT)


def _cnn():
    return CNN1d((1, 12), 4, width=4, kernels=(3, 3))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_curve_matches_plain_loop(tmp_path, mode):
    data = _data()
    model = _cnn().double()
    s1, s2 = _states(_cnn)
    params = barrier.Params(points=11, train_subset=25, mode=mode)
    out = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), params)
    curve = out["barrier_curve"]
    alphas = [r["alpha"] for r in curve]
    assert alphas[0] == 0.0 and alphas[-1] == 1.0 and len(alphas) == 11

    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:25].sort().values
    ref_tr = _plain_loop(model, s1, s2, alphas, data.x_train[idx], data.y_train[idx])
    ref_te = _plain_loop(model, s1, s2, alphas, data.x_test, data.y_test)
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
    data = _data()
    model = _cnn().double()
    s1, s2 = _states(_cnn)
    curve = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), barrier.Params(points=5, train_subset=0))["barrier_curve"]
    for state, row in ((s1, curve[0]), (s2, curve[-1])):
        m = copy.deepcopy(model)
        m.load_state_dict(state)
        with torch.no_grad():  # equal up to summation order (grouped vs plain convolution)
            assert row["test_loss"] == pytest.approx(float(F.cross_entropy(m(data.x_test), data.y_test)), rel=1e-14)
            assert row["train_loss"] == pytest.approx(float(F.cross_entropy(m(data.x_train), data.y_train)), rel=1e-14)
    # the path's end points are the checkpoints bit for bit
    ends = D.combine([s1, s2], torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=DT))
    for k in s1:
        if s1[k].is_floating_point():
            assert torch.equal(ends[k][0], s1[k]) and torch.equal(ends[k][1], s2[k])


def test_identical_endpoints_zero_barrier(tmp_path):
    data = _data()
    model = _cnn().double()
    s1, _ = _states(_cnn)
    row = barrier.compute(_ctx(model, [s1, dict(s1)], data, tmp_path), barrier.Params(points=7))["barrier"][0]
    for key in ("loss_barrier_train", "loss_barrier_test", "error_barrier_test", "entezari_loss_barrier_test",
                "entezari_error_barrier_train", "disagreement", "weight_distance"):
        assert abs(row[key]) < 1e-12, key


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 3, 3)
        self.bn = nn.BatchNorm1d(3)
        self.out = nn.Linear(30, 4)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.conv(x))).flatten(1))


def test_batchnorm_stats_recomputed(tmp_path):
    data = _data()
    model = _BNNet().double()
    s1, s2 = _states(_BNNet)
    # give the stored running statistics values that a recompute must overwrite
    s2["bn.running_mean"] += 3.0
    params = barrier.Params(points=5, train_subset=30, batch_size=1000)
    out = barrier.compute(_ctx(model, [s1, s2], data, tmp_path), params)
    assert out["barrier"][0]["bn_recomputed"] is True
    alphas = [r["alpha"] for r in out["barrier_curve"]]
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(0))[:30].sort().values
    ref = _plain_loop(model, s1, s2, alphas, data.x_test, data.y_test, bn=True, x_stats=data.x_train[idx])
    got = torch.tensor([r["test_loss"] for r in out["barrier_curve"]], dtype=DT)
    torch.testing.assert_close(got, ref[0], rtol=1e-10, atol=1e-12)
    # and without the recompute the interpolated stored statistics are used
    out2 = barrier.compute(_ctx(model, [s1, s2], data, tmp_path),
                           barrier.Params(points=5, train_subset=30, bn_recompute=False))
    ref2 = _plain_loop(model, s1, s2, alphas, data.x_test, data.y_test)
    got2 = torch.tensor([r["test_loss"] for r in out2["barrier_curve"]], dtype=DT)
    torch.testing.assert_close(got2, ref2[0], rtol=1e-10, atol=1e-12)
    assert out2["barrier"][0]["bn_recomputed"] is False


def test_non_finite_is_skipped(tmp_path):
    data = _data()
    model = _cnn().double()
    s1, s2 = _states(_cnn)
    s2 = dict(s2)
    s2["readout.weight"] = torch.full_like(s2["readout.weight"], float("nan"))
    with pytest.raises(ProbeSkipped, match="non-finite"):
        barrier.compute(_ctx(model, [s1, s2], data, tmp_path), barrier.Params(points=3))


class _Study:
    def __init__(self, runs):
        self.runs = runs

    def run(self, run_id):
        return next(r for r in self.runs if r.id == run_id)


def _run(rid, kind, cks, parent=None, parent_ck=None, idx=None, status="finished"):
    refs = tuple(CheckpointRef(f"{rid}-{s}", rid, s, s / 10, "0" * 64) for s in cks)
    return RunRef(rid, kind, 0, "base", status, parent, parent_ck, 1.0 if parent else None, idx, 4.0, 0.1, 8,
                  0.9, 0.0, 0, refs)


def test_plan_pairs():
    p = _run("p", "parent", [0, 10, 20])
    c1 = _run("c1", "child", [10, 30], "p", "p-10", 0)
    c2 = _run("c2", "child", [10, 40], "p", "p-10", 1)
    running = _run("q", "parent", [0, 5], status="running")
    study = _Study([p, c1, c2, running])
    jobs = barrier.plan(study, barrier.Params(pairs=("p@10 c1@final", "q@0 q@final")))
    assert JobRequest(("c1-30", "c2-40"), "p-10", "siblings") in jobs
    assert JobRequest(("p-0", "p-20"), "p-0", "init_final") in jobs
    assert JobRequest(("p-10", "c1-30"), "p-10", "pair") in jobs
    assert len(jobs) == 3  # the running parent gets no init_final pair and no 'final' yet
