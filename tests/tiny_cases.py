"""One shared set of tiny cases for the probe tests.

Each probe is tested against a brute-force reference on a tiny net, mostly in float64. What those
tests have in common is built here, once:

* data and models: ``random_data`` (seeded Gaussian inputs, uniform labels), ``ConvBNNet`` (a
  conv–BatchNorm–linear net), and ``CASES``, named ``TinyCase``s (a model factory and the data it
  is tested on). ``case(name)`` looks one up; ``cases(*names)`` gives them to
  ``pytest.mark.parametrize`` or a parametrised fixture with the names as test ids.
* states: ``clone_state``; ``TinyCase.states`` (one seeded model per seed, e.g. two checkpoints).
* refs and contexts: ``checkpoint_ref``, ``checkpoint_refs``, ``run_ref``, ``FakeStudy`` (the
  planner's view of a hand-made study) and ``context`` (a ``ProbeContext`` on the CPU with its
  ``Artifacts`` folder under ``tmp_path``, see ``artifacts``).
* dense references, written the plain way rather than with the code under test:
  ``train_subset``, ``loss_and_error``, ``interpolation_curve``, ``per_sample_jacobian`` and
  ``dense_hessian``.

Everything here draws its random numbers from explicitly seeded generators (or reseeds the global
one where a model is built), so a case is the same tensors in every test that uses it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lsdb.artifacts import Artifacts
from lsdb.probes.base import CheckpointRef, ProbeContext, RunRef, Study
from lsdb.train.data import Data
from lsdb.train.models import MLP, CNN1d, CNN2d, PatchNet

DT = torch.float64
ZERO_SHA = "0" * 64
N_PROBE = 5  # the default probe set of a context: the first five training inputs

# ----------------------------------------------------------------------------- data and models


def random_data(n_train: int, n_test: int, shape: Sequence[int], classes: int, seed: int = 0, *,
                name: str = "toy", dtype: torch.dtype = DT) -> Data:
    """Standard-normal inputs of ``shape`` with uniform labels in ``range(classes)``, drawn from one
    generator seeded with ``seed`` in the order x_train, y_train, x_test, y_test."""
    g = torch.Generator().manual_seed(seed)
    return Data(name, torch.randn(n_train, *shape, generator=g, dtype=dtype),
                torch.randint(0, classes, (n_train,), generator=g),
                torch.randn(n_test, *shape, generator=g, dtype=dtype),
                torch.randint(0, classes, (n_test,), generator=g), classes)


class ConvBNNet(nn.Module):
    """Conv1d (kernel 3, no padding) → BatchNorm1d → ReLU → Linear: the smallest net with BatchNorm
    buffers (running statistics, a step counter). ``features`` = channels × (length − 2)."""

    def __init__(self, in_channels: int, channels: int, features: int, classes: int):
        super().__init__()
        self.conv = nn.Conv1d(in_channels, channels, 3)
        self.bn = nn.BatchNorm1d(channels)
        self.out = nn.Linear(features, classes)

    def forward(self, x):
        return self.out(torch.relu(self.bn(self.conv(x))).flatten(1))


def clone_state(source: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict (of a module, or another state dict) whose tensors are fresh copies."""
    state = source.state_dict() if isinstance(source, nn.Module) else source
    return {k: v.clone() for k, v in state.items()}


@dataclass(frozen=True)
class TinyCase:
    """A named tiny classification problem: a model factory and the random data it is tested on."""

    name: str
    make: Callable[[], nn.Module]  # a fresh model in float32, weights from the global generator
    shape: tuple[int, ...]  # one input's shape
    classes: int
    n_train: int
    n_test: int
    data_seed: int = 0
    data_name: str = "toy"

    def model(self, seed: int | None = 0, dtype: torch.dtype = DT) -> nn.Module:
        """A fresh model in ``dtype``, built after ``torch.manual_seed(seed)`` (``None``: from the
        global generator as it stands, for a model whose weights are loaded from states anyway)."""
        if seed is not None:
            torch.manual_seed(seed)
        return self.make().to(dtype)

    def states(self, *seeds: int, dtype: torch.dtype = DT) -> list[dict[str, torch.Tensor]]:
        """One cloned state dict per seed, each of a fresh model seeded with it (independent inits)."""
        return [clone_state(self.model(s, dtype)) for s in seeds]

    def data(self, dtype: torch.dtype = DT) -> Data:
        return random_data(self.n_train, self.n_test, self.shape, self.classes, self.data_seed,
                           name=self.data_name, dtype=dtype)

    def build(self, seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor], Data]:
        """(model, a clone of its state, data) in float64, the model seeded with ``seed``."""
        model = self.model(seed)
        return model, clone_state(model), self.data()


CASES: tuple[TinyCase, ...] = (
    # the kernel probes (ntk, kernel_accuracy): 9 train / 4 test inputs, 3 classes
    TinyCase("cnn", lambda: CNN1d((1, 12), 3, width=3, kernels=(3, 3)), (1, 12), 3, 9, 4, 1, "rand"),
    TinyCase("mlp", lambda: MLP((6,), 3, width=5, depth=2), (6,), 3, 9, 4, 1, "rand"),
    # probes of one checkpoint on signals (flatness, slice; the model also in adversarial)
    TinyCase("cnn16", lambda: CNN1d((1, 16), 3, width=4, kernels=(3, 3)), (1, 16), 3, 50, 30, 2),
    # probes of two checkpoints (barrier, merge): length-12 signals, 4 classes, 60 train / 40 test
    TinyCase("cnn12", lambda: CNN1d((1, 12), 4, width=4, kernels=(3, 3)), (1, 12), 4, 60, 40),
    TinyCase("bn12", lambda: ConvBNNet(1, 3, 30, 4), (1, 12), 4, 60, 40),
    TinyCase("cnn12_w6", lambda: CNN1d((1, 12), 4, width=6, kernels=(3, 3)), (1, 12), 4, 60, 40),
    TinyCase("mlp12", lambda: MLP((1, 12), 4, width=7, depth=2), (1, 12), 4, 60, 40),
    # merge's other models: one it cannot match (no plain layers), and a CNN2d on 6×6 images
    TinyCase("patch12", lambda: PatchNet((1, 12), 4, width=4, patches=2), (1, 12), 4, 60, 40),
    TinyCase("cnn2d6", lambda: CNN2d((1, 6, 6), 4, width=5, depth=2), (1, 6, 6), 4, 60, 40),
    # the hessian probe: a tanh MLP, 96 inputs (its test split is made in the test)
    TinyCase("tanh16", lambda: nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 24), nn.Tanh(),
                                             nn.Linear(24, 4)), (16,), 4, 96, 0),
    # the fused (oneDNN) evaluator, in float32: MNIST-1D-sized signals, 10 classes
    TinyCase("cnn40", lambda: CNN1d((1, 40), 10, width=8), (1, 40), 10, 80, 50),
)


def case(name: str) -> TinyCase:
    """The case of that name in ``CASES``."""
    (found,) = [c for c in CASES if c.name == name]
    return found


def cases(*names: str) -> list:
    """The named cases as ``pytest.param``s with their names as ids, for ``parametrize``."""
    return [pytest.param(case(n), id=n) for n in names]


# ------------------------------------------------------------------------- refs and contexts


def checkpoint_ref(id: str = "c0", step: int = 0, epoch: float | None = None, run_id: str = "r",
                   sha256: str = ZERO_SHA) -> CheckpointRef:
    """A hand-made checkpoint ref; its epoch is its step unless given."""
    return CheckpointRef(id, run_id, step, float(step) if epoch is None else epoch, sha256)


def checkpoint_refs(n: int) -> list[CheckpointRef]:
    """Checkpoints ``c0 … c{n-1}`` of run ``r`` at steps (and epochs) 0 … n−1."""
    return [checkpoint_ref(f"c{i}", i) for i in range(n)]


def run_ref(id: str = "r", steps: Iterable[int] = (), *, checkpoints: Iterable[CheckpointRef] | None = None,
            kind: str = "parent", seed: int = 0, variant: str = "base", status: str = "finished",
            parent: str | None = None, parent_checkpoint: str | None = None, spawn_epoch: float | None = None,
            child_index: int | None = None, epochs: float = 4.0, lr: float = 0.1, batch_size: int = 8,
            momentum: float = 0.9, weight_decay: float = 0.0, data_seed: int = 0) -> RunRef:
    """A hand-made run ref. Its checkpoints are ``checkpoints`` when given, else one per step in
    ``steps``, named ``{id}-{step}``, at epoch step/10."""
    if checkpoints is None:
        checkpoints = [checkpoint_ref(f"{id}-{s}", s, s / 10, id) for s in steps]
    return RunRef(id, kind, seed, variant, status, parent, parent_checkpoint, spawn_epoch, child_index,
                  epochs, lr, batch_size, momentum, weight_decay, data_seed, tuple(checkpoints))


class FakeStudy(Study):
    """The planner's view of a hand-made study: ``runs``, and for ``results(table)`` the rows given
    per table name (asking for any other table fails the test)."""

    def __init__(self, runs: Iterable[RunRef], results: dict[str, list[dict]] | None = None):
        self.runs = list(runs)
        self._results = results or {}

    def run(self, run_id: str) -> RunRef:
        for r in self.runs:
            if r.id == run_id:
                return r
        raise KeyError(run_id)  # as lsdb.plan.StoreStudy does

    def results(self, table: str):
        import polars as pl

        assert table in self._results, table
        rows = self._results[table]
        return pl.DataFrame(rows) if rows else pl.DataFrame()


def artifacts(tmp_path) -> Artifacts:
    """The artifact store of a test: the folder ``art`` under ``tmp_path`` (``context`` uses it)."""
    return Artifacts(tmp_path / "art")


def context(model: nn.Module | None, data: Data | None, tmp_path, *, states: list | None = None,
            checkpoints: list[CheckpointRef] | None = None, runs: list[RunRef] | None = None,
            probe_indices: torch.Tensor | None = None, dtype: torch.dtype = DT, role: str = "self",
            inputs: dict | None = None, seed: int = 0) -> ProbeContext:
    """A ``ProbeContext`` on the CPU, as the worker would build it.

    ``states`` defaults to one clone of ``model``'s own state (none without a model);
    ``checkpoints`` to ``c0 … c{k-1}`` of run ``r``, one per state; ``probe_indices`` to the
    first ``N_PROBE`` training inputs; the artifacts live in ``artifacts(tmp_path)``."""
    if states is None:
        states = [] if model is None else [clone_state(model)]
    return ProbeContext(model=model, states=states,
                        checkpoints=checkpoint_refs(len(states)) if checkpoints is None else checkpoints,
                        runs=[] if runs is None else runs, data=data,
                        probe_indices=torch.arange(N_PROBE) if probe_indices is None else probe_indices,
                        device=torch.device("cpu"), dtype=dtype, artifacts=artifacts(tmp_path), role=role,
                        inputs={} if inputs is None else inputs, seed=seed)


# ----------------------------------------------------------------------------- dense references


def train_subset(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """The ``size`` of ``n`` training indices a probe's ``train_subset`` evaluates on: the first
    ``size`` of a permutation drawn with ``seed``, sorted."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size].sort().values


def loss_and_error(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                   state: dict[str, torch.Tensor] | None = None) -> tuple[float, float]:
    """Mean cross-entropy and error of ``model`` on (x, y), without grad, in the model's current
    mode; with ``state``, of a copy of ``model`` holding that state (``model`` is left alone)."""
    if state is not None:
        model = copy.deepcopy(model)
        model.load_state_dict(state)
    with torch.no_grad():
        logits = model(x)
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) != y).to(logits.dtype).mean())


def interpolation_curve(model: nn.Module, s1: dict, s2: dict, alphas: Iterable[float], x: torch.Tensor,
                        y: torch.Tensor, bn_stats_from: torch.Tensor | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain reference for the straight path between two states: for each α, build the state
    dict (1 − α)·s1 + α·s2 (integer buffers from s1), load it into a copy of ``model``, evaluate it
    in eval mode on (x, y). Returns the losses and errors as float64 tensors.

    With ``bn_stats_from`` the BatchNorm running statistics are first recomputed at each α: reset,
    cumulative average (momentum None), one train-mode pass over those inputs."""
    m = copy.deepcopy(model)
    losses, errors = [], []
    for a in alphas:
        m.load_state_dict({k: ((1 - a) * s1[k] + a * s2[k]) if s1[k].is_floating_point() else s1[k] for k in s1})
        if bn_stats_from is not None:
            for mod in m.modules():
                if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                    mod.reset_running_stats()
                    mod.momentum = None
            m.train()
            with torch.no_grad():
                m(bn_stats_from)
        m.eval()
        loss, error = loss_and_error(m, x, y)
        losses.append(loss)
        errors.append(error)
    return torch.tensor(losses, dtype=DT), torch.tensor(errors, dtype=DT)


def per_sample_jacobian(model: nn.Module, state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """J (n·C × P) of the logits in the trainable parameters, one ``autograd.grad`` call per
    (input, logit); loads ``state`` into ``model``. J Jᵀ is the full empirical NTK."""
    model.load_state_dict(state)
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        for a in range(out.shape[0]):
            rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[a], params, retain_graph=True)]))
    return torch.stack(rows)


def dense_hessian(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense Hessian (P × P) of the mean cross-entropy on (x, y) in the model's parameters,
    flattened in ``named_parameters`` order: ``jacrev`` of ``jacrev`` through ``functional_call``
    (the same matrix as ``torch.func.hessian``)."""
    params = {n: p.detach() for n, p in model.named_parameters()}
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def flat_loss(w):
        p = {n: t.view(s) for n, t, s in zip(names, w.split(sizes), shapes)}
        return F.cross_entropy(functional_call(model, p, (x,)), y)

    w0 = torch.cat([p.reshape(-1) for p in params.values()])
    return torch.func.jacrev(torch.func.jacrev(flat_loss))(w0)
