"""The hand-written backward pass of the cached linearisation (probes._layerwise) against
autograd through the jvp at w_t, in float64, on every layer arrangement it accepts."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lsdb.probes import _ntk_core as core
from lsdb.probes import kernel_accuracy as ka
from lsdb.train.models import CNN1d, CNN2d, MLP

DT = torch.float64


class Odd(nn.Module):
    """Layers the studies' models do not use: dilation, 2D stride 1 with padding, a rectangular
    kernel, and a ReLU after the flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, (3, 2), stride=(1, 2), padding=(1, 1), dilation=(2, 1)),
                                      nn.ReLU(), nn.Conv2d(3, 4, 3, stride=1, padding=1), nn.ReLU())
        self.flatten = nn.Flatten()
        self.act = nn.ReLU()
        self.readout = nn.Linear(4 * 3 * 4, 3)

    def prepare(self, x):
        return x

    def steps(self):
        return [("features.0", self.features[0]), ("features.1", self.features[1]), ("features.2", self.features[2]),
                ("features.3", self.features[3]), ("flatten", self.flatten), ("act", self.act),
                ("readout", self.readout)]

    def forward(self, x):
        h = self.prepare(x)
        for _, m in self.steps():
            h = m(h)
        return h


MODELS = {
    "cnn1d": (lambda: CNN1d((1, 20), 3, width=8, kernels=(5, 3, 3)), (20,)),
    "cnn2d": (lambda: CNN2d((1, 7, 7), 3, width=3, depth=2), (1, 7, 7)),
    "mlp": (lambda: MLP((6,), 3, width=5, depth=2), (6,)),
    "odd": (Odd, (2, 5, 6)),
}


def setup(name, scope=()):
    make, shape = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(11, *shape, dtype=DT) + 0.5  # inputs that keep the small nets' ReLUs alive
    y = torch.randint(0, 3, (11,))
    net = core.bind(model, model.state_dict(), "cpu", DT, scope)
    g = torch.Generator().manual_seed(1)
    delta = {k: 0.3 * torch.randn(v.shape, generator=g, dtype=DT) for k, v in net.params.items()}
    return model, net, x, y, delta


def reference_grad(net, x, y, delta, idx, loss):
    leaves = {k: v.clone().requires_grad_(True) for k, v in delta.items()}
    logits = ka.linearised_logits(net, leaves, x[idx])
    value = torch.nn.functional.cross_entropy(logits, y[idx]) if loss == "ce" else \
        0.5 * (logits - y[idx]).pow(2).sum(-1).mean()
    return dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_hand_written_gradient_is_autograd_of_the_jvp(name, loss):
    model, net, x, y, delta = setup(name)
    cached = ka.CachedLinearisation.build(model, net.params, x, 16.0, net.buffers)
    assert cached is not None
    idx = torch.tensor([5, 0, 7, 7, 2])
    target = y if loss == "ce" else torch.nn.functional.one_hot(y, 3).to(DT)
    torch.testing.assert_close(cached(delta, idx), ka.linearised_logits(net, delta, x[idx]), rtol=1e-12, atol=1e-12)
    got = cached.loss_grad(delta, idx, target[idx], loss)
    want = reference_grad(net, x, target, delta, idx, loss)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("scope", [("features.2.*",), ("readout.bias",), ("features.0.bias", "readout.weight"),
                                   ("features.0.weight",)])
def test_hand_written_gradient_of_a_block(scope):
    model, net, x, y, delta = setup("odd", scope)
    cached = ka.CachedLinearisation.build(model, net.params, x, 16.0, net.buffers)
    idx = torch.tensor([3, 1, 8])
    got = cached.loss_grad(delta, idx, y[idx])
    want = reference_grad(net, x, y, delta, idx, "ce")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-11, atol=1e-13)


def test_grouped_convolutions_take_the_jvp():
    model = nn.Sequential()  # a model with steps(), but a grouped convolution the patches do not cover
    conv, flat, lin = nn.Conv1d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 4, 3)
    model.prepare = lambda x: x
    model.steps = lambda: [("conv", conv), ("flatten", flat), ("lin", lin)]
    model.conv, model.flatten, model.lin = conv, flat, lin
    params = {k: v.detach() for k, v in model.named_parameters()}
    assert ka.CachedLinearisation.build(model, params, torch.randn(4, 2, 6), 16.0) is None
# ---------------------------------------------------------------------------- Hessian products

def autograd_hvp(model, net, x, y, v):
    leaves = {k: p.clone().requires_grad_(True) for k, p in net.params.items()}
    loss = torch.nn.functional.cross_entropy(torch.func.functional_call(model, {**net.buffers, **leaves}, (x,)), y)
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    hv = torch.autograd.grad(grads, list(leaves.values()), grad_outputs=[v[k] for k in leaves])
    return dict(zip(leaves, grads)), dict(zip(leaves, hv))


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("scope", [(), ("readout.*",), ("features.0.bias", "readout.weight")])
def test_layer_hessian_products_are_double_backward(name, scope):
    from lsdb.probes._layerwise import LayerHessian

    if name == "mlp" and scope:
        scope = tuple(s.replace("features.0", "net.0").replace("readout", "net.4") for s in scope)
    model, net, x, y, v = setup(name, scope)
    lh = LayerHessian.build(model, net.params, net.buffers, x, y)
    assert lh is not None
    grad, want = autograd_hvp(model, net, x, y, v)
    got = lh.hvp(v)
    assert list(got) == list(want) == list(lh.gradient)
    assert all(float(w.abs().max()) > 1e-3 for w in want.values())  # no block is trivially zero
    for k in want:
        torch.testing.assert_close(lh.gradient[k], grad[k].detach(), rtol=1e-11, atol=1e-13)
        torch.testing.assert_close(got[k], want[k], rtol=1e-10, atol=1e-12)
