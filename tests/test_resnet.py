"""The built-in ResNet-20 (He et al. 2016) and the CIFAR-10 example that uses it: the network is
the paper's, runs on any image shape, and goes through every probe of the pipeline on a tiny
CIFAR-shaped data set made here; the example spec plans, and says where CIFAR-10 must be."""

from __future__ import annotations

import pickle
import subprocess

import numpy as np
import pytest
import torch
from torch import nn

import lsdb
from lsdb import runner
from lsdb.errors import SpecError
from lsdb.plan import expand_runs, load_spec, parse_spec, probe_requests, simulated_study
from lsdb.store import Store
from lsdb.train.data import load_data
from lsdb.train.models import ResNet20, build_model, num_params, plain_layers
from tests.conftest import REPO, lsdb_cmd, module_on_path
from tests.timeouts import hang_timeout

EXAMPLE = REPO / "examples" / "fort2020-cifar10.toml"


def test_resnet20_is_the_papers_network():
    model = ResNet20((3, 32, 32), 10)  # width 16, depth 3
    assert num_params(model) == 269_722  # "0.27M" in He et al. 2016, Table 6
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) + 1 == 20  # 19 convolutions and the read-out
    assert [c.out_channels for c in convs] == [16] * 7 + [32] * 6 + [64] * 6
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 19
    # option A: the shortcuts have no parameters, so every parameter belongs to a conv, BN or the read-out
    owners = {type(model.get_submodule(name.rpartition(".")[0])) for name, _ in model.named_parameters()}
    assert owners == {nn.Conv2d, nn.BatchNorm2d, nn.Linear}
    assert plain_layers(model) is None  # a residual net: the chain-only fast paths must not apply


@pytest.mark.parametrize("shape", [(3, 32, 32), (1, 8, 8), (3, 7, 5)])
def test_resnet20_takes_any_image_shape(shape):
    model = ResNet20(shape, 10, width=4)
    assert model(torch.randn(3, *shape)).shape == (3, 10)
    # width scales every stage: about 16² fewer weights at width 4 than at 16
    assert num_params(model) < num_params(ResNet20(shape, 10)) / 12


def test_the_spec_names_it():
    spec = parse_spec('[data]\nname = "digits"\n[model]\nname = "resnet20"\nwidth = 16\n')
    model = build_model(spec.model, (1, 8, 8), 10, seed=0)
    assert isinstance(model, ResNet20) and model.conv.out_channels == 16
    with pytest.raises(SpecError, match=r"resnet20 needs image inputs \(C, H, W\)"):
        build_model(spec.model, (40,), 10)


# ------------------------------------------------------------------------------ the example


def test_the_cifar_example_plans_every_probe_but_merge():
    spec = load_spec(EXAMPLE)
    assert spec.model.name == "resnet20" and spec.model.width == 16 and spec.data.name == "cifar10"
    runs = expand_runs(spec, 50_000)  # planning needs the split's size, not the files
    planned = {req[0] for req in probe_requests(spec, simulated_study(runs))}
    # ntk_distance waits for stored kernels; merge refuses ResNet-20 and is left out
    assert planned == set(spec.probe_params()) - {"ntk_distance"} and "merge" not in spec.probe_params()
    header = EXAMPLE.read_text().split("[experiment]")[0]
    assert "Time on one GPU: about 2 hours, an ESTIMATE" in header and "cifar-10-batches-py" in header


def test_a_missing_cifar_root_is_one_line_naming_the_path(tmp_path):
    text = EXAMPLE.read_text().replace('root = "data"', f'root = "{tmp_path / "nowhere"}"')
    with pytest.raises(SpecError) as e:
        runner.plan(parse_spec(text), Store(tmp_path / "store"))
    message = str(e.value)
    assert "\n" not in message and str(tmp_path / "nowhere" / "cifar-10-batches-py") in message


def test_the_cli_says_where_cifar_must_be(tmp_path, cli_env):
    spec = tmp_path / "cifar.toml"
    spec.write_text(EXAMPLE.read_text().replace('root = "data"', f'root = "{tmp_path / "nowhere"}"'))
    r = subprocess.run(lsdb_cmd() + ["run", str(spec), "--store", str(tmp_path / "s")], capture_output=True,
                       text=True, env=cli_env, timeout=hang_timeout(300))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "cifar-10-batches-py" in r.stderr


def test_cifar_in_torchvisions_layout_feeds_resnet20(tmp_path):
    """A few images written the way torchvision's CIFAR-10 download leaves them."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as fh:
            pickle.dump({"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8), "labels": [0, 1, 2, 3]}, fh)
    spec = parse_spec(EXAMPLE.read_text().replace('root = "data"', f'root = "{tmp_path}"')
                      .replace("probe_set_size = 256", "probe_set_size = 8"))
    data = load_data(spec.data)
    assert data.x_train.shape == (20, 3, 32, 32) and data.x_test.shape == (4, 3, 32, 32)
    model = build_model(spec.model, data.input_shape, data.num_classes, seed=0)
    assert model(data.x_train).shape == (20, 10)


# ------------------------------------------------------------------------- every probe on it

CIFAR_LIKE = '''
import torch


def cifar_like(n_train=64, n_test=32, seed=0):
    """Random CIFAR-shaped images; every class in both splits."""
    g = torch.Generator().manual_seed(seed)
    y, yt = torch.arange(n_train) % 10, torch.arange(n_test) % 10
    return (torch.randn(n_train, 3, 32, 32, generator=g), y[torch.randperm(n_train, generator=g)],
            torch.randn(n_test, 3, 32, 32, generator=g), yt)
'''

SPEC = """
[experiment]
name = "resnet-tiny"
seeds = [0, 1]

[data]
factory = "cifarlike:cifar_like"
probe_set_size = 8

[model]
name = "resnet20"
width = 4

[optim]
lr = 0.05
batch_size = 32
epochs = 2
lr_drops = [1.5]

[train]
chance_after_epochs = 10  # random labels: the runs stay at chance, which must not mark them diverged

[checkpoints]
log_points = 0
every_epochs = 1

[spawn]
times = [1.0]
children = 2
child_checkpoints = "final"

[probes.eval]
[probes.weights]
[probes.ntk]
variant = "trace"
chunk = 4
[probes.ntk_distance]
variant = "trace"
[probes.kernel_accuracy]
on_checkpoints = "final"
on_runs = "parents"
steps = 3
train_eval_size = 16
[probes.barrier]
points = 3
train_subset = 32
test_subset = 16
[probes.hessian]
on_checkpoints = "final"
on_runs = "parents"
batch_size = 32
top_k = 2
max_iter = 6
trace_hvps = 2
density_vectors = 0
[probes.flatness]
on_checkpoints = "final"
on_runs = "parents"
train_subset = 32
directions = 1
points = 3
curvature_points = 3
restarts = 1
ascent_steps = 1
pgd_steps = 1
[probes.slice]
on_runs = "parents"
dims = [1]
points_1d = 3
train_subset = 32
test_subset = 16
[probes.merge]
points = 3
train_subset = 32
"""

#: What ``probe_job.batchnorm`` must say for each probe on a network with BatchNorm (docs/batchnorm.md).
SEMANTICS = {"eval": "running", "weights": "unused", "ntk": "running", "ntk_distance": "running",
             "kernel_accuracy": "running", "hessian": "running", "barrier": "recomputed",
             "flatness": "recomputed", "slice": "recomputed", "merge": "refused"}


@pytest.fixture
def cifar_like(tmp_path, monkeypatch):
    yield from module_on_path(tmp_path / "mine", "cifarlike", CIFAR_LIKE, monkeypatch)


@pytest.mark.slow
def test_resnet20_runs_every_probe(cifar_like, tmp_path):
    store = Store.init(tmp_path / "store")
    summary = runner.run(parse_spec(SPEC), store)
    db = lsdb.open(tmp_path / "store")
    jobs = db.sql("SELECT probe, state, batchnorm, error FROM probe_job")
    by_state = {}
    for probe, state, bn, error in jobs.rows():
        by_state.setdefault(probe, set()).add(state)
        assert bn == SEMANTICS[probe], (probe, bn)
        if probe == "merge":  # refused, with the model and the reason named
            assert state == "failed" and "merge: cannot align ResNet20: it has BatchNorm" in error
            assert "residual" in error and "\n" not in error
    assert set(by_state) == set(SEMANTICS)
    assert all(states == {"done"} for probe, states in by_state.items() if probe != "merge"), by_state
    assert summary.failures and all("merge" in f for f in summary.failures)
    assert db.sql("SELECT bool_and(bn_recomputed) AS b FROM barrier")["b"][0] is True
    # the trainer measures a checkpoint as the eval probe does: in eval mode, without the
    # measurement's batches leaking into the running statistics it stores
    pairs = db.sql("SELECT c.test_loss AS trainer, e.test_loss AS probe FROM checkpoint c "
                   "JOIN eval e ON e.checkpoint_id = c.id").rows()
    assert pairs and all(a == pytest.approx(b, rel=1e-5) for a, b in pairs), pairs[:3]
