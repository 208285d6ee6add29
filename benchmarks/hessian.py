"""Top Hessian eigenvalue and trace of the default MNIST-1D CNN: lsdb's Lanczos / Hutch++ against
PyHessian's power iteration / Hutchinson and scipy's eigsh over a plain double-backward HVP.

Same model, same batch of 512, same process. The model is the default CNN1d (width 32, kernels
5/3/3, ~8k parameters) trained briefly on real MNIST-1D with SGD, so the spectrum is realistic.
The reference top eigenvalue is a float64 Lanczos run to a relative residual of 1e-10.

    python benchmarks/hessian.py [--quick] [--threads N] [--device cpu|cuda]

Prints, for each method: relative error against the reference, HVP count, median wall time over
repeats and the ratio to PyHessian's; then per-checkpoint times along a sequence of checkpoints with
warm starts; then the HVPs each trace estimator needs to reach a stated standard error (lsdb's
default, deflated Hutchinson, counted beyond the top-12 Lanczos run the probe makes anyway).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import statistics
import time

import numpy as np
import torch
import torch.nn.functional as F

from lsdb.probes import _directions as D
from lsdb.probes import hessian as H
from lsdb.spec import DataSpec, ModelSpec
from lsdb.train.data import load_data
from lsdb.train.models import build_model


def train_with_snapshots(data, device, epochs: float, snap_every: int, snaps: int):
    """SGD (lr 0.05, momentum 0.9, batch 64) for ``epochs``; then ``snaps`` more snapshots every
    ``snap_every`` steps (the checkpoint sequence for warm starts)."""
    model = build_model(ModelSpec(), data.input_shape, data.num_classes, seed=0).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    n = data.x_train.shape[0]
    steps = int(epochs * n / 64)
    states = []
    order = torch.randperm(n, generator=g)
    pos = 0
    for step in range(steps + snaps * snap_every + 1):
        if step >= steps and (step - steps) % snap_every == 0:
            states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        if pos + 64 > n:
            order, pos = torch.randperm(n, generator=g), 0
        idx = order[pos:pos + 64].to(device)
        pos += 64
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    return model, states[:snaps + 1]


def timed(fn, repeats: int):
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return out, statistics.median(times)


# ----------------------------------------------------------------------------- the methods

def _pyhessian_module():
    import importlib
    import sys

    importlib.import_module("pyhessian")
    return sys.modules["pyhessian.hessian"]  # the package re-exports the class under the same name


class Counter:
    n = 0


@contextlib.contextmanager
def pyhessian_counted(model, x, y, counter: Counter, seed: int):
    """PyHessian's ``hessian`` object on (x, y), seeded, with every HVP it makes counted."""
    ph = _pyhessian_module()
    torch.manual_seed(seed)
    original = ph.hessian_vector_product

    def counting(gradsH, params, v):
        counter.n += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counting
    try:
        yield ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
    finally:
        ph.hessian_vector_product = original
        model.zero_grad(set_to_none=True)


def pyhessian_top(model, x, y, counter: Counter, seed: int, tol: float = 1e-3):
    """PyHessian's power iteration, maxIter=100; its default tol=1e-3 bounds the relative change
    between two iterations, not the error."""
    with pyhessian_counted(model, x, y, counter, seed) as hc:
        values, _ = hc.eigenvalues(tol=tol)
    return values[0]


def pyhessian_topk(model, x, y, counter: Counter, seed: int, k: int, trace_iters: int):
    """PyHessian's top-k (power iteration with deflation, its defaults maxIter=100, tol=1e-3) and
    its Hutchinson trace for ``trace_iters`` probes: what a full-study ``hessian`` job computes."""
    with pyhessian_counted(model, x, y, counter, seed) as hc:
        values, _ = hc.eigenvalues(top_n=k)
        trace = float(np.mean(hc.trace(maxIter=trace_iters, tol=0.0)))
    return sorted(values, reverse=True), trace


def lsdb_topk(model, x, y, counter: Counter, seed: int, k: int, trace_iters: int):
    """The probe's own path for the same numbers: Lanczos top-k at the residual tolerance 1e-3, then
    the deflated trace with ``trace_iters`` products beyond it."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    op = H.make_operator(model, params, {}, x, y, "auto", 8)
    gen = torch.Generator().manual_seed(seed)
    top = H.lanczos_top(op, k, 1e-3, 200, generator=gen)
    trace, _ = H.deflated_hutchinson(op, top.basis, top.products, trace_iters, gen)
    counter.n += op.hvps
    return [float(v) for v in top.values], trace


def pyhessian_trace(model, x, y, counter: Counter, seed: int):
    ph = _pyhessian_module()
    torch.manual_seed(seed)
    hc = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
    samples = hc.trace()
    model.zero_grad(set_to_none=True)
    counter.n += len(samples)
    return float(np.mean(samples)), float(np.std(samples, ddof=1) / math.sqrt(len(samples))), len(samples)


def eigsh_top(model, x, y, counter: Counter, seed: int, tol: float):
    """scipy.sparse.linalg.eigsh (ARPACK Lanczos) over a plain double-backward HVP."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    params = [p for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    grads = torch.autograd.grad(loss, params, create_graph=True)
    flat = torch.cat([g.reshape(-1) for g in grads])
    P = flat.numel()

    def mv(v):
        counter.n += 1
        vt = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32).reshape(-1)).to(flat.device)
        hv = torch.autograd.grad(flat, params, grad_outputs=vt, retain_graph=True)
        return torch.cat([h.reshape(-1) for h in hv]).cpu().numpy().astype(np.float64)

    v0 = np.random.default_rng(seed).standard_normal(P)
    vals = eigsh(LinearOperator((P, P), matvec=mv, dtype=np.float64), k=1, which="LA", tol=tol, v0=v0,
                 return_eigenvectors=False)
    return float(vals[0])


def lsdb_top(model, x, y, counter: Counter, seed: int, tol: float, criterion: str, v0=None, hvp="auto"):
    params = {n: p.detach() for n, p in model.named_parameters()}
    op = H.make_operator(model, params, {}, x, y, hvp, 8)
    top = H.lanczos_top(op, 1, tol, 200, v0=v0, generator=torch.Generator().manual_seed(seed), criterion=criterion)
    counter.n += op.hvps
    return float(top.values[0]), top


def reference_top(model, x, y):
    m64 = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in m64.named_parameters()}
    op = H.HessianOperator(D.loss_function(m64, {}, x.double(), y), params, "double_backward")
    top = H.lanczos_top(op, 1, 1e-10, 400, generator=torch.Generator().manual_seed(123))
    assert top.converged, "float64 reference did not converge"
    return float(top.values[0])


# ----------------------------------------------------------------------------------- main

def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and checkpoints")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 = stable timings on a shared box)")
    ap.add_argument("--snap-every", type=int, default=16, help="SGD steps between the sequence's checkpoints")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    reps = 2 if args.quick else 3
    snaps = 3 if args.quick else 8

    data = load_data(DataSpec()).to(dev)
    t0 = time.perf_counter()
    model, states = train_with_snapshots(data, dev, epochs=3.0, snap_every=args.snap_every, snaps=snaps)
    model.eval()
    idx = D.fixed_subset(data.x_train.shape[0], 512, 0, dev)
    x, y = data.x_train[idx], data.y_train[idx]
    print(f"device {dev}, threads {torch.get_num_threads()}, P = {sum(p.numel() for p in model.parameters())}, "
          f"batch 512, trained 3 epochs ({time.perf_counter() - t0:.1f} s)")

    model.load_state_dict(states[-1])
    ref = reference_top(model, x, y)
    print(f"float64 reference top eigenvalue {ref:.6f}\n")

    # ---- one checkpoint, cold start
    rows = []

    def run(name, fn):
        vals, hvps = [], []

        def once():
            c = Counter()
            v = fn(c, len(vals))
            vals.append(v if not isinstance(v, tuple) else v[0])
            hvps.append(c.n)

        _, wall = timed(once, reps)
        err = max(abs(v - ref) / abs(ref) for v in vals)
        rows.append((name, err, statistics.median(hvps), wall))

    run("pyhessian power iteration (defaults)", lambda c, s: pyhessian_top(model, x, y, c, s))
    run("pyhessian power iteration, tol 1e-4", lambda c, s: pyhessian_top(model, x, y, c, s, 1e-4))
    run("scipy eigsh, double-backward HVP, tol 1e-3", lambda c, s: eigsh_top(model, x, y, c, s, 1e-3))
    run("lsdb lanczos, residual <= 1e-3 (default)", lambda c, s: lsdb_top(model, x, y, c, s, 1e-3, "residual"))
    run("lsdb lanczos, residual, double backward",
        lambda c, s: lsdb_top(model, x, y, c, s, 1e-3, "residual", hvp="double_backward"))
    run("lsdb lanczos, gap bound <= 1e-3", lambda c, s: lsdb_top(model, x, y, c, s, 1e-3, "gap"))
    run("lsdb lanczos, gap bound <= 1e-4", lambda c, s: lsdb_top(model, x, y, c, s, 1e-4, "gap"))
    run("lsdb lanczos fwd-over-rev HVP, gap <= 1e-3",
        lambda c, s: lsdb_top(model, x, y, c, s, 1e-3, "gap", hvp="fwd_rev"))
    base = rows[0][3]
    print(f"{'top eigenvalue, cold start':46s} {'rel.err (max)':>13s} {'HVPs':>6s} {'wall s':>8s} {'vs PyHessian':>12s}")
    for name, err, hv, wall in rows:
        print(f"{name:46s} {err:13.2e} {hv:6.0f} {wall:8.3f} {base / wall:11.2f}x")

    # ---- a sequence of checkpoints, warm starts
    print(f"\nsequence of {snaps} checkpoints {args.snap_every} SGD steps apart (after the first, which starts cold)")
    py, py4 = {"t": [], "err": [], "h": []}, {"t": [], "err": [], "h": []}
    # (criterion, tolerance): the rigorous residual test; the gap test at the target accuracy, and
    # at half of it (the gap is estimated from Ritz values, so a margin keeps the error within 1e-3)
    # (the probe's default HVP, "auto" = layer-wise here; the residual test with double backward too)
    configs = (("residual", 1e-3, "auto"), ("residual", 1e-3, "double_backward"), ("gap", 1e-3, "auto"),
               ("gap", 5e-4, "auto"))
    warm = {cfg: {"t": [], "err": [], "h": []} for cfg in configs}
    prev = {cfg: None for cfg in configs}
    for i, st in enumerate(states):
        model.load_state_dict(st)
        r = reference_top(model, x, y)
        for cfg in configs:
            c = Counter()
            (val, top), wall = timed(lambda: lsdb_top(model, x, y, c, 7 + i, cfg[1], cfg[0], v0=prev[cfg],
                                                      hvp=cfg[2]), 1)
            prev[cfg] = top.vectors[0].detach().double().cpu()
            if i > 0:
                warm[cfg]["t"].append(wall)
                warm[cfg]["err"].append(abs(val - r) / abs(r))
                warm[cfg]["h"].append(c.n)
        if i > 0:
            for tol, acc in ((1e-3, py), (1e-4, py4)):
                c2 = Counter()
                pv, pwall = timed(lambda: pyhessian_top(model, x, y, c2, i, tol), 1)
                acc["t"].append(pwall)
                acc["err"].append(abs(pv - r) / abs(r))
                acc["h"].append(c2.n)
    for name, acc in (("pyhessian defaults      ", py), ("pyhessian tol 1e-4      ", py4)):
        print(f"  {name}: {statistics.mean(acc['t']):.3f} s/checkpoint, {statistics.mean(acc['h']):5.1f} HVPs, "
              f"max rel.err {max(acc['err']):.2e}")
    for (crit, tol, hvp), w in warm.items():
        t = statistics.mean(w["t"])
        print(f"  lsdb warm, {crit:8s} {tol:.0e} {hvp:15s}: {t:.3f} s/checkpoint, {statistics.mean(w['h']):5.1f} HVPs, "
              f"max rel.err {max(w['err']):.2e}  -> {t / statistics.mean(py['t']):.2f} of PyHessian defaults' time, "
              f"{t / statistics.mean(py4['t']):.2f} of tol 1e-4's")

    # ---- the full study's settings: top 22 (2C + 2) and a 30-product trace, one checkpoint
    model.load_state_dict(states[-1])
    m64 = copy.deepcopy(model).double()
    p64 = {n: p.detach() for n, p in m64.named_parameters()}
    ref_op = H.HessianOperator(D.loss_function(m64, {}, x.double(), y), p64, "double_backward")
    ref22 = H.lanczos_top(ref_op, 22, 1e-10, 400, generator=torch.Generator().manual_seed(123)).values
    print("\nthe full study's settings (top 22 eigenvalues, then a trace of 30 products), last checkpoint:")
    for name, fn in (("pyhessian eigenvalues(top_n=22) + trace(30)", pyhessian_topk),
                     ("lsdb lanczos top 22 + deflated trace(30)", lsdb_topk)):
        c = Counter()
        (vals, _), wall = timed(lambda: fn(model, x, y, c, 0, 22, 30), 1)
        errs = [abs(v - float(r)) / abs(float(ref22[0])) for v, r in zip(vals, ref22)]
        acc = (name, wall, c.n, max(errs), sum(e > 1e-3 for e in errs))
        print(f"  {name:45s}: {wall:.2f} s, {c.n} HVPs, max error {acc[3]:.1e} of λ1, "
              f"{acc[4]} of 22 values off by more than 1e-3·λ1")
        if name.startswith("pyhessian"):
            py_wall = wall
    print(f"  lsdb / pyhessian time: {wall / py_wall:.2f}")

    # ---- trace
    model.load_state_dict(states[-1])
    c = Counter()
    tr, se, n = pyhessian_trace(model, x, y, c, 0)
    print(f"\ntrace: pyhessian Hutchinson (defaults) {tr:.3f} ± {se:.3f} (SE) after {n} HVPs")
    target = 0.02 * abs(tr)
    print(f"HVPs to reach a standard error of 2% of the trace ({target:.3f}):")
    ph = _pyhessian_module()
    torch.manual_seed(1)
    hc = ph.hessian(model, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=x.is_cuda)
    samples = np.array(hc.trace(maxIter=600, tol=0.0))  # tol 0: exactly maxIter Rademacher probes
    model.zero_grad(set_to_none=True)
    ses = [samples[:m].std(ddof=1) / math.sqrt(m) for m in range(2, len(samples) + 1)]
    need = next((m for m, s_ in zip(range(2, len(samples) + 1), ses) if s_ <= target and m >= 10), None)
    print(f"  pyhessian hutchinson: {need} HVPs (estimate {samples[:need or 600].mean():.3f})")
    params = {k: p.detach() for k, p in model.named_parameters()}
    for m in (12, 18, 24, 30, 36, 45, 60, 75, 90, 120, 150, 180, 240, 300, 450, 600):
        op = H.HessianOperator(D.loss_function(model, {}, x, y), params, "double_backward")
        est, s_ = H.hutch_pp(op, m, torch.Generator().manual_seed(m))
        if s_ <= target:
            print(f"  lsdb hutch++        : {op.hvps} HVPs (estimate {est:.3f} ± {s_:.3f})")
            break
    else:
        print("  lsdb hutch++        : target not reached within 600 HVPs")
    # the probe's default: the top-12 Lanczos run it makes anyway, then Hutchinson off its basis
    op = H.HessianOperator(D.loss_function(model, {}, x, y), params, "double_backward")
    top = H.lanczos_top(op, 12, 1e-3, 200, generator=torch.Generator().manual_seed(0))
    lanczos = op.hvps
    for m in (10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100):  # from 10: an SE from fewer samples is noise
        est, s_ = H.deflated_hutchinson(op, top.basis, top.products, m, torch.Generator().manual_seed(m))
        if s_ <= target:
            print(f"  lsdb deflated       : {m} HVPs beyond the probe's top-12 Lanczos run ({lanczos} HVPs) "
                  f"(estimate {est:.3f} ± {s_:.3f})")
            break
    else:
        print("  lsdb deflated       : target not reached within 100 HVPs")


if __name__ == "__main__":
    main()
