"""Benchmark the empirical NTK K(X, X) (lsdb.probes._ntk_core) against the plain recipes, in one process.

For the MNIST-1D CNN (CNN1d on (1, 40), width 32, kernels 5/3/3, 10 classes) and a 3× wider one,
the trace NTK at n = 512 and the full NTK at n = 256 by

- lsdb ``auto`` (closed-form per-layer Jacobians + one GEMM per pair of blocks; the probe's default),
- lsdb ``jacobian`` (vmap(jacrev) Jacobians + the same blocked GEMM),
- the PyTorch NTK tutorial recipe (vmap(jacrev), one einsum per parameter tensor, stacked and
  summed) in three forms:
    * ``recipe as written``: the tutorial's ``empirical_ntk_jacobian_contraction(x1=X, x2=X)``,
      which computes the Jacobian of X twice and contracts the whole Gram;
    * ``recipe, 1 Jacobian``: the Jacobian of X once, reused for both sides, whole Gram;
    * ``recipe, same path``: lsdb's K(X, X) path: the Jacobian of X once, in lsdb's blocks of 128
      inputs, and only the Gram blocks on and above the diagonal (mirrored below). It does the
      same work as lsdb (which may compute a block twice when its 1 GB Jacobian cache is full);
      only the Jacobian (vmap(jacrev) vs closed form) and the contraction (one einsum per
      parameter tensor vs one GEMM over all parameters) differ;
- one ``torch.autograd.grad`` call per (input, logit), then J Jᵀ (one Jacobian, whole Gram),

all checked to agree with lsdb ``auto`` to a relative Frobenius error below 1e-5 (float32).

The headline is lsdb ``auto`` vs ``recipe, same path``: the gain of lsdb's implementation alone.
``recipe as written`` is kept for comparison with the tutorial as published (and with earlier
figures); its ratio also counts the second Jacobian and the lower triangle that lsdb never computes.

Timing: the methods are interleaved, ``--rounds`` rounds (default 3) in a rotating order; the
headline pair runs in every round, lsdb ``jacobian`` and the recipe as written in the first two,
the one-Jacobian recipe and the loop in the first. Each method's time is its best round and each
speed-up a ratio of best times in this process, with the range of the per-round ratios beside it.

Rate = nominal FLOPs / time as a fraction of the best float32 matmul rate timed in the same
rounds, with nominal FLOPs = Jacobian (n·(1 + 2C)·F, F the forward FLOPs of one input) + Gram
(2n²CP for trace, 2(nC)²P for full), the same count for every method (so methods that compute
only the upper triangle can exceed 1 on the full NTK). Then, in fresh subprocesses: peak RSS of
the trace NTK at n = 4096 (target < 2 GB), and cold (first call in a process) vs warm cost.

    python benchmarks/ntk.py --threads 1   # the full run (4–7 minutes on the loaded 2-core box of 2026-11-29)
    python benchmarks/ntk.py --quick       # smaller n, default width only (about 25 s)
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

def recipe_jacobian(net: core.Network, x: torch.Tensor) -> list[torch.Tensor]:
    """The tutorial's Jacobian: vmap(jacrev) over the inputs, one (n, C, numel) tensor per parameter."""

    def fnet_single(params, xi):
        return functional_call(net.model, params, (xi.unsqueeze(0),)).squeeze(0)

    jac = vmap(jacrev(fnet_single), (None, 0))(net.params, x)
    return [j.flatten(2) for j in jac.values()]


def recipe_gram(jac1: list[torch.Tensor], jac2: list[torch.Tensor], variant: str) -> torch.Tensor:
    """The tutorial's contraction: one einsum per parameter tensor, stacked and summed."""
    if variant == "trace":
        return torch.stack([torch.einsum("Naf,Maf->NM", a, b) for a, b in zip(jac1, jac2)]).sum(0)
    out = torch.stack([torch.einsum("Naf,Mbf->NMab", a, b) for a, b in zip(jac1, jac2)]).sum(0)
    n1, n2 = jac1[0].shape[0], jac2[0].shape[0]
    return out.permute(0, 2, 1, 3).reshape(n1 * C, n2 * C)  # to lsdb's (i,a) layout


def tutorial_recipe(net: core.Network, x1: torch.Tensor, x2: torch.Tensor, variant: str) -> torch.Tensor:
    """The PyTorch NTK tutorial's Jacobian contraction as written: Jacobians of x1 and of x2."""
    return recipe_gram(recipe_jacobian(net, x1), recipe_jacobian(net, x2), variant)


def recipe_one_jacobian(net: core.Network, x: torch.Tensor, variant: str) -> torch.Tensor:
    """The tutorial recipe for K(X, X) with the Jacobian of X computed once; the whole Gram."""
    jac = recipe_jacobian(net, x)
    return recipe_gram(jac, jac, variant)


def recipe_same_path(net: core.Network, x: torch.Tensor, variant: str, chunk: int = 128) -> torch.Tensor:
    """The tutorial recipe on lsdb's K(X, X) path (``core.ntk``): the Jacobian of X once, in the
    same blocks of ``chunk`` inputs, and only the Gram blocks on and above the diagonal, the
    diagonal blocks symmetrised and the others mirrored, exactly as lsdb stores them."""
    n, per = x.shape[0], C if variant == "full" else 1
    blocks = core._blocks(n, chunk)
    jac = [recipe_jacobian(net, x[b]) for b in blocks]
    out = torch.empty(n * per, n * per, dtype=x.dtype)
    for bi, rows in enumerate(blocks):
        r = slice(rows.start * per, rows.stop * per)
        for bj in range(bi, len(blocks)):
            s = slice(blocks[bj].start * per, blocks[bj].stop * per)
            block = recipe_gram(jac[bi], jac[bj], variant)
            if bi == bj:
                block = 0.5 * (block + block.T)
            out[r, s] = block
            if bi != bj:
                out[s, r] = block.T
    return out


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


HEADLINE = "recipe, same path"
AS_WRITTEN = "recipe as written"


def compare(width: int, variant: str, n: int, rounds: int, mm_size: int, loop: bool) -> tuple[list[dict], dict]:
    """Every method on one case, interleaved in ``rounds`` rounds, each starting with the matmul
    reference and running its methods in an order rotated by one per round. The headline pair
    (lsdb auto, recipe on the same path) runs in every round; lsdb jacobian and the recipe as
    written in the first two; the one-Jacobian recipe and the autograd loop in the first only (they
    are context, and the slowest). Returns one row per method (best round) and the per-round times."""
    net = make_net(width)
    x = torch.randn(n, 1, 40, generator=torch.Generator().manual_seed(1))
    flops = nominal_flops(net, n, variant)
    methods = {  # name: (function, rounds it runs in)
        "lsdb auto": (lambda: core.ntk(net, x, variant, "auto"), rounds),
        HEADLINE: (lambda: recipe_same_path(net, x, variant), rounds),
        "lsdb jacobian": (lambda: core.ntk(net, x, variant, "jacobian"), 2),
        AS_WRITTEN: (lambda: tutorial_recipe(net, x, x, variant), 2),
        "recipe, 1 Jacobian": (lambda: recipe_one_jacobian(net, x, variant), 1),
    }
    if loop:
        methods["autograd loop"] = (lambda: autograd_loop(net, x, variant), 1)
    core.ntk(net, x[:8], variant)  # first-call set-up is measured separately (cold vs warm)
    core.ntk(net, x[:8], variant, "jacobian")
    tutorial_recipe(net, x[:8], x[:8], variant)
    times: dict[str, list[float]] = {name: [] for name in methods}
    rates, outs = [], {}
    for r in range(rounds):
        names = [name for name, (_, k) in methods.items() if r < k]
        order = names[r % len(names):] + names[: r % len(names)]
        rates.append(matmul_rate(mm_size))  # the machine's load drifts: re-timed every round
        for name in order:
            t = time.perf_counter()
            k = methods[name][0]()
            times[name].append(time.perf_counter() - t)
            if r == 0:
                outs[name] = k
            del k
    ref, rate = outs["lsdb auto"], max(rates)
    rows = []
    for name, ts in times.items():
        t = min(ts)
        err = float((outs[name] - ref).norm() / ref.norm())
        rows.append(dict(width=width, params=net.num_params, variant=variant, n=n, method=name, seconds=t,
                         rate_fraction=flops / t / rate, matmul_gflops=rate / 1e9, rel_err=err))
    return rows, times


def speedup(times: dict[str, list[float]], slow: str, fast: str) -> tuple[float, float, float]:
    """Ratio of best times, and the lowest and highest ratio within one round (over the rounds both ran in)."""
    per_round = [a / b for a, b in zip(times[slow], times[fast])]
    return min(times[slow]) / min(times[fast]), min(per_round), max(per_round)


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
        elif method == "recipe":  # the tutorial as written
            tutorial_recipe(net, x, x, "trace")
        else:  # "recipe-same": on lsdb's K(X, X) path
            recipe_same_path(net, x, "trace")
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
    ap.add_argument("--rounds", type=int, default=3,
                    help="interleaved timing rounds per case (default 3; the context baselines run in fewer)")
    ap.add_argument("--child", choices=["rss", "coldwarm"], help=argparse.SUPPRESS)
    ap.add_argument("--method", default="lsdb", choices=["lsdb", "recipe", "recipe-same"], help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--calls", type=int, default=6, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.rounds < 1:
        ap.error("--rounds must be at least 1")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.child == "rss":
        print(json.dumps(child_rss(a.n)))
        return
    if a.child == "coldwarm":
        print(json.dumps(child_coldwarm(a.method, a.n, a.calls)))
        return

    t0 = time.perf_counter()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {a.rounds} interleaved rounds")
    widths = (32,) if a.quick else (32, 96)
    cases = (("trace", 256), ("full", 128)) if a.quick else (("trace", 512), ("full", 256))
    mm = 1024 if a.quick else 2048
    print(f"{'width':>5} {'P':>6} {'variant':>7} {'n':>4}  {'method':<19} {'seconds':>8} {'of matmul':>9} {'rel err':>8}")
    same, written, contraction = [], [], []
    for width in widths:
        for variant, n in cases:
            rows, times = compare(width, variant, n, a.rounds, mm, loop=True)
            for r in rows:
                print(f"{r['width']:>5} {r['params']:>6} {r['variant']:>7} {r['n']:>4}  {r['method']:<19} "
                      f"{r['seconds']:>8.3f} {r['rate_fraction']:>9.2f} {r['rel_err']:>8.1e}")
                assert r["rel_err"] < 1e-5, f"{r['method']} disagrees with lsdb auto: {r['rel_err']:.1e}"
            s_same, s_written = speedup(times, HEADLINE, "lsdb auto"), speedup(times, AS_WRITTEN, "lsdb auto")
            s_contr, s_1jac = speedup(times, HEADLINE, "lsdb jacobian"), speedup(times, "recipe, 1 Jacobian", "lsdb auto")
            loop = min(times["autograd loop"]) / min(times["lsdb auto"])
            same.append(s_same[0])
            written.append(s_written[0])
            contraction.append(s_contr[0])
            print(f"      matmul {rows[0]['matmul_gflops']:.1f} GFLOP/s (best round); lsdb auto is "
                  f"{s_same[0]:.2f}× the recipe on the same path (rounds {s_same[1]:.2f}–{s_same[2]:.2f}), "
                  f"{s_1jac[0]:.2f}× with 1 Jacobian, {s_written[0]:.2f}× as written "
                  f"(rounds {s_written[1]:.2f}–{s_written[2]:.2f}), {loop:.1f}× the loop; "
                  f"lsdb jacobian is {s_contr[0]:.2f}× the same-path recipe (contraction only)")
    print(f"HEADLINE lsdb auto vs the tutorial recipe on the same K(X, X) path (one Jacobian, upper "
          f"block triangle): {min(same):.2f}–{max(same):.2f}× over all cases")
    print(f"  vs the tutorial recipe as written (two Jacobians, whole Gram): "
          f"{min(written):.2f}–{max(written):.2f}×; lsdb jacobian vs the same-path recipe "
          f"(the contraction alone): {min(contraction):.2f}–{max(contraction):.2f}×")

    n_rss = 1024 if a.quick else 4096
    r = in_subprocess(["--child", "rss", "--n", str(n_rss)])
    print(f"trace NTK n={r['n']}: peak RSS {r['peak_mb']:.0f} MB (process floor {r['floor_mb']:.0f} MB; "
          f"the whole Jacobian would be {r['jacobian_mb']:.0f} MB, the recipe as written holds two), "
          f"{r['seconds']:.1f} s")

    n_cw = 128 if a.quick else 256
    for method in ("lsdb", "recipe-same"):
        r = in_subprocess(["--child", "coldwarm", "--method", method, "--n", str(n_cw)])
        print(f"cold vs warm, trace n={n_cw}, {method:<11}: first call {r['cold']:.3f} s, warm {r['warm']:.3f} s "
              f"({r['cold_over_warm']:.2f}×); a run of 50 checkpoints = {r['run50_over_50warm']:.3f}× 50 warm calls")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
