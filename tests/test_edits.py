"""Editing a spec does only what is new: "declare it, and lsdb does only what is missing".

Adding spawn times trains only the new children (from the parent's checkpoint, filled in if the
parent never saved that step); adding checkpoint epochs trains only up to the missing steps, from
the nearest stored checkpoint. The result equals a store that ran the edited spec from scratch.
"""

from __future__ import annotations

import lsdb
from lsdb import runner
from lsdb.plan import parse_spec
from lsdb.store import Store
from tests.conftest import TINY_SPEC

ONE_SEED = TINY_SPEC.replace("seeds = [0, 1]", "seeds = [0]")
EDITED = (ONE_SEED.replace("times = [1.0]", "times = [1.0, 1.5]")
          .replace("every_epochs = 1", "every_epochs = 1\nepochs = [0.75, 2.5]"))


def rows(store, q):
    return lsdb.open(store.root).sql(q).rows()


CHECKPOINTS = "SELECT id, run_id, step, sha256, optimizer_sha256, train_loss, test_error FROM checkpoint ORDER BY id"


def test_adding_spawn_times_and_checkpoints_trains_only_what_is_new(tmp_path):
    store = Store.init(tmp_path / "s")
    runner.run(parse_spec(ONE_SEED), store)
    runs_before = dict(rows(store, "SELECT id, status FROM run"))
    ckpts_before = rows(store, CHECKPOINTS)
    edited = parse_spec(EDITED)
    p = runner.plan(edited, store)
    new_children = [r for r in p.runs_to_train if r.id not in runs_before]
    assert len(new_children) == 2 and all(r.kind == "child" for r in new_children)
    summary = runner.run(edited, store)
    assert summary.ok
    # every run stored before kept its id and rows; the old checkpoints are untouched
    assert set(runs_before) < {r[0] for r in rows(store, "SELECT id FROM run")}
    assert set(ckpts_before) <= set(rows(store, CHECKPOINTS))
    # the parent was resumed to fill in its missing steps, not retrained from step 0
    added = len(rows(store, CHECKPOINTS)) - len(ckpts_before)
    assert summary.checkpoints == added
    # and the whole store is what the edited spec gives from scratch
    fresh = Store.init(tmp_path / "fresh")
    runner.run(edited, fresh)
    assert rows(store, CHECKPOINTS) == rows(fresh, CHECKPOINTS)
    assert rows(store, "SELECT job_id, train_loss, test_error FROM eval ORDER BY job_id") == \
        rows(fresh, "SELECT job_id, train_loss, test_error FROM eval ORDER BY job_id")
    assert runner.plan(edited, store).nothing_to_do
