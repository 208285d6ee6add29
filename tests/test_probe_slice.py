"""slice probe against a plain loop that loads w + a·d₁ + b·d₂ and evaluates (float64)."""

from __future__ import annotations

import copy

import pytest
import torch

from lsdb.errors import ProbeSkipped, SpecError
from lsdb.probes import _directions as D
from lsdb.probes import slice as slice_probe
from lsdb.probes.base import JobRequest
from tests import tiny_cases as tc

DT = tc.DT
CASE = tc.case("cnn16")  # CNN1d on 50 train / 30 test signals of length 16, 3 classes


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_surfaces_match_plain_loop(tmp_path, mode):
    model, data = CASE.model(), CASE.data()
    params = slice_probe.Params(points_1d=7, points_2d=5, train_subset=0, range_min=-0.5, range_max=1.0, mode=mode)
    rows = slice_probe.compute(tc.context(model, data, tmp_path), params)["slice"]
    assert len(rows) == 2 * 7 + 2 * 25
    w = tc.clone_state(model)
    gen = torch.Generator().manual_seed(0)
    d1 = D.filter_normalised_direction(model, w, gen)
    d2 = D.filter_normalised_direction(model, w, gen)
    m = copy.deepcopy(model)
    for r in rows:
        b = r["b"] if r["dims"] == 2 else 0.0
        m.load_state_dict({k: w[k] + r["a"] * d1[k] + b * d2[k] for k in w})
        x, y = (data.x_train, data.y_train) if r["split"] == "train" else (data.x_test, data.y_test)
        loss, error = tc.loss_and_error(m, x, y)
        assert r["loss"] == pytest.approx(loss, rel=1e-12)
        assert r["error"] == pytest.approx(error, abs=1e-15)
    one = [r for r in rows if r["dims"] == 1 and r["split"] == "test"]
    assert [r["a"] for r in one] == pytest.approx(torch.linspace(-0.5, 1.0, 7, dtype=DT).tolist())
    assert all(r["b"] is None for r in one)
    two = {(r["a"], r["b"]) for r in rows if r["dims"] == 2 and r["split"] == "train"}
    assert len(two) == 25


def test_plan_and_errors(tmp_path):
    study = tc.FakeStudy([tc.run_ref(checkpoints=tc.checkpoint_refs(3), epochs=2.0)])
    assert slice_probe.plan(study, slice_probe.Params()) == [JobRequest(("c2",), "c2")]
    assert len(slice_probe.plan(study, slice_probe.Params(which="all"))) == 3
    with pytest.raises(SpecError, match="'final' or 'all'"):
        slice_probe.plan(study, slice_probe.Params(which="some"))
    model, data = CASE.model(), CASE.data()
    state = tc.clone_state(model)
    state["readout.bias"][0] = float("nan")
    with pytest.raises(ProbeSkipped, match="non-finite"):
        slice_probe.compute(tc.context(model, data, tmp_path, states=[state]), slice_probe.Params(points_1d=3, dims=(1,)))
