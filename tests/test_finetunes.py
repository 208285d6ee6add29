"""Fine-tunes ([finetunes.NAME]): strict spec validation, planned runs and ids, training from the
parent's base checkpoint on the task's examples only, and edits that retrain no parent."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import lsdb
from lsdb import runner
from lsdb.errors import SpecError
from lsdb.ids import child_data_seed
from lsdb.plan import expand_runs, parse_spec
from lsdb.store import Store
from tests.conftest import TINY_SPEC

N_TRAIN = 1437  # the digits training split

# one seed, no children, no probes: the parent is the only thing fine-tunes need
PARENT = (TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]").replace("times = [1.0]", "times = []")
          .split("[probes.eval]")[0])
FINETUNES = """
[finetunes.low]
classes = [2, 0, 1]
steps = 12
lr = 0.02

[finetunes.part]
train_fraction = 0.2
fraction_seed = 3
base = 1.0
steps = 6
lr = 0.05
momentum = 0.0
batch_size = 32
"""


def _spec(extra: str = FINETUNES, base: str = PARENT):
    return parse_spec(base + extra, source="ft.toml")


def _refused(body: str, base: str = PARENT) -> str:
    with pytest.raises(SpecError) as e:
        expand_runs(_spec(body, base), N_TRAIN)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1
    return msg


# ------------------------------------------------------------------------------------ the spec

@pytest.mark.parametrize("body, says", [
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nlrate = 1\n",
     f"ft.toml:{PARENT.count(chr(10)) + 5}: unknown key 'finetunes.a.lrate'"),
    ("[finetunes.a]\nclasses = [0]\nlr = 0.1\n", "finetunes.a needs steps = N"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\n", "finetunes.a needs lr = X"),
    ("[finetunes.a]\nsteps = 5\nlr = 0.1\n", "finetunes.a needs a task"),
    ("[finetunes.a]\ntrain_fraction = 1.0\nsteps = 5\nlr = 0.1\n", "needs a task"),
    ("[finetunes.a]\nclasses = [0, 10]\nsteps = 5\nlr = 0.1\n", "finetunes.a.classes = [0, 10] must name classes of "
                                                                 "digits, 0 to 9 (no class 10)"),
    ("[finetunes.a]\nclasses = [0, -1]\nsteps = 5\nlr = 0.1\n", "finetunes.a.classes = [0, -1] must be in"),
    ("[finetunes.a]\nclasses = [3, 3]\nsteps = 5\nlr = 0.1\n", "finetunes.a.classes lists class 3 twice"),
    ("[finetunes.a]\nclasses = 3\nsteps = 5\nlr = 0.1\n", "finetunes.a.classes must be a list"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 0\nlr = 0.1\n", "finetunes.a.steps = 0 must be in (0,"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5.5\nlr = 0.1\n", "finetunes.a.steps must be int"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = -1.0\n", "finetunes.a.lr = -1.0 must be > 0"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nmomentum = 1.0\n", "finetunes.a.momentum = 1.0 must be in [0, 1)"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nbatch_size = 0\n", "finetunes.a.batch_size = 0"),
    ("[finetunes.a]\ntrain_fraction = 0.0\nsteps = 5\nlr = 0.1\n", "finetunes.a.train_fraction = 0.0 must be in (0, 1]"),
    ("[finetunes.a]\ntrain_fraction = 1.5\nsteps = 5\nlr = 0.1\n", "finetunes.a.train_fraction = 1.5"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nbase = 'last'\n", "finetunes.a.base = 'last' must be 'final' "
                                                                          "or an epoch"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nbase = true\n", "finetunes.a.base = True must be 'final'"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nbase = 4\n", "finetunes.a.base = 4 must be in [0, epochs = 3]"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nvariant = 'wide'\n", "finetunes.a.variant = 'wide' must "
                                                                             "name a variant of this spec, one of base"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 5\nlr = 0.1\nvariant = 'bigg'\n[variants.big.optim]\nbatch_size = 256\n",
     "did you mean 'big'?"),
    ("[finetunes]\na = 3\n", "[finetunes.a] must be a table"),
    ("[finetunes.\"a\\nb\"]\nclasses = [0]\nsteps = 5\nlr = 0.1\n", "fine-tune name 'a\\nb' must be 1 to"),
    ("[finetunes.a]\nclasses = [0]\nsteps = 200000000\nlr = 0.1\n", "finetunes.a.steps = 200,000,000; lsdb plans at most"),
])
def test_bad_finetunes_are_one_line_errors_naming_the_key(body, says):
    assert says in _refused(body)


def test_finetunes_must_be_a_table_of_tables():
    with pytest.raises(SpecError, match="x.toml:1: \\[finetunes\\] must be a table of fine-tune names"):
        parse_spec("finetunes = 3\n", source="x.toml")


def test_classes_of_a_data_set_of_your_own_are_checked_against_its_labels():
    spec = parse_spec("[finetunes.a]\nclasses = [0, 2]\nsteps = 5\nlr = 0.1\n", source="own.toml")  # mnist1d
    with pytest.raises(SpecError, match="finetunes.a.classes = \\[0, 2\\]: the training split of mnist1d has no "
                                        "example of class 2"):
        expand_runs(spec, 300, labels=torch.tensor([0, 1, 3] * 100))


def test_finetunes_are_runs_of_their_own_and_leave_parents_and_children_alone():
    with_children = TINY_SPEC.split("[probes.eval]")[0]
    before = {r.id: r for r in expand_runs(_spec("", with_children), N_TRAIN)}
    after = expand_runs(_spec(FINETUNES, with_children), N_TRAIN)
    new = [r for r in after if r.id not in before]
    assert sorted((r.kind, r.seed, r.finetune.name) for r in new) == [
        ("finetune", s, n) for s in (0, 1) for n in ("low", "part")]
    for r in after:  # the same runs, and the parents save the bases too: epoch 1 and the end are on
        if r.id in before:  # the schedule already
            assert r.save_steps == before[r.id].save_steps
    parent = next(r for r in after if r.kind == "parent" and r.seed == 0)
    low, part = (next(r for r in new if r.seed == 0 and r.finetune.name == n) for n in ("low", "part"))
    labels = torch.as_tensor(__import__("lsdb.train.data", fromlist=["load_data"]).load_data(parent.config.data).y_train)
    n_low = int(torch.isin(labels, torch.tensor([0, 1, 2])).sum())
    assert (low.parent_id, low.spawn_step, low.spawn_epoch) == (parent.id, parent.total_steps, 3.0)
    assert (low.task_examples, low.steps_per_epoch, low.total_steps, low.save_steps) == (n_low, -(-n_low // 128), 12, (0, 12))
    assert low.finetune.classes == (0, 1, 2) and low.data_seed == child_data_seed(low.id)
    assert low.config.optim.lr == 0.02 and low.config.optim.lr_drops == () and low.config.optim.momentum == 0.9
    assert (part.spawn_step, part.spawn_epoch, part.task_examples) == (12, 1.0, round(0.2 * N_TRAIN))
    assert (part.config.optim.momentum, part.config.optim.batch_size, part.steps_per_epoch) == (0.0, 32, 9)
    assert low.id == "ba08c71df9b54064" and part.id == "f85e3a46184b98e7"  # pinned, as in tests/test_ids.py


def test_identity_and_ids_follow_what_shapes_the_weights():
    plain = _spec("")
    assert plain.identity() == parse_spec(PARENT, source="x").identity()
    a = _spec()
    written = _spec(FINETUNES.replace("steps = 12", "steps = 12\nbase = 'final'\nvariant = 'base'"))
    assert written.identity() == a.identity() != plain.identity()
    ids = {r.finetune.name: r.id for r in expand_runs(a, N_TRAIN) if r.finetune}
    # the seed of a fraction drawn from nothing (train_fraction 1) shapes nothing
    same = _spec(FINETUNES.replace("steps = 12", "steps = 12\nfraction_seed = 9"))
    assert {r.finetune.name: r.id for r in expand_runs(same, N_TRAIN) if r.finetune} == ids
    for edit in ("lr = 0.02", "classes = [2, 0, 1]"):
        other = _spec(FINETUNES.replace(edit, {"lr = 0.02": "lr = 0.03", "classes = [2, 0, 1]": "classes = [0, 1]"}[edit]))
        got = {r.finetune.name: r.id for r in expand_runs(other, N_TRAIN) if r.finetune}
        assert got["low"] != ids["low"] and got["part"] == ids["part"]


def test_on_runs_selects_finetunes():
    spec = _spec(FINETUNES + "\n[probes.eval]\non_runs = 'finetunes'\n")
    assert dict(spec.probe_params()["eval"])["on_runs"] == "finetunes"


# ---------------------------------------------------------------------------------- training

def _retrain(store, parent_final_sha, cfg, classes, steps, data_seed):
    """The plain reference: load the base, fresh SGD, batches drawn from the task's examples only."""
    from lsdb.train.checkpoints import load_weights, tensors_sha256
    from lsdb.train.data import load_data
    from lsdb.train.models import build_model
    from lsdb.train.trainer import batch_indices

    data = load_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=0)
    model.load_state_dict(load_weights(store.checkpoints, parent_final_sha))
    pool = torch.nonzero(torch.isin(data.y_train, torch.tensor(classes))).flatten()
    spe = -(-len(pool) // cfg.optim.batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                          weight_decay=cfg.optim.weight_decay)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the trainer
    seen = set()
    try:
        model.train()
        for step in range(steps):
            idx = pool[batch_indices(step, len(pool), cfg.optim.batch_size, spe, data_seed)]
            seen |= set(data.y_train[idx].tolist())
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    return tensors_sha256(model.state_dict()), seen


def test_a_finetune_starts_from_its_base_and_trains_on_its_task_only(tmp_path):
    store = Store.init(tmp_path / "s")
    spec = _spec()
    summary = runner.run(spec, store)
    assert summary.ok and summary.trained == 3
    db = lsdb.open(store.root)
    runs = {r["finetune"]: r for r in db.sql("SELECT * FROM run ORDER BY id").to_dicts()}
    parent, low, part = runs[None], runs["low"], runs["part"]
    ck = {(r["run_id"], r["step"]): r for r in db.sql("SELECT * FROM checkpoint").to_dicts()}
    # step 0 of a fine-tune is its base's weights, with a fresh (empty) optimiser state
    assert ck[low["id"], 0]["sha256"] == ck[parent["id"], parent["total_steps"]]["sha256"]
    assert ck[part["id"], 0]["sha256"] == ck[parent["id"], 12]["sha256"]  # base = epoch 1
    assert not ck[low["id"], 0]["has_optimizer"] and ck[low["id"], 12]["has_optimizer"]
    assert sorted(s for r, s in ck if r == low["id"]) == [0, 12]
    # the run table names the task
    assert (low["kind"], low["task_classes"], low["task_fraction"], low["parent_checkpoint_id"]) == \
        ("finetune", "0,1,2", 1.0, ck[parent["id"], 36]["id"])
    assert (part["task_classes"], part["task_fraction"], part["task_examples"], part["spawn_epoch"]) == \
        (None, 0.2, round(0.2 * N_TRAIN), 1.0)
    assert parent["task_fraction"] is None and parent["finetune"] is None
    task = json.loads(low["config_json"])["finetune"]
    assert task["classes"] == [0, 1, 2] and task["base_step"] == 36 and task["steps"] == 12
    # retrained by hand from the base on classes 0, 1, 2 only: the same weights, bit for bit
    planned = next(r for r in expand_runs(spec, N_TRAIN) if r.id == low["id"])
    sha, seen = _retrain(store, ck[parent["id"], 36]["sha256"], planned.config, [0, 1, 2], 12, low["data_seed"])
    assert seen == {0, 1, 2}
    assert sha == ck[low["id"], 12]["sha256"]
    assert lsdb.integrity.check(store).ok
    assert runner.plan(spec, store).nothing_to_do


def test_editing_a_finetune_retrains_no_parent(tmp_path):
    store = Store.init(tmp_path / "s")
    runner.run(_spec(), store)
    before = lsdb.open(store.root).sql("SELECT id, run_id, step, sha256 FROM checkpoint ORDER BY id").rows()
    edited = _spec(FINETUNES.replace("lr = 0.02", "lr = 0.01") + "[finetunes.high]\nclasses = [9]\nsteps = 4\nlr = 0.05\n")
    todo = runner.plan(edited, store)
    assert sorted(r.finetune.name for r in todo.runs_to_train) == ["high", "low"]
    summary = runner.run(edited, store)
    assert summary.ok and summary.trained == 2 and summary.checkpoints == 4
    after = lsdb.open(store.root).sql("SELECT id, run_id, step, sha256 FROM checkpoint ORDER BY id").rows()
    assert set(before) < set(after)  # nothing stored was retrained or changed
    assert runner.plan(edited, store).nothing_to_do
