"""Benchmark the empirical NTK (lsdb.probes._ntk_core) against the plain recipes, in one process.

For the MNIST-1D CNN (CNN1d on (1, 40), width 32, kernels 5/3/3, 10 classes) and a 3× wider one,
the trace NTK at n = 512 and the full NTK at n = 256 by

- lsdb ``auto`` (closed-form per-layer Jacobians + one blocked GEMM; the probe's default),
- lsdb ``jacobian`` (vmap(jacrev) Jacobians + the same blocked GEMM),
- the PyTorch NTK tutorial recipe: vmap(jacrev) for x1 and x2, one einsum per parameter tensor,
- one ``torch.autograd.grad`` call per (input, logit), then J Jᵀ,

all checked to agree with lsdb ``auto`` to a relative Frobenius error below 1e-5 (float32).

Rate = nominal FLOPs / time as a fraction of a float32 matmul timed just before each case, with
nominal FLOPs = Jacobian (n·(1 + 2C)·F, F the forward FLOPs of one input) + Gram (2n²CP for
trace, 2(nC)²P for full), the same count for every method. Then, in fresh subprocesses: peak RSS
of the trace NTK at n = 4096 (target < 2 GB), and cold (first call in a process) vs warm cost.

    python benchmarks/ntk.py            # the full run (about 3 minutes on 2 cores)
    python benchmarks/ntk.py --quick    # smaller n, default width only
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch
from torch.func import functional_call, jacrev, vmap

from lsdb.probes import _ntk_core as core
from lsdb.train.models import CNN1d

C = 10


def make_net(width: int, seed: int = 0) -> core.Network:
    torch.manual_seed(seed)
    model = CNN1d((1, 40), C, width=width)
    return core.bind(model, model.state_dict(), "cpu", torch.float32)


def forward_flops(net: core.Network) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(torch.zeros(1, 1, 40))
    return counter.get_total_flops()


def nominal_flops(net: core.Network, n: int, variant: str) -> float:
    jac = n * (1 + 2 * C) * forward_flops(net)
    p = net.num_params
    return jac + (2 * n * n * C * p if variant == "trace" else 2 * (n * C) ** 2 * p)


# ------------------------------------------------------------------------------- the baselines

def tutorial_recipe(net: core.Network, x1: torch.Tensor, x2: torch.Tensor, variant: str) -> torch.Tensor:
    """The PyTorch NTK tutorial's Jacobian contraction (vmap(jacrev), one einsum per parameter)."""

    def fnet_single(params, x):
        return functional_call(net.model, params, (x.unsqueeze(0),)).squeeze(0)

    jac1 = vmap(jacrev(fnet_single), (None, 0))(net.params, x1)
    jac1 = [j.flatten(2) for j in jac1.values()]
    jac2 = vmap(jacrev(fnet_single), (None, 0))(net.params, x2)
    jac2 = [j.flatten(2) for j in jac2.values()]
    if variant == "trace":
        return torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(jac1, jac2)]).sum(0)
    out = torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2)]).sum(0)
    return out.permute(0, 2, 1, 3).reshape(x1.shape[0] * C, x2.shape[0] * C)  # to lsdb's (i,a) layout


def autograd_loop(net: core.Network, x: torch.Tensor, variant: str) -> torch.Tensor:
    params = {k: v.detach().requires_grad_(True) for k, v in net.params.items()}
    rows = []
    for i in range(x.shape[0]):
        out = net.logits(params, x[i : i + 1])[0]
        for a in range(C):
            grads = torch.autograd.grad(out[a], list(params.values()), retain_graph=a < C - 1)
            rows.append(torch.cat([g.reshape(-1) for g in grads]))
    j = torch.stack(rows)
    if variant == "full":
        return j @ j.T
    j = j.reshape(x.shape[0], -1)  # Σ_a ⟨J_a(x_i), J_a(x_j)⟩
    return j @ j.T


# ------------------------------------------------------------------------------------- timing

def best_time(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def matmul_rate(size: int) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    t, _ = best_time(lambda: a @ b, 3)
    return 2 * size**3 / t


def compare(width: int, variant: str, n: int, repeats: int, mm_size: int, loop: bool) -> list[dict]:
    net = make_net(width)
    x = torch.randn(n, 1, 40, generator=torch.Generator().manual_seed(1))
    flops = nominal_flops(net, n, variant)
    methods = {
        "lsdb auto": lambda: core.ntk(net, x, variant, "auto"),
        "lsdb jacobian": lambda: core.ntk(net, x, variant, "jacobian"),
        "tutorial recipe": lambda: tutorial_recipe(net, x, x, variant),
    }
    if loop:
        methods["autograd loop"] = lambda: autograd_loop(net, x, variant)
    core.ntk(net, x[:8], variant)  # first-call set-up is measured separately (cold vs warm)
    tutorial_recipe(net, x[:8], x[:8], variant)
    ref, rows = None, []
    for name, fn in methods.items():
        rate = matmul_rate(mm_size)  # re-timed per method: the machine's load drifts
        t, k = best_time(fn, 1 if name == "autograd loop" else repeats)
        ref = k if ref is None else ref
        err = float((k - ref).norm() / ref.norm())
        rows.append(dict(width=width, params=net.num_params, variant=variant, n=n, method=name, seconds=t,
                         rate_fraction=flops / t / rate, matmul_gflops=rate / 1e9, rel_err=err))
    return rows


# ------------------------------------------------------------------------------- subprocesses

def peak_rss_mb() -> float:
    """VmHWM of this process (ru_maxrss would carry the parent's peak across fork + exec)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_rss(n: int) -> dict:
    net = make_net(32)
    x = torch.randn(n, 1, 40)
    core.ntk(net, x[:8], "trace")  # the floor includes torch's lazily loaded kernels
    floor = peak_rss_mb()
    t = time.perf_counter()
    k = core.ntk(net, x, "trace")
    return dict(n=n, seconds=time.perf_counter() - t, floor_mb=floor, peak_mb=peak_rss_mb(), rows=k.shape[0],
                jacobian_mb=n * C * net.num_params * 4 / 2**20)


def child_coldwarm(method: str, n: int, calls: int) -> dict:
    times = []
    x = torch.randn(n, 1, 40)
    for i in range(calls):
        net = make_net(32, seed=i)  # a new checkpoint each call: same shapes, new weights
        t = time.perf_counter()
        if method == "lsdb":
            core.ntk(net, x, "trace")
        else:
            tutorial_recipe(net, x, x, "trace")
        times.append(time.perf_counter() - t)
    warm = statistics.median(times[1:])
    return dict(method=method, n=n, cold=times[0], warm=warm, cold_over_warm=times[0] / warm,
                run50_over_50warm=(times[0] + 49 * warm) / (50 * warm))


def in_subprocess(args: list[str]) -> dict:
    args = [*args, "--threads", str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller n, default width only (~30 s)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's choice)")
    ap.add_argument("--child", choices=["rss", "coldwarm"], help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lsdb", help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child == "rss":
        print(json.dumps(child_rss(a.n)))
        return
    if a.child == "coldwarm":
        print(json.dumps(child_coldwarm(a.method, a.n, a.calls)))
        return

    t0 = time.perf_counter()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    widths = (32,) if a.quick else (32, 96)
    cases = (("trace", 256), ("full", 128)) if a.quick else (("trace", 512), ("full", 256))
    mm = 1024 if a.quick else 2048
    print(f"{'width':>5} {'P':>6} {'variant':>7} {'n':>4}  {'method':<16} {'seconds':>8} {'of matmul':>9} {'rel err':>8}")
    worst_vs_recipe = float("inf")
    for width in widths:
        for variant, n in cases:
            rows = compare(width, variant, n, 2, mm, loop=True)
            for r in rows:
                print(f"{r['width']:>5} {r['params']:>6} {r['variant']:>7} {r['n']:>4}  {r['method']:<16} "
                      f"{r['seconds']:>8.3f} {r['rate_fraction']:>9.2f} {r['rel_err']:>8.1e}")
                assert r["rel_err"] < 1e-5, f"{r['method']} disagrees with lsdb auto: {r['rel_err']:.1e}"
            by = {r["method"]: r["seconds"] for r in rows}
            worst_vs_recipe = min(worst_vs_recipe, by["tutorial recipe"] / by["lsdb auto"])
            print(f"      matmul {rows[0]['matmul_gflops']:.1f}–{rows[-1]['matmul_gflops']:.1f} GFLOP/s; "
                  f"lsdb auto is {by['tutorial recipe'] / by['lsdb auto']:.2f}× the recipe, "
                  f"{by['autograd loop'] / by['lsdb auto']:.1f}× the loop")
    print(f"slowest lsdb-vs-recipe speed-up over all cases: {worst_vs_recipe:.2f}×")

    n_rss = 1024 if a.quick else 4096
    r = in_subprocess(["--child", "rss", "--n", str(n_rss)])
    print(f"trace NTK n={r['n']}: peak RSS {r['peak_mb']:.0f} MB (process floor {r['floor_mb']:.0f} MB; "
          f"the whole Jacobian would be {r['jacobian_mb']:.0f} MB, the recipe holds two), {r['seconds']:.1f} s")

    n_cw = 128 if a.quick else 256
    for method in ("lsdb", "recipe"):
        r = in_subprocess(["--child", "coldwarm", "--method", method, "--n", str(n_cw)])
        print(f"cold vs warm, trace n={n_cw}, {method:<6}: first call {r['cold']:.3f} s, warm {r['warm']:.3f} s "
              f"({r['cold_over_warm']:.2f}×); a run of 50 checkpoints = {r['run50_over_50warm']:.3f}× 50 warm calls")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
