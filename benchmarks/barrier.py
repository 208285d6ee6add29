"""A 21-point barrier and a 51×51 filter-normalised 2D slice of the default MNIST-1D CNN: lsdb's
evaluators (fused oneDNN kernels, the CPU default; many points per vmapped forward pass, the GPU
default; a functional loop) against a plain loop that builds each state dict, loads it with
``load_state_dict`` and evaluates. Same data, same process.

    /work/venv/bin/python benchmarks/barrier.py [--quick] [--threads N] [--device cpu|cuda]

Prints wall times, the ratio to the plain loop, and the achieved fraction of the float32 matmul
rate (model FLOPs counted analytically: 2·C_out·L_out·C_in·k per conv, 2·in·out per linear layer).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lsdb.probes import _directions as D
from lsdb.spec import DataSpec, ModelSpec
from lsdb.train.data import load_data
from lsdb.train.models import build_model


def forward_flops(model: nn.Module, input_shape) -> int:
    """Multiply-add FLOPs (×2) of one example's forward pass through convs and linears."""
    flops = 0

    def hook(m, inp, out):
        nonlocal flops
        if isinstance(m, nn.Conv1d):
            flops += 2 * out.shape[1] * out.shape[2] * m.in_channels * m.kernel_size[0] // m.groups
        elif isinstance(m, nn.Linear):
            flops += 2 * m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Linear))]
    with torch.no_grad():
        model(torch.zeros(1, *input_shape, device=next(model.parameters()).device))
    for h in handles:
        h.remove()
    return flops


def matmul_rate(device, n: int = 1024, reps: int = 20) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    _sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def train(data, device, seed: int, steps: int):
    model = build_model(ModelSpec(), data.input_shape, data.num_classes, seed=seed).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, data.x_train.shape[0], (64,), generator=g).to(device)
        opt.zero_grad()
        F.cross_entropy(model(data.x_train[idx]), data.y_train[idx]).backward()
        opt.step()
    return model


def plain_loop(model, basis, coeffs, splits, batch=None):
    """The baseline: for every point, build the state dict, load it, evaluate each split (in one
    forward pass, or in mini-batches of ``batch``)."""
    out = []
    for c in coeffs.tolist():
        sd = {k: sum(ci * b[k] for ci, b in zip(c, basis)) for k in basis[0]}
        model.load_state_dict(sd)
        row = []
        with torch.no_grad():
            for x, y in splits:
                step = batch or x.shape[0]
                logits = torch.cat([model(x[i:i + step]) for i in range(0, x.shape[0], step)])
                row.append((F.cross_entropy(logits, y).item(), (logits.argmax(1) != y).float().mean().item()))
        out.append(row)
    return out


BATCH = 1000  # the probes' default batch_size


def lsdb_eval(model, basis, coeffs, splits, mode):
    return [D.evaluate_combinations(model, basis, coeffs, {}, x, y, batch_size=BATCH, mode=mode) for x, y in splits]


def bench(name, model, basis, coeffs, splits, flops_per_example, peak, reps, device, with_vmap=True, block=None):
    """Times every method on the same points. The box is shared and its speed drifts, so the
    methods are interleaved: each repeat runs every method on one block of ``block`` points (all
    points when None) before the next repeat, and a method's time is its best repeat per block,
    summed over the blocks."""
    n_examples = sum(x.shape[0] for x, _ in splits)
    total_flops = flops_per_example * n_examples * coeffs.shape[0]
    methods = [("plain loop (load_state_dict)", lambda c: plain_loop(model, basis, c, splits)),
               ("plain loop, batches of 250", lambda c: plain_loop(model, basis, c, splits, 250)),
               ("lsdb loop (functional_call)", lambda c: lsdb_eval(model, basis, c, splits, "loop"))]
    if device.type == "cpu":
        methods.append(("lsdb fused (oneDNN; CPU default)", lambda c: lsdb_eval(model, basis, c, splits, "fused")))
    if with_vmap:
        methods.append(("lsdb vmap (many points per pass)", lambda c: lsdb_eval(model, basis, c, splits, "vmap")))
    times = {label: 0.0 for label, _ in methods}
    outs: dict[str, list] = {label: [] for label, _ in methods}
    step = block or coeffs.shape[0]
    for start in range(0, coeffs.shape[0], step):
        c = coeffs[start:start + step]
        best = {label: float("inf") for label, _ in methods}
        for _ in range(reps):
            for label, fn in methods:
                _sync(device)
                t = time.perf_counter()
                out = fn(c)
                _sync(device)
                best[label] = min(best[label], time.perf_counter() - t)
                if len(outs[label]) * step <= start:
                    outs[label].append(out)
        for label in best:
            times[label] += best[label]
    base = times["plain loop (load_state_dict)"]
    print(f"\n{name}: {coeffs.shape[0]} points × {n_examples} examples, {total_flops / 1e9:.1f} GFLOP")
    for label, t in times.items():
        rate = total_flops / t
        print(f"  {label:36s} {t:8.3f} s  {base / t:5.2f}x  {rate / 1e9:7.1f} GFLOP/s = {rate / peak:.2f} of matmul")
    # they agree
    ref = torch.tensor([[r[0] for r in row] for out in outs["plain loop (load_state_dict)"] for row in out])
    for label in times:
        if label.startswith("plain"):
            continue
        got = torch.cat([torch.stack([e.loss for e in out], dim=1).float().cpu() for out in outs[label]])
        print(f"  max |loss difference|, {label.split(' (')[0]} vs plain loop: {float((ref - got).abs().max()):.2e}")


def layouts(model, x, reps: int = 7, passes: int = 42):
    """Forward pass only, in four layouts: where the fused evaluator's gain comes from."""
    convs = [m for m in model.features if isinstance(m, nn.Conv1d)]
    fuse = torch.ops.mkldnn._convolution_pointwise
    x = model.prepare(x).contiguous()

    def head(h):
        return F.linear((h.to_dense() if h.is_mkldnn else h).flatten(1), model.readout.weight, model.readout.bias)

    def plain_fused():
        h = x
        for c in convs:
            h = fuse(h, c.weight, c.bias, c.padding, c.stride, c.dilation, 1, "relu", [None], "")
        return head(h)

    def blocked_separate_relu():
        h = x.to_mkldnn()
        for c in convs:
            h = torch.relu_(torch.mkldnn_convolution(h, c.weight.to_mkldnn(), c.bias, c.padding, c.stride,
                                                     c.dilation, 1))
        return head(h)

    def blocked_fused():
        h = x.to_mkldnn()
        for c in convs:
            h = fuse(h, c.weight, c.bias, c.padding, c.stride, c.dilation, 1, "relu", [None], "")
        return head(h)

    fns = [("plain (model(x))", lambda: model(x)), ("conv+ReLU fused, plain layout", plain_fused),
           ("blocked layout, separate ReLU", blocked_separate_relu), ("blocked layout, fused (lsdb)", blocked_fused)]
    best = {name: float("inf") for name, _ in fns}
    with torch.no_grad():
        ref = model(x)
        for _ in range(reps):
            for name, fn in fns:
                t = time.perf_counter()
                for _ in range(passes):
                    out = fn()
                best[name] = min(best[name], time.perf_counter() - t)
                assert torch.allclose(out, ref, rtol=1e-5, atol=1e-6), name
    print(f"\nforward only, {passes} passes of {x.shape[0]} examples (best of {reps}):")
    for name, t in best.items():
        print(f"  {name:32s} {t * 1e3:7.1f} ms  {best['plain (model(x))'] / t:5.2f}x")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a 21×21 slice and one repeat")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vmap-slice", action="store_true", help="also time vmap on the full CPU slice (slow)")
    ap.add_argument("--layouts", action="store_true", help="only time the forward pass in four CPU layouts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dev = torch.device(args.device)
    data = load_data(DataSpec()).to(dev)
    m1, m2 = train(data, dev, 0, 300), train(data, dev, 1, 300)
    model = m1
    model.eval()
    s1 = {k: v.detach().clone() for k, v in m1.state_dict().items()}
    s2 = {k: v.detach().clone() for k, v in m2.state_dict().items()}
    tr = D.fixed_subset(data.x_train.shape[0], 1000, 0, dev)
    splits = [(data.x_train[tr], data.y_train[tr]), (data.x_test[:1000], data.y_test[:1000])]
    flops = forward_flops(model, data.input_shape)
    peak = matmul_rate(dev)
    print(f"device {dev}, threads {torch.get_num_threads()}, float32 matmul {peak / 1e9:.1f} GFLOP/s, "
          f"{flops / 1e3:.0f} kFLOP per example forward")
    reps = 1 if args.quick else 3
    if args.layouts:
        return layouts(model, splits[0][0])

    alphas = torch.linspace(0, 1, 21, dtype=torch.float64)
    bench("barrier, 21 points", model, [s1, s2], torch.stack([1 - alphas, alphas], 1), splits, flops, peak, reps, dev)

    n = 21 if args.quick else 51
    gen = torch.Generator().manual_seed(0)
    d1 = D.filter_normalised_direction(model, s1, gen)
    d2 = D.filter_normalised_direction(model, s1, gen)
    t = torch.linspace(-1, 1, n, dtype=torch.float64)
    a, b = torch.meshgrid(t, t, indexing="ij")
    coeffs = torch.stack([torch.ones(n * n, dtype=torch.float64), a.reshape(-1), b.reshape(-1)], 1)
    # vmap's grouped convolutions are 2-5x slower than a loop on the CPU (see the 21-point barrier):
    # on the CPU the full 51×51 slice leaves it out unless asked, to stay within ~3 minutes
    with_vmap = dev.type == "cuda" or args.quick or args.vmap_slice
    bench(f"2D slice, {n}×{n}", model, [s1, d1, d2], coeffs, splits, flops, peak, 1, dev, with_vmap, block=n)


if __name__ == "__main__":
    main()
