"""Data sets, all in memory as tensors. Nothing is downloaded at run time.

- ``mnist1d``: MNIST-1D (Greydanus 2020) generated locally by the ``mnist1d`` package with its
  default arguments (4,000 train / 1,000 test signals of length 40), standardised with the
  training set's mean and std.
- ``digits``: scikit-learn's 8×8 handwritten digits (1,797 images; a fixed 80/20 split), tiny and
  fast, for tests.
- ``cifar10``: user-owned CIFAR-10 in torchvision's layout (``cifar-10-batches-py`` under ``root``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from lsdb.errors import SpecError
from lsdb.train import factories


@dataclass(frozen=True)
class Data:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device=None, dtype=None) -> "Data":
        def mv(x, float_):
            return x.to(device=device, dtype=dtype if (float_ and dtype) else x.dtype)

        return replace(self, x_train=mv(self.x_train, True), y_train=mv(self.y_train, False),
                       x_test=mv(self.x_test, True), y_test=mv(self.y_test, False))


_CACHE: dict[tuple, Data] = {}


def load_data(spec) -> Data:
    """Load the data set named by ``spec`` (an ``lsdb.spec.DataSpec``) or made by its factory,
    cached per process."""
    key = (spec.name, spec.train_subset, spec.root, spec.factory, spec.kwargs)
    if key not in _CACHE:
        if not spec.factory and spec.name not in LOADERS:
            raise SpecError(f"unknown data set '{spec.name}'; valid: {', '.join(LOADERS)}")
        data = _from_factory(spec) if spec.factory else LOADERS[spec.name](spec)
        if spec.train_subset:
            data = replace(data, x_train=data.x_train[: spec.train_subset], y_train=data.y_train[: spec.train_subset])
        _CACHE[key] = data
    return _CACHE[key]


def _standardise(x_train: np.ndarray, x_test: np.ndarray):
    mean, std = x_train.mean(), x_train.std()
    return (x_train - mean) / std, (x_test - mean) / std


def _mnist1d(spec) -> Data:
    from mnist1d.data import get_dataset_args, make_dataset

    d = make_dataset(get_dataset_args())
    x, xt = _standardise(d["x"].astype(np.float32), d["x_test"].astype(np.float32))
    return Data("mnist1d", torch.from_numpy(x), torch.from_numpy(d["y"]).long(),
                torch.from_numpy(xt), torch.from_numpy(d["y_test"]).long(), 10)


def _digits(spec) -> Data:
    from sklearn.datasets import load_digits

    d = load_digits()
    order = np.random.default_rng(0).permutation(len(d.target))
    cut = int(0.8 * len(order))
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # (N, 1, 8, 8)
    tr, te = order[:cut], order[cut:]
    x_tr, x_te = _standardise(x[tr], x[te])
    y = torch.from_numpy(d.target).long()
    return Data("digits", torch.from_numpy(x_tr), y[tr], torch.from_numpy(x_te), y[te], 10)


def _cifar10(spec) -> Data:
    root = Path(spec.root or "data") / "cifar-10-batches-py"
    if not root.exists():
        raise SpecError(
            f"data.root: CIFAR-10 not found at {root}; put torchvision's 'cifar-10-batches-py' folder "
            f"under data.root (lsdb never downloads data)"
        )
    import pickle  # CIFAR-10's own file format; only the user's local copy is read

    def batch(name):
        with open(root / name, "rb") as fh:
            b = pickle.load(fh, encoding="latin1")
        return np.asarray(b["data"], dtype=np.float32).reshape(-1, 3, 32, 32) / 255.0, np.asarray(b["labels"])

    parts = [batch(f"data_batch_{i}") for i in range(1, 6)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    xt, yt = batch("test_batch")
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    std = x.std(axis=(0, 2, 3), keepdims=True)
    return Data("cifar10", torch.from_numpy((x - mean) / std), torch.from_numpy(y).long(),
                torch.from_numpy((xt - mean) / std), torch.from_numpy(yt).long(), 10)


LOADERS = {"mnist1d": _mnist1d, "digits": _digits, "cifar10": _cifar10}


def _from_factory(spec) -> Data:
    """``factory(**kwargs)`` returns (x_train, y_train, x_test, y_test) as tensors or arrays, or two
    ``Dataset``s of (x, y) pairs; inputs become float32, labels int64 in 0..C-1."""
    out = factories.call(spec.factory, "data", **dict(spec.kwargs))
    where = f"data factory {spec.factory}"
    if isinstance(out, (tuple, list)) and len(out) == 2:
        (x, y), (xt, yt) = (_from_dataset(ds, where, split) for ds, split in zip(out, ("train", "test")))
    elif isinstance(out, (tuple, list)) and len(out) == 4:
        x, y, xt, yt = (_tensor(v, where, name) for v, name in zip(out, ("x_train", "y_train", "x_test", "y_test")))
    else:
        raise SpecError(f"{where} returned {type(out).__name__}; return (x_train, y_train, x_test, y_test) "
                        f"or (train_dataset, test_dataset)")
    for xs, ys, split in ((x, y, "train"), (xt, yt, "test")):
        if xs.ndim < 2 or ys.ndim != 1 or xs.shape[0] != ys.shape[0] or xs.shape[0] == 0:
            raise SpecError(f"{where}: {split} inputs {tuple(xs.shape)} and labels {tuple(ys.shape)} must be "
                            f"(N, ...) and (N,) with N > 0")
        if ys.is_floating_point() or ys.is_complex() or (ys < 0).any():
            raise SpecError(f"{where}: {split} labels must be integers >= 0 (class indices)")
    if x.shape[1:] != xt.shape[1:]:
        raise SpecError(f"{where}: train inputs are {tuple(x.shape[1:])} per example, test inputs {tuple(xt.shape[1:])}")
    classes = int(max(y.max(), yt.max())) + 1
    if classes < 2:
        raise SpecError(f"{where}: the labels name a single class; a classifier needs at least 2")
    return Data(spec.factory, x.float(), y.long(), xt.float(), yt.long(), classes)


def _tensor(value, where: str, name: str) -> torch.Tensor:
    try:
        return torch.as_tensor(np.asarray(value)) if not isinstance(value, torch.Tensor) else value.detach().cpu()
    except (TypeError, ValueError) as e:
        raise SpecError(f"{where}: {name} is not an array ({e})") from None


def _from_dataset(ds, where: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        pairs = [ds[i] for i in range(len(ds))]
        xs = torch.stack([_tensor(p[0], where, f"{split} input") for p in pairs])
        ys = torch.as_tensor([int(p[1]) for p in pairs])
    except SpecError:
        raise
    except Exception as e:  # a Dataset of another shape
        raise SpecError(f"{where}: the {split} Dataset must give (x, y) pairs with integer y "
                        f"({type(e).__name__}: {e})") from None
    return xs, ys


def task_indices(labels: torch.Tensor, classes: tuple[int, ...] = (), fraction: float = 1.0,
                 seed: int = 0) -> torch.Tensor:
    """The training examples of a fine-tune's task, as sorted indices into ``labels``: those whose
    label is in ``classes`` (every example when empty); then, when ``fraction`` < 1, a fixed
    subset of round(fraction · n) of these n (at least one), the first of a permutation drawn with
    ``seed``. Empty when no example qualifies (the planner refuses such a task)."""
    labels = torch.as_tensor(labels).cpu()
    pool = torch.arange(labels.shape[0])
    if classes:
        pool = pool[torch.isin(labels, torch.tensor(classes, dtype=labels.dtype))]
    if fraction < 1 and pool.numel():
        keep = max(1, round(fraction * pool.numel()))
        g = torch.Generator().manual_seed(seed)
        pool = pool[torch.randperm(pool.numel(), generator=g)[:keep]].sort().values
    return pool


def probe_indices(data: Data, size: int, seed: int) -> torch.Tensor:
    """The experiment's fixed probe set: ``size`` distinct training indices drawn once with ``seed``."""
    n = data.x_train.shape[0]
    if size > n:
        raise SpecError(f"data.probe_set_size = {size} is larger than the training set ({n} examples)")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:size].sort().values
