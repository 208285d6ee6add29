"""Training step time of the default MNIST-1D CNN with one torch thread vs torch's default,
measured in the same process, on an idle machine and beside ``--load`` competing processes
(what a 2-core machine running two training workers, or anything else, looks like). The trainer
pins one thread and gets its parallelism from separate worker processes; this is why.

    python benchmarks/training.py [--steps 300] [--load 1]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from lsdb.spec import DataSpec, ModelSpec
from lsdb.train.data import load_data
from lsdb.train.models import build_model


def ms_per_step(threads: int, steps: int) -> float:
    torch.set_num_threads(threads)
    data = load_data(DataSpec())
    model = build_model(ModelSpec(), data.input_shape, data.num_classes, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for i in range(steps + 20):  # 20 warm-up steps
        if i == 20:
            t0 = time.perf_counter()
        idx = torch.randint(0, data.x_train.shape[0], (64,), generator=g)
        loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps * 1000


def _busy():
    torch.set_num_threads(1)
    a = torch.randn(512, 512)
    while True:
        a = torch.tanh(a @ a)


def main(argv=None):
    import multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--load", type=int, default=1, help="competing single-thread processes")
    args = ap.parse_args(argv)
    default = torch.get_num_threads()
    for label, n in (("idle", 0), (f"{args.load} busy process(es) beside", args.load)):
        hogs = [mp.get_context("spawn").Process(target=_busy, daemon=True) for _ in range(n)]
        for h in hogs:
            h.start()
        try:
            one = ms_per_step(1, args.steps)
            many = ms_per_step(default, args.steps)
        finally:
            for h in hogs:
                h.terminate()
        print(f"{label}: 1 thread {one:.2f} ms/step; {default} threads {many:.2f} ms/step; "
              f"ratio {many / one:.2f}x (>1 means one thread is faster)")


if __name__ == "__main__":
    main()
