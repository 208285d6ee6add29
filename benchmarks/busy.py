"""Torch threads on a busy machine: all cores (torch's default) against the cores left free.

    python benchmarks/busy.py [--busy 1] [--repeats 3]

Starts ``--busy`` processes that spin on one core each (another user's job), then times one
probe-like workload (forward and backward passes of a small CNN on a batch, and a Hessian-vector
product) in this process with torch set to every core, and with the cores left free (what
``lsdb.probes.executors.free_cores`` picks once the load average has caught up with the other
processes; it reads the 1-minute average). Prints the two times and their ratio; then the same
with nothing else running, as a baseline for what the threads are worth on a quiet machine.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time


def _spin() -> None:
    while True:
        pass


def workload() -> float:
    import torch
    from torch import nn
    from torch.func import functional_call, grad, jvp

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                          nn.Flatten(), nn.Linear(32 * 8 * 8, 10))
    x, y = torch.randn(512, 1, 8, 8), torch.randint(0, 10, (512,))
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return nn.functional.cross_entropy(functional_call(model, p, (x,)), y)

    v = {k: torch.randn_like(t) for k, t in params.items()}
    t0 = time.perf_counter()
    for _ in range(20):
        jvp(grad(loss), (params,), (v,))  # a Hessian-vector product, as the hessian probe runs
    return time.perf_counter() - t0


def timed(threads: int, repeats: int) -> float:
    import torch

    torch.set_num_threads(threads)
    workload()  # warm-up
    return min(workload() for _ in range(repeats))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=1, help="spinning processes to start")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    free = max(1, cores - args.busy)

    quiet_all, quiet_free = timed(cores, args.repeats), timed(free, args.repeats)
    spinners = [mp.get_context("spawn").Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    try:
        time.sleep(1.0)
        busy_all, busy_free = timed(cores, args.repeats), timed(free, args.repeats)
    finally:
        for s in spinners:
            s.kill()
    print(f"{cores} cores, {args.busy} busy process(es); 20 Hessian-vector products of a small CNN, best of {args.repeats}")
    print(f"quiet: {cores} threads {quiet_all:.2f} s, {free} threads {quiet_free:.2f} s "
          f"(free/all = {quiet_free / quiet_all:.2f})")
    print(f"busy:  {cores} threads {busy_all:.2f} s, {free} threads {busy_free:.2f} s "
          f"(free/all = {busy_free / busy_all:.2f}: below 1, the free-core default is faster)")


if __name__ == "__main__":
    main()
