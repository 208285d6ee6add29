"""The researcher's own model and data, named in the spec as ``package.module:function``.

The factories live in a file outside the package (written by the test into a temporary folder put
on ``$LSDB_PATH``), and the whole pipeline runs on them: training, spawning, every probe family,
findings.
"""

from __future__ import annotations

import subprocess

import pytest
import torch
from torch import nn

import lsdb
from lsdb import runner
from lsdb.errors import SpecError
from lsdb.plan import parse_spec
from lsdb.store import Store
from lsdb.train import factories
from lsdb.train.data import load_data
from lsdb.train.models import build_model, check_fits
from tests.conftest import lsdb_cmd, module_on_path
from tests.timeouts import hang_timeout

MODULE = '''
import math

import torch
from torch import nn


def tanh_net(input_shape, num_classes, hidden=16):
    """Not one of lsdb's models: tanh units, a bias-free read-out."""
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), hidden), nn.Tanh(),
                         nn.Linear(hidden, num_classes, bias=False))


def blobs(n_train=240, n_test=120, dim=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = 2.5 * torch.randn(classes, dim, generator=g)

    def draw(n):
        y = torch.arange(n) % classes
        return centres[y] + torch.randn(n, dim, generator=g), y

    x, y = draw(n_train)
    xt, yt = draw(n_test)
    return x, y, xt, yt


def blob_datasets(**kwargs):
    from torch.utils.data import TensorDataset

    x, y, xt, yt = blobs(**kwargs)
    return TensorDataset(x, y), TensorDataset(xt, yt)


def broken(input_shape, num_classes, **kwargs):
    raise RuntimeError("this network is not finished")


def not_a_module(input_shape, num_classes, **kwargs):
    return 42


def one_class():
    return torch.zeros(8, 2), torch.zeros(8, dtype=torch.long), torch.zeros(4, 2), torch.zeros(4, dtype=torch.long)
'''

SPEC = """
[experiment]
name = "own"
seeds = [0]

[data]
factory = "mynets:blobs"
kwargs = { dim = 6, classes = 3 }
probe_set_size = 32

[model]
factory = "mynets:tanh_net"
kwargs = { hidden = 12 }

[optim]
lr = 0.1
batch_size = 40
epochs = 3
lr_drops = [2.0]

[checkpoints]
log_points = 2
log_until = 0.5
every_epochs = 1

[spawn]
times = [1.0]
children = 2

[probes.eval]
[probes.weights]
[probes.ntk]
variant = "trace"
[probes.ntk_distance]
variant = "trace"
[probes.kernel_accuracy]
steps = 20
train_eval_size = 64
[probes.barrier]
points = 5
[probes.hessian]
batch_size = 64
top_k = 3
max_iter = 30
trace_hvps = 10
density_vectors = 1
density_iters = 10
[probes.flatness]
on_checkpoints = "final"
[probes.slice]
on_checkpoints = "final"
"""


@pytest.fixture
def nets(tmp_path, monkeypatch):
    yield from module_on_path(tmp_path / "mine", "mynets", MODULE, monkeypatch)


@pytest.mark.slow
def test_the_whole_pipeline_runs_on_a_model_and_data_of_the_researcher(nets, tmp_path):
    store = Store.init(tmp_path / "store")
    summary = runner.run(parse_spec(SPEC), store)
    assert summary.ok, (summary.failures, summary.problems)
    assert summary.trained == 3 and summary.jobs_failed == 0
    db = lsdb.open(tmp_path / "store")
    runs = db.runs()
    assert set(runs["model"].to_list()) == {"mynets:tanh_net"} and set(runs["dataset"].to_list()) == {"mynets:blobs"}
    probes = set(db.sql("SELECT DISTINCT probe FROM probe_job WHERE state = 'done'")["probe"].to_list())
    assert probes >= {"eval", "weights", "ntk", "ntk_distance", "kernel_accuracy", "barrier", "hessian",
                      "flatness", "slice"}
    final = db.sql("SELECT min(test_error) AS e FROM checkpoint")["e"][0]
    assert final < 0.5  # the blobs are separable: the network learned them
    results = db.findings()
    assert len(results) > 0
    assert runner.plan(parse_spec(SPEC), store).nothing_to_do  # rebuilt the same way by every worker


def test_a_data_factory_may_return_datasets(nets):
    spec = parse_spec(SPEC.replace('factory = "mynets:blobs"', 'factory = "mynets:blob_datasets"'))
    data = load_data(spec.data)
    assert data.x_train.shape == (240, 6) and data.num_classes == 3 and data.y_train.dtype == torch.long
    plain = load_data(parse_spec(SPEC).data)
    assert torch.equal(plain.x_train, data.x_train) and torch.equal(plain.y_test, data.y_test)


def test_the_factory_and_its_kwargs_are_the_model_identity(nets):
    a = runner.plan(parse_spec(SPEC), Store(nets / "none")).runs_to_train
    b = runner.plan(parse_spec(SPEC.replace("hidden = 12", "hidden = 13")), Store(nets / "none")).runs_to_train
    assert {r.id for r in a}.isdisjoint({r.id for r in b})
    with pytest.raises(SpecError, match="model.width has no effect with model.factory; pass it in model.kwargs"):
        parse_spec(SPEC.replace("kwargs = { hidden = 12 }", "kwargs = { hidden = 12 }\nwidth = 99"))
    with pytest.raises(SpecError, match="data.name has no effect with data.factory"):
        parse_spec(SPEC.replace("probe_set_size = 32", "probe_set_size = 32\nname = 'digits'"))


@pytest.mark.parametrize("factory, message", [
    ("nowhere:net", "model factory nowhere:net: cannot import nowhere (ModuleNotFoundError"),
    ("mynets:missing", "model factory mynets:missing: module mynets has no function missing"),
    ("mynets:broken", "model factory mynets:broken failed: RuntimeError: this network is not finished"),
    ("mynets:not_a_module", "model factory mynets:not_a_module returned int, not a torch.nn.Module"),
])
def test_a_model_factory_that_fails_is_one_line_naming_it(nets, factory, message):
    spec = parse_spec(SPEC.replace('factory = "mynets:tanh_net"', f'factory = "{factory}"'))
    with pytest.raises(SpecError) as e:
        build_model(spec.model, (6,), 3)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


@pytest.mark.parametrize("factory, message", [
    ("mynets:tanh_net", "data factory mynets:tanh_net failed: TypeError"),
    ("mynets:one_class", "data factory mynets:one_class: the labels name a single class"),
])
def test_a_data_factory_that_fails_is_one_line_naming_it(nets, factory, message):
    spec = parse_spec(SPEC.replace('factory = "mynets:blobs"', f'factory = "{factory}"').replace(
        "kwargs = { dim = 6, classes = 3 }", ""))
    with pytest.raises(SpecError, match="^" + message.replace("(", r"\(")):
        load_data(spec.data)


@pytest.mark.parametrize("line, message", [
    ('factory = "not a factory"', "model.factory = 'not a factory' must be 'package.module:function'"),
    ("kwargs = 3", "model.kwargs must be a table"),
    ("kwargs = { a = { b = 1 } }", "model.kwargs.a must be a number, string, boolean or a list of them"),
])
def test_factory_keys_are_checked_at_load(line, message):
    text = SPEC.replace('factory = "mynets:tanh_net"\nkwargs = { hidden = 12 }', line)
    with pytest.raises(SpecError, match=message.replace("(", r"\(")):
        parse_spec(text)


def test_a_checkpoint_that_does_not_fit_names_the_first_mismatch():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    check_fits(model, state, "checkpoint c1")
    state["2.weight"] = torch.zeros(2, 5)
    with pytest.raises(SpecError, match=r"checkpoint c1 does not fit the spec's model: 2.weight is \(2, 5\), the model's is \(2, 3\)"):
        check_fits(model, state, "checkpoint c1")
    del state["2.weight"]
    with pytest.raises(SpecError, match="has no 2.weight"):
        check_fits(model, state, "checkpoint c1")


def test_cli_names_a_factory_it_cannot_import(tmp_path, cli_env):
    spec = tmp_path / "own.toml"
    spec.write_text(SPEC)
    cli_env.pop(factories.PATH_VAR, None)
    r = subprocess.run(lsdb_cmd() + ["run", str(spec), "--store", str(tmp_path / "s")], capture_output=True,
                       text=True, env=cli_env, timeout=hang_timeout(300))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "data factory mynets:blobs: cannot import mynets" in r.stderr
    assert "--path" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_lsdb_path_reaches_worker_processes(nets, tmp_path):
    store = Store.init(tmp_path / "pool")
    text = SPEC.split("[probes.eval]")[0] + "[probes.eval]\n[probes.weights]\n"
    summary = runner.run(parse_spec(text), store, workers=2)
    assert summary.ok and summary.jobs_done > 0


def test_add_import_path_keeps_order_and_is_idempotent(monkeypatch, tmp_path):
    monkeypatch.setenv(factories.PATH_VAR, "")
    factories.add_import_path(str(tmp_path / "a"), str(tmp_path / "b"))
    factories.add_import_path(str(tmp_path / "a"))
    import os

    assert os.environ[factories.PATH_VAR].split(os.pathsep) == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_the_readme_example_runs_as_written(tmp_path, cli_env):
    """The README's "your own model" example: its module and its spec, run with --path."""
    from pathlib import Path

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split("### Your own model and data")[1]
    module = section.split("```python")[1].split("```")[0]
    spec = section.split("<!-- own-model-spec -->")[1].split("```toml")[1].split("```")[0]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "mynets.py").write_text(module)
    (tmp_path / "own.toml").write_text(spec)
    cli_env.pop(factories.PATH_VAR, None)
    r = subprocess.run(lsdb_cmd() + ["run", "own.toml", "--path", "mine", "--store", "s"], capture_output=True,
                       text=True, env=cli_env, cwd=tmp_path, timeout=hang_timeout(600))
    assert r.returncode == 0, r.stderr
    runs = lsdb.open(tmp_path / "s").runs()
    assert set(runs["model"].to_list()) == {"mynets:tanh_net"} and runs.height == 1
