"""Training the linearised model (kernel_accuracy, method "linearised") on the default MNIST-1D CNN:
the cached layer-wise tangent (lsdb's default for models that list their layers) against the jvp
at w_t, differentiated by autograd (lsdb's fallback) and by ``torch.func.grad`` (the earlier code).
Same checkpoint, data, seeds and steps, same process.

    python benchmarks/kernel_accuracy.py [--steps 300] [--threads 1]

Prints seconds per SGD step (batch 64, momentum 0.9, best of 3 interleaved runs), the ratio to the
``torch.func.grad`` baseline, and the largest difference of the trained δ from the baseline's.
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
    for _ in range(3):
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


if __name__ == "__main__":
    main()
