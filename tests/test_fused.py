"""The fused oneDNN evaluator (probes/_fused.py) against the models' own forward pass (float32, CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lsdb.errors import ProbeError
from lsdb.probes import _directions as D
from lsdb.probes import barrier
from lsdb.probes._fused import fused_forward
from lsdb.train.models import CNN1d, CNN2d, MLP, PatchNet
from tests import tiny_cases as tc

def _state(model):
    return {k: v.detach() for k, v in model.state_dict().items()}


def _cnn():
    """A one-layer CNN1d on length-12 signals, 4 classes (float32, weights from the global generator)."""
    return CNN1d((1, 12), 4, width=4, kernels=(3,))


_mlp = MLP((4,), 2)
pytestmark = pytest.mark.skipif(fused_forward(_mlp, _state(_mlp), torch.randn(3, 4)) is None,
                                reason="this torch build has no oneDNN")

CASES = [
    ("cnn1d", lambda: CNN1d((1, 40), 10, width=8, kernels=(5, 3, 3)), (37, 40)),
    ("cnn1d, two input channels", lambda: CNN1d((2, 16), 3, width=4, kernels=(3,)), (9, 2, 16)),
    ("cnn2d", lambda: CNN2d((3, 9, 9), 5, width=6, depth=2), (11, 3, 9, 9)),
    ("mlp", lambda: MLP((40,), 10, width=16, depth=2), (13, 40)),
]


@pytest.mark.parametrize("name,make,shape", CASES, ids=[c[0] for c in CASES])
def test_fused_forward_equals_model(name, make, shape):
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(*shape)
    params = _state(model)
    fwd = fused_forward(model, params, x)
    assert fwd is not None
    with torch.no_grad():
        torch.testing.assert_close(fwd(params, x), model(x), rtol=1e-5, atol=1e-6)
        # other parameters than the module's own: the point's tensors are used, not the module's
        other = {k: v + 0.1 * torch.randn_like(v) for k, v in params.items()}
        moved = copy.deepcopy(model)
        moved.load_state_dict(other)
        torch.testing.assert_close(fwd(other, x), moved(x), rtol=1e-5, atol=1e-6)


def test_not_applicable_falls_back():
    cnn = _cnn()
    x = torch.randn(3, 1, 12)
    assert fused_forward(cnn.double(), _state(cnn.double()), x.double()) is None  # float32 only
    cnn = cnn.float()
    assert fused_forward(cnn, _state(cnn), x.to("meta")) is None  # CPU only (the GPU takes vmap)
    patch = PatchNet((1, 12), 4)
    assert fused_forward(patch, _state(patch), x) is None  # lists no layers
    bn = _cnn()
    bn.features[1] = nn.BatchNorm1d(4)  # a layer kind the evaluator does not know
    assert fused_forward(bn, _state(bn), x) is None


def test_self_check_rejects_a_wrong_kernel(monkeypatch):
    """A fused pass that runs but disagrees with functional_call is not used."""
    import lsdb.probes._fused as fused_mod

    cnn = _cnn()
    x = torch.randn(3, 1, 12)
    assert fused_forward(cnn, _state(cnn), x) is not None
    real = fused_mod._conv

    def off_by_one(name, m, attr):
        conv = real(name, m, attr)
        return lambda p, h: conv(p, h).to_dense() + 1.0

    monkeypatch.setattr(fused_mod, "_conv", off_by_one)
    assert fused_forward(cnn, _state(cnn), x) is None


def test_explicit_fused_mode_names_the_reason():
    model = PatchNet((1, 12), 4)
    basis = [_state(model)]
    x, y = torch.randn(5, 1, 12), torch.randint(0, 4, (5,))
    with pytest.raises(ProbeError, match="PatchNet"):
        D.evaluate_combinations(model, basis, torch.ones(1, 1), {}, x, y, mode="fused")
    # auto falls back to the functional loop and agrees with it
    auto = D.evaluate_combinations(model, basis, torch.ones(1, 1), {}, x, y, mode="auto")
    loop = D.evaluate_combinations(model, basis, torch.ones(1, 1), {}, x, y, mode="loop")
    assert torch.equal(auto.loss, loop.loss)


def test_barrier_fused_matches_plain_loop(tmp_path):
    """The barrier probe in float32 (auto = fused on the CPU) against load_state_dict at each α."""
    case, f32 = tc.case("cnn40"), torch.float32
    data = case.data(f32)
    states = case.states(1, 2, dtype=f32)
    model = case.model(None, f32)
    ctx = tc.context(model, data, tmp_path, states=states, dtype=f32, role="siblings")
    curve = barrier.compute(ctx, barrier.Params(points=6, train_subset=0, batch_size=32))["barrier_curve"]
    losses, errors = tc.interpolation_curve(model, *states, [row["alpha"] for row in curve], data.x_test, data.y_test)
    for row, loss, error in zip(curve, losses.tolist(), errors.tolist()):
        assert row["test_loss"] == pytest.approx(loss, rel=1e-5)
        assert row["test_error"] == pytest.approx(error)


def test_auto_takes_the_fused_path_on_the_cpu(monkeypatch):
    calls = []
    real = D._evaluate_loop

    def spy(*args, **kwargs):
        calls.append(kwargs.get("forward"))
        return real(*args, **kwargs)

    monkeypatch.setattr(D, "_evaluate_loop", spy)
    model = _cnn()
    basis = [_state(model)]
    x, y = torch.randn(5, 1, 12), torch.randint(0, 4, (5,))
    D.evaluate_combinations(model, basis, torch.ones(1, 1), {}, x, y)
    D.evaluate_combinations(model, basis, torch.ones(1, 1), {}, x, y, mode="loop")
    assert calls[0] is not None and calls[1] is None
