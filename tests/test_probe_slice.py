"""slice probe against a plain loop that loads w + a·d₁ + b·d₂ and evaluates (float64)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lsdb.errors import ProbeSkipped, SpecError
from lsdb.probes import _directions as D
from lsdb.probes import slice as slice_probe
from lsdb.probes.base import Artifacts, CheckpointRef, JobRequest, ProbeContext, RunRef
from lsdb.train.data import Data
from lsdb.train.models import CNN1d

DT = torch.float64


def _setup():
    torch.manual_seed(0)
    model = CNN1d((1, 16), 3, width=4, kernels=(3, 3)).double()
    g = torch.Generator().manual_seed(2)
    data = Data("toy", torch.randn(50, 1, 16, generator=g, dtype=DT), torch.randint(0, 3, (50,), generator=g),
                torch.randn(30, 1, 16, generator=g, dtype=DT), torch.randint(0, 3, (30,), generator=g), 3)
    return model, data


def _ctx(model, data, tmp_path, state=None):
    state = state or {k: v.clone() for k, v in model.state_dict().items()}
    return ProbeContext(model=model, states=[state], checkpoints=[CheckpointRef("c", "r", 0, 0.0, "0" * 64)],
                        runs=[], data=data, probe_indices=torch.arange(4), device=torch.device("cpu"), dtype=DT,
                        artifacts=Artifacts(tmp_path))


@pytest.mark.parametrize("mode", ["vmap", "loop"])
def test_surfaces_match_plain_loop(tmp_path, mode):
    model, data = _setup()
    params = slice_probe.Params(points_1d=7, points_2d=5, train_subset=0, range_min=-0.5, range_max=1.0, mode=mode)
    rows = slice_probe.compute(_ctx(model, data, tmp_path), params)["slice"]
    assert len(rows) == 2 * 7 + 2 * 25
    w = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    d1 = D.filter_normalised_direction(model, w, gen)
    d2 = D.filter_normalised_direction(model, w, gen)
    m = copy.deepcopy(model)
    for r in rows:
        b = r["b"] if r["dims"] == 2 else 0.0
        m.load_state_dict({k: w[k] + r["a"] * d1[k] + b * d2[k] for k in w})
        x, y = (data.x_train, data.y_train) if r["split"] == "train" else (data.x_test, data.y_test)
        with torch.no_grad():
            logits = m(x)
        assert r["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)
        assert r["error"] == pytest.approx(float((logits.argmax(1) != y).double().mean()), abs=1e-15)
    one = [r for r in rows if r["dims"] == 1 and r["split"] == "test"]
    assert [r["a"] for r in one] == pytest.approx(torch.linspace(-0.5, 1.0, 7, dtype=DT).tolist())
    assert all(r["b"] is None for r in one)
    two = {(r["a"], r["b"]) for r in rows if r["dims"] == 2 and r["split"] == "train"}
    assert len(two) == 25


def test_plan_and_errors(tmp_path):
    refs = tuple(CheckpointRef(f"c{s}", "r", s, float(s), "0" * 64) for s in range(3))
    run = RunRef("r", "parent", 0, "base", "finished", None, None, None, None, 2.0, 0.1, 8, 0.9, 0.0, 0, refs)

    class Study:
        runs = [run]

    assert slice_probe.plan(Study(), slice_probe.Params()) == [JobRequest(("c2",), "c2")]
    assert len(slice_probe.plan(Study(), slice_probe.Params(which="all"))) == 3
    with pytest.raises(SpecError, match="'final' or 'all'"):
        slice_probe.plan(Study(), slice_probe.Params(which="some"))
    model, data = _setup()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["readout.bias"][0] = float("nan")
    with pytest.raises(ProbeSkipped, match="non-finite"):
        slice_probe.compute(_ctx(model, data, tmp_path, state), slice_probe.Params(points_1d=3, dims=(1,)))
