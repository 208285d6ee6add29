"""Checkpoints from a user's own training loop, then lsdb spawns children and probes them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lsdb
from lsdb import runner
from lsdb.errors import LsdbError
from lsdb.ingest.recorder import Recorder
from lsdb.plan import load_spec


def own_loop(rec: Recorder):
    model = rec.model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(123)  # the user's own data order
    x, y = rec.data.x_train, rec.data.y_train
    for step in range(rec.total_steps + 1):
        if step in rec.save_steps:
            rec.checkpoint(model, step, opt)
        if step < rec.total_steps:
            idx = torch.randint(0, x.shape[0], (128,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()


def test_recorded_run_is_spawned_from_and_probed(tiny_spec_path, tmp_path):
    spec = load_spec(tiny_spec_path)
    store_dir = tmp_path / "s"
    with Recorder(store_dir, spec, seed=0) as rec:
        own_loop(rec)
        run_id, n_saved = rec.run_id, len(rec.save_steps)
    db = lsdb.open(store_dir)
    assert db.sql("SELECT status FROM run WHERE id = ?", [run_id])["status"][0] == "finished"
    assert db.sql("SELECT count(*) AS n FROM checkpoint WHERE run_id = ?", [run_id])["n"][0] == n_saved

    from lsdb.store import Store

    summary = runner.run(spec, Store.open(store_dir))
    assert summary.jobs_failed == 0
    # lsdb trained the other seed's parent and all four children, two of them from recorded checkpoints
    assert summary.trained == 5
    kids = db.sql("SELECT status FROM run WHERE parent_run_id = ?", [run_id])["status"].to_list()
    assert kids == ["finished", "finished"]
    probed = db.sql("SELECT count(*) AS n FROM eval e JOIN checkpoint c ON c.id = e.checkpoint_id "
                    "WHERE c.run_id = ?", [run_id])["n"][0]
    assert probed == n_saved
    assert runner.plan(spec, Store.open(store_dir)).nothing_to_do


def test_recorder_refuses_what_it_cannot_store(tiny_spec_path, tmp_path):
    spec = load_spec(tiny_spec_path)
    with pytest.raises(LsdbError, match="no parent run for seed 7"):
        Recorder(tmp_path / "s", spec, seed=7)
    rec = Recorder(tmp_path / "s", spec, seed=0)
    with pytest.raises(LsdbError, match="with Recorder"):
        rec.checkpoint(rec.model(), 0)
    with rec:
        with pytest.raises(LsdbError, match=r"your model does not fit the spec's model: it has no net.0.weight .*build it with rec.model\(\)"):
            rec.checkpoint(torch.nn.Linear(64, 10), 0)
        with pytest.raises(LsdbError, match="outside the run"):
            rec.checkpoint(rec.model(), 10_000)


def test_checkpoint_leaves_the_loops_random_state_alone(tiny_spec_path, tmp_path):
    """Checking the model against the spec's architecture must not reseed torch's generator (a
    loop drawing batches from it would repeat them after every checkpoint)."""
    spec = load_spec(tiny_spec_path)
    with Recorder(tmp_path / "s", spec, seed=0) as rec:
        model = rec.model()
        torch.manual_seed(123)
        torch.rand(3)
        expected = torch.rand(3)
        torch.manual_seed(123)
        torch.rand(3)
        rec.checkpoint(model, 0)
        assert torch.equal(torch.rand(3), expected)
