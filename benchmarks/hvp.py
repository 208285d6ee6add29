"""Hessian-vector products: lsdb's layer-wise R-operator (``hvp = "auto"`` on plain-layer models)
against double backward through autograd (the fallback) and forward-over-reverse, per product.

    python benchmarks/hvp.py [--threads 1] [--products 40]

Models: the full study's CNN (cnn1d, MNIST-1D, width 32) at the batches the probes use (64: the
batch sharpness; 512: the Hessian's fixed batch) and the quick study's cnn2d on digits (width 16,
batch 128), each trained 100 SGD steps so that ReLUs are in a realistic state. The methods run
interleaved, three rounds; each row is the best round, the ratio double backward's time over the
method's, and the largest relative difference of the products from double backward's.
"""

from __future__ import annotations

import argparse
import time

import torch

from lsdb.probes import hessian as H
from lsdb.spec import DataSpec, ModelSpec
from lsdb.train.data import load_data
from lsdb.train.models import build_model

CASES = (("cnn1d, MNIST-1D", DataSpec(), ModelSpec(), (64, 512)),
         ("cnn2d, digits", DataSpec(name="digits"), ModelSpec(name="cnn2d", width=16, depth=2), (128,)))


def trained(data_spec, model_spec):
    data = load_data(data_spec)
    model = build_model(model_spec, data.input_shape, data.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(100):
        idx = torch.randint(0, data.x_train.shape[0], (64,), generator=g)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    return model.eval(), data


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--products", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}, {args.products} products per round, best of 3 rounds")
    print(f"{'model':18s} {'batch':>5s} {'method':16s} {'ms/HVP':>7s} {'set-up ms':>9s} {'vs double backward':>18s} "
          f"{'max rel diff':>12s}")
    for label, data_spec, model_spec, batches in CASES:
        model, data = trained(data_spec, model_spec)
        params = {k: v.detach() for k, v in model.named_parameters()}
        for b in batches:
            x, y = data.x_train[:b], data.y_train[:b]
            V = torch.randn(args.products, sum(p.numel() for p in params.values()),
                            generator=torch.Generator().manual_seed(1))
            best, setup, out = {}, {}, {}
            for _ in range(3):
                for method in ("double_backward", "layers", "fwd_rev"):
                    t = time.perf_counter()
                    op = H.make_operator(model, params, {}, x, y, method, 8)
                    made = time.perf_counter() - t
                    t = time.perf_counter()
                    out[method] = op.matmat(V)
                    took = (time.perf_counter() - t) / args.products
                    best[method] = min(best.get(method, float("inf")), took)
                    setup[method] = min(setup.get(method, float("inf")), made)
            ref = out["double_backward"]
            for method in best:
                diff = float(((out[method] - ref).norm(dim=1) / ref.norm(dim=1)).max())
                print(f"{label:18s} {b:5d} {method:16s} {best[method] * 1e3:7.2f} {setup[method] * 1e3:9.1f} "
                      f"{best['double_backward'] / best[method]:17.2f}x {diff:12.1e}")


if __name__ == "__main__":
    main()
