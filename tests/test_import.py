"""``lsdb import``: checkpoints trained elsewhere become a run of the spec, probed like lsdb's own."""

from __future__ import annotations

import subprocess

import pytest
import torch

import lsdb
from lsdb import runner
from lsdb.errors import LsdbError
from lsdb.ingest.importer import import_checkpoints
from lsdb.plan import parse_spec
from lsdb.store import Store
from lsdb.train.checkpoints import load_weights
from tests.conftest import TINY_SPEC, lsdb_cmd
from tests.timeouts import hang_timeout

# one seed, no spawns: every row of the imported store can equal the trained one
SPEC = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("times = [1.0]", "times = []")
ROWS = {
    "checkpoint": "SELECT id, run_id, step, epoch, sha256, train_loss, train_error, test_loss, test_error "
                  "FROM checkpoint ORDER BY id",
    "eval": "SELECT job_id, train_loss, train_error, test_loss, test_error FROM eval ORDER BY job_id",
    "weights": "SELECT job_id, idx, norm, distance FROM weights ORDER BY job_id, idx",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A store where lsdb trained and probed the spec, and its parent's weights as torch.save files."""
    root = tmp_path_factory.mktemp("imp")
    store = Store.init(root / "trained")
    assert runner.run(parse_spec(SPEC), store).ok
    folder = root / "files"
    folder.mkdir()
    for step, sha in lsdb.open(store).sql("SELECT step, sha256 FROM checkpoint").rows():
        torch.save(load_weights(store.checkpoints, sha), folder / f"step_{step}.pt")
    return store, folder


def rows(store, q):
    return lsdb.open(store.root).sql(q).rows()


@pytest.mark.slow
def test_imported_files_give_the_rows_lsdb_run_gives(trained, tmp_path):
    store, folder = trained
    fresh = Store.init(tmp_path / "imported")
    report = import_checkpoints(fresh, parse_spec(SPEC), folder, "step_{step}.pt")
    assert len(report.imported) == len(list(folder.iterdir())) and not report.known
    summary = runner.run(parse_spec(SPEC), fresh)
    assert summary.ok and summary.trained == 0  # lsdb never trains an imported run
    for name, q in ROWS.items():
        assert rows(fresh, q) == rows(store, q), name


def test_importing_twice_changes_nothing(trained, tmp_path):
    _, folder = trained
    st = Store.init(tmp_path / "twice")
    import_checkpoints(st, parse_spec(SPEC), folder, "step_{step}.pt")
    before = {name: rows(st, q) for name, q in ROWS.items() if name == "checkpoint"}
    again = import_checkpoints(st, parse_spec(SPEC), folder, "step_{step}.pt")
    assert not again.imported and len(again.known) == len(before["checkpoint"])
    assert rows(st, ROWS["checkpoint"]) == before["checkpoint"]


def test_other_weights_at_a_stored_step_are_refused(trained, tmp_path):
    _, folder = trained
    st = Store.init(tmp_path / "other")
    import_checkpoints(st, parse_spec(SPEC), folder, "step_{step}.pt")
    changed = tmp_path / "changed"
    changed.mkdir()
    for f in folder.iterdir():
        state = torch.load(f, weights_only=True)
        if f.name == "step_0.pt":
            state = {k: v + 1 for k, v in state.items()}
        torch.save(state, changed / f.name)
    with pytest.raises(LsdbError, match=r"step 0 of run \w+ is stored with other weights; .*step_0.pt would replace"):
        import_checkpoints(st, parse_spec(SPEC), changed, "step_{step}.pt")


def copy_folder(folder, to, drop=(), change=None):
    to.mkdir()
    for f in sorted(folder.iterdir()):
        if f.name in drop:
            continue
        (to / f.name).write_bytes(f.read_bytes())
    if change:
        change(to)
    return to


@pytest.mark.parametrize("case, message", [
    ("nothing", r"no file in .* matches 'epoch_\{epoch\}.safetensors'"),
    ("garbage", r"file .*step_0.pt is not a state dict lsdb can read safely"),
    ("pickle", r"file .*step_0.pt is not a state dict lsdb can read safely \(UnpicklingError"),
    ("shape", r"file .*step_0.pt does not fit the spec's model: net.0.weight is \(3, 3\), the model's is \(32, 64\)"),
    ("gap", r"do not cover the spec's schedule for this run: steps \d+ are missing .*epochs = \["),
    ("pattern", r"--pattern 'weights.pt' must hold exactly one of \{epoch\} or \{step\}"),
])
def test_errors_name_the_file(trained, tmp_path, case, message):
    _, folder = trained
    pattern = "step_{step}.pt"
    if case == "nothing":
        pattern = "epoch_{epoch}.safetensors"
        src = folder
    elif case == "garbage":
        src = copy_folder(folder, tmp_path / "g", change=lambda d: (d / "step_0.pt").write_bytes(b"not a tensor file"))
    elif case == "pickle":
        src = copy_folder(folder, tmp_path / "p", change=lambda d: torch.save({"w": _Evil()}, d / "step_0.pt"))
    elif case == "shape":
        def bad(d):
            state = torch.load(d / "step_0.pt", weights_only=True)
            state["net.0.weight"] = torch.zeros(3, 3)
            torch.save(state, d / "step_0.pt")
        src = copy_folder(folder, tmp_path / "s", change=bad)
    elif case == "gap":
        last = max(folder.iterdir(), key=lambda f: int(f.stem.split("_")[1])).name
        src = copy_folder(folder, tmp_path / "gap", drop=(last,))
    else:
        pattern = "weights.pt"
        src = folder
    with pytest.raises(LsdbError, match=message):
        import_checkpoints(Store.init(tmp_path / "st"), parse_spec(SPEC), src, pattern)


class _Evil:
    """Pickled into a file: torch.load(weights_only=True) must refuse to build it."""

    def __reduce__(self):
        return (print, ("pickle ran",))


def test_wrapped_state_dicts_and_safetensors_are_read(trained, tmp_path):
    from safetensors.torch import save_file

    from lsdb.ingest.importer import load_state_dict

    _, folder = trained
    state = torch.load(folder / "step_0.pt", weights_only=True)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}, tmp_path / "w.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for f in ("w.pt", "w.safetensors"):
        got = load_state_dict(tmp_path / f)
        assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)


def test_cli_import(trained, tmp_path, cli_env):
    _, folder = trained
    spec = tmp_path / "s.toml"
    spec.write_text(SPEC)
    r = subprocess.run(lsdb_cmd() + ["import", str(folder), "--spec", str(spec), "--pattern", "step_{step}.pt",
                                     "--store", str(tmp_path / "cli")], capture_output=True, text=True, env=cli_env,
                       timeout=hang_timeout(300))
    assert r.returncode == 0, r.stderr
    assert "checkpoints imported, 0 already stored" in r.stdout
    r = subprocess.run(lsdb_cmd() + ["import", str(tmp_path / "nowhere"), "--spec", str(spec),
                                     "--store", str(tmp_path / "cli")], capture_output=True, text=True, env=cli_env,
                       timeout=hang_timeout(300))
    assert r.returncode == 1 and "no folder" in r.stderr and "Traceback" not in r.stderr
