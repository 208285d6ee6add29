"""The two methods of ``kernel_accuracy`` on the default MNIST-1D CNN, each against a baseline in
the same process.

1. Training the linearised model (method "linearised"): the cached layer-wise tangent with its
   hand-written backward pass (lsdb's default for models that list their layers) against the jvp
   at w_t, differentiated by autograd (lsdb's fallback) and by ``torch.func.grad`` (the earliest
   code). Same checkpoint, data, seeds and steps. Prints seconds per SGD step (batch 64, momentum
   0.9, best of the interleaved rounds), the ratio to the ``torch.func.grad`` baseline, and the
   largest difference of the trained δ from the baseline's.
2. Kernel regression's predictions (method "kernel_regression"): the kernel machine J(x*)·M against
   the cross kernel Θ(x*, X) times α.

    python benchmarks/kernel_accuracy.py [--steps 300] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import grad_and_value

from lsdb.probes import _ntk_core as core
from lsdb.probes import kernel_accuracy as ka
from lsdb.spec import DataSpec, ModelSpec
from lsdb.train.data import load_data
from lsdb.train.models import build_model


def func_grad_training(net, x, y, lr, steps, batch, momentum, seed):
    """The earlier implementation: torch.func.grad_and_value of the jvp-linearised loss."""
    step_fn = grad_and_value(lambda d, xb, yb: torch.nn.functional.cross_entropy(ka.linearised_logits(net, d, xb), yb))
    delta = {k: torch.zeros_like(v) for k, v in net.params.items()}
    buf = {k: torch.zeros_like(v) for k, v in net.params.items()}
    gen = torch.Generator().manual_seed(seed)
    n, order, pos = x.shape[0], None, x.shape[0]
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos : pos + batch]
        pos += batch
        g, _ = step_fn(delta, x[idx], y[idx])
        with torch.no_grad():
            for k in delta:
                buf[k].mul_(momentum).add_(g[k])
                delta[k].sub_(lr * buf[k])
    return delta


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = load_data(DataSpec())
    model = build_model(ModelSpec(), data.input_shape, data.num_classes, seed=0)
    net = core.bind(model, model.state_dict(), "cpu", torch.float32)
    x, y = data.x_train, data.y_train
    lr, batch, mom, seed = 0.01, 64, 0.9, 0

    t = time.perf_counter()
    cached = ka.CachedLinearisation.build(model, net.params, x, budget_mb=1024)
    build_s = time.perf_counter() - t
    methods = {
        "jvp, torch.func.grad (earlier)": lambda: func_grad_training(net, x, y, lr, args.steps, batch, mom, seed),
        "jvp, autograd (fallback)": lambda: ka.train_linearised(net, x, y, lr=lr, steps=args.steps, batch_size=batch,
                                                                momentum=mom, seed=seed),
        "cached tangent (default)": lambda: ka.train_linearised(net, x, y, lr=lr, steps=args.steps, batch_size=batch,
                                                                momentum=mom, seed=seed, cached=cached),
    }
    best = {k: float("inf") for k in methods}
    out = {}
    for _ in range(args.rounds):
        for name, fn in methods.items():
            t = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    print(f"default CNN, P = {net.num_params}, {x.shape[0]} training inputs, {args.steps} steps of batch {batch}, "
          f"threads {torch.get_num_threads()}; cache built in {build_s:.3f} s")
    base_name = next(iter(methods))
    for name in methods:
        diff = max(float((out[name][k] - out[base_name][k]).abs().max()) for k in out[name])
        print(f"  {name:32s} {best[name] / args.steps * 1e3:6.2f} ms/step  {best[base_name] / best[name]:5.2f}x  "
              f"max |Δδ| {diff:.1e}")
    regression(net, data, args.rounds)


def cross_kernel_predictions(net, x_fit, onehot, x_eval, lam, chunk):
    """The earlier kernel-regression predictions: the cross kernel Θ(x*, X) from both Jacobians,
    times α = (Θ(X, X) + λI)⁻¹(Y − f(X)) (trace kernel)."""
    with torch.no_grad():
        f_fit, f_eval = net(x_fit), net(x_eval)
    k_fit = core.ntk(net, x_fit, "trace", chunk=chunk)
    alpha = torch.linalg.solve(k_fit + lam * torch.eye(k_fit.shape[0]), onehot - f_fit)
    return f_eval + core.cross_ntk(net, x_eval, x_fit, "trace", chunk) @ alpha


def regression(net, data, rounds):
    """Kernel regression on a probe set of 256 training inputs, predicting the 1,000 test inputs
    and the probe set itself (what a ``kernel_regression`` row evaluates): the kernel machine
    (J(x*)·M, the probe's way) against the cross kernel (the earlier way), interleaved."""
    x_fit, x_test = data.x_train[:256], data.x_test
    onehot = torch.nn.functional.one_hot(data.y_train[:256], data.num_classes).float()
    lam = 1e-3 * float(core.trace_ntk_diagonal(net, x_fit, 256).mean())
    methods = {
        "cross kernel (earlier)": lambda: torch.cat([cross_kernel_predictions(net, x_fit, onehot, x, lam, 256)
                                                     for x in (x_fit, x_test)]),
        "kernel machine J(x*)·M (default)": lambda: torch.cat(
            [ka.KernelMachine(net, x_fit, onehot, lam, "trace", 256)(x) for x in (x_fit, x_test)]),
    }
    best, out = {k: float("inf") for k in methods}, {}
    for _ in range(rounds):
        for name, fn in methods.items():
            t = time.perf_counter()
            out[name] = fn()
            best[name] = min(best[name], time.perf_counter() - t)
    base = next(iter(methods))
    print(f"kernel regression, trace kernel, 256 fitted, {x_fit.shape[0] + x_test.shape[0]} predicted:")
    for name in methods:
        diff = float((out[name] - out[base]).abs().max() / out[base].abs().max())
        agree = float((out[name].argmax(1) == out[base].argmax(1)).float().mean())
        print(f"  {name:32s} {best[name]:6.3f} s  {best[base] / best[name]:5.2f}x  max |Δ logit| / max |logit| "
              f"{diff:.1e}, same prediction on {agree:.1%}")


if __name__ == "__main__":
    main()
