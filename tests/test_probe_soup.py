"""soup probe: averages, greedy soups and ensembles against plain references (float64, tiny nets),
the groups it plans, and a soup of identical models changing nothing."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lsdb.errors import ProbeError, SpecError
from lsdb.probes import merge, soup
from tests import tiny_cases as tc

CNN = tc.case("cnn12_w6")
BN = tc.case("bn12")


def _compute(case, states, tmp_path, role="spawn_children", **params):
    ctx = tc.context(case.model(None), case.data(), tmp_path, states=states, role=role)
    out = soup.compute(ctx, soup.Params(**params))
    return out["soup"][0], out["soup_member"]


def _report(case, params: soup.Params):
    data = case.data()
    sel, rep = soup.split_test(data.x_test.shape[0], params.select_fraction, params.seed, "cpu")
    return data, sel, rep


def _mean_state(states):
    return {k: sum(s[k] for s in states) / len(states) if states[0][k].is_floating_point() else states[0][k]
            for k in states[0]}


def test_soup_of_identical_models_changes_nothing(tmp_path):
    (state,) = CNN.states(3)
    row, members = _compute(CNN, [state, tc.clone_state(state), tc.clone_state(state)], tmp_path)
    for q in ("loss", "error"):
        for name in ("uniform", "greedy", "ensemble", "best_member"):
            assert row[f"{name}_test_{q}"] == pytest.approx(row[f"members_mean_test_{q}"], abs=1e-12)
    assert row["mean_distance_to_average"] == pytest.approx(0.0, abs=1e-12)
    assert row["greedy_size"] == 3 and all(m["in_greedy_soup"] for m in members)


def test_numbers_match_a_plain_reference(tmp_path):
    states = CNN.states(1, 2, 3)
    params = soup.Params()
    row, members = _compute(CNN, states, tmp_path)
    data, sel, rep = _report(CNN, params)
    x, y = data.x_test[rep], data.y_test[rep]
    model = CNN.model(None)
    refs = [tc.loss_and_error(model, x, y, s) for s in states]
    for m, (loss, err) in zip(members, refs):
        assert m["test_loss"] == pytest.approx(loss, rel=1e-10) and m["test_error"] == pytest.approx(err)
    assert row["members_mean_test_loss"] == pytest.approx(sum(r[0] for r in refs) / 3, rel=1e-10)
    loss, err = tc.loss_and_error(model, x, y, _mean_state(states))
    assert row["uniform_test_loss"] == pytest.approx(loss, rel=1e-10) and row["uniform_test_error"] == pytest.approx(err)
    # the ensemble averages logits
    logits = []
    for s in states:
        m = copy.deepcopy(model)
        m.load_state_dict(s)
        with torch.no_grad():
            logits.append(m(x))
    mean = sum(logits) / 3
    assert row["ensemble_test_loss"] == pytest.approx(float(F.cross_entropy(mean, y)), rel=1e-10)
    assert row["ensemble_test_error"] == pytest.approx(float((mean.argmax(1) != y).double().mean()))
    # the best member is chosen on the selection half, reported on the other
    sel_err = [tc.loss_and_error(model, data.x_test[sel], data.y_test[sel], s) for s in states]
    best = min(range(3), key=lambda i: (sel_err[i][1], sel_err[i][0]))
    assert row["best_member_test_loss"] == pytest.approx(refs[best][0], rel=1e-10)
    assert row["n_select"] + row["n_report"] == data.x_test.shape[0] and row["n_report"] == len(rep)
    # the greedy soup is the average of the members it kept
    kept = [states[m["member"]] for m in members if m["in_greedy_soup"]]
    assert len(kept) == row["greedy_size"] >= 1
    assert row["greedy_test_loss"] == pytest.approx(tc.loss_and_error(model, x, y, _mean_state(kept))[0], rel=1e-10)
    assert row["matched_uniform_test_loss"] is None  # only cross_init groups are aligned


def test_greedy_soup_rejects_a_member_that_hurts(tmp_path):
    (good,) = CNN.states(4)
    bad = {k: v * 40.0 if v.is_floating_point() else v for k, v in good.items()}  # a wrecked copy
    row, members = _compute(CNN, [good, tc.clone_state(good), bad], tmp_path)
    assert [m["in_greedy_soup"] for m in members] == [True, True, False]
    assert row["greedy_test_loss"] == pytest.approx(row["best_member_test_loss"], rel=1e-10)


def test_cross_init_soup_is_aligned_when_weight_matching_applies(tmp_path):
    (state,) = CNN.states(5)
    chain = merge.layer_chain(CNN.make())
    g = torch.Generator().manual_seed(3)
    perms = [torch.randperm(state[layer.weight].shape[0], generator=g) for layer in chain[:-1]]
    shuffled = merge.permute_state(chain, state, perms)
    row, _ = _compute(CNN, [state, shuffled], tmp_path, role="cross_init")
    # naive averaging of a permuted copy is a different network; aligned it is the member itself
    assert row["matched_uniform_test_loss"] == pytest.approx(row["members_mean_test_loss"], rel=1e-9)
    assert row["uniform_test_loss"] != pytest.approx(row["members_mean_test_loss"], rel=1e-3)


def test_batchnorm_soup_recomputes_statistics(tmp_path):
    states = BN.states(1, 2)
    params = soup.Params(train_subset=30)
    row, _ = _compute(BN, states, tmp_path, train_subset=30)
    data, _, rep = _report(BN, params)
    tr = tc.train_subset(data.x_train.shape[0], 30, params.seed)
    model = BN.model(None)
    losses, _ = tc.interpolation_curve(model, states[0], states[1], [0.5], data.x_test[rep], data.y_test[rep],
                                       bn_stats_from=data.x_train[tr])
    assert row["uniform_test_loss"] == pytest.approx(float(losses[0]), rel=1e-9)


def test_bad_input(tmp_path):
    (state,) = CNN.states(1)
    with pytest.raises(ProbeError, match="at least two"):
        _compute(CNN, [state], tmp_path)
    nan = {k: v * float("nan") if v.is_floating_point() else v for k, v in state.items()}
    from lsdb.errors import ProbeSkipped
    with pytest.raises(ProbeSkipped, match="non-finite"):
        _compute(CNN, [state, nan], tmp_path)


# ------------------------------------------------------------------------------------- plan

def _study():
    runs = []
    for seed in (0, 1):
        pid = f"p{seed}"
        runs.append(tc.run_ref(pid, (0, 10, 20, 40), seed=seed, epochs=4.0))
        for t, step in ((0.0, 0), (1.0, 10), (2.0, 20)):
            for i in range(2):
                runs.append(tc.run_ref(f"{pid}-c{step}-{i}", (step, 40), kind="child", seed=seed, parent=pid,
                                       parent_checkpoint=f"{pid}-{step}", spawn_epoch=t, child_index=i))
    runs.append(tc.run_ref("p9", (0, 40), seed=9, variant="wide"))  # alone in its variant: no group
    return tc.FakeStudy(runs)


def test_plan_groups():
    jobs = soup.plan(_study(), soup.Params(late_from=0.5))
    by_role: dict[str, list] = {}
    for j in jobs:
        by_role.setdefault(j.role, []).append(j)
    assert len(by_role["spawn_children"]) == 6  # 2 parents × 3 spawn times
    assert all(len(j.checkpoint_ids) == 2 for j in by_role["spawn_children"])
    # late children (spawned at ≥ 2 of 4 epochs) of p0 come from one spawn only: no group
    assert "late_children" not in by_role
    (late,) = [j for j in soup.plan(_study(), soup.Params(late_from=0.25)) if j.role == "late_children" and "p0" in j.anchor_checkpoint_id]
    assert late.checkpoint_ids == ("p0-c10-0-40", "p0-c10-1-40", "p0-c20-0-40", "p0-c20-1-40")
    assert late.anchor_checkpoint_id == "p0-10"
    (cross,) = by_role["cross_init"]
    assert cross.checkpoint_ids == ("p0-40", "p1-40") and cross.anchor_checkpoint_id == "p0-40"


def test_named_sets():
    (job,) = soup.plan(_study(), soup.Params(spawn_children=False, cross_init=False,
                                             sets=("p0@final p1@final p0-c0-0@final",)))
    assert job.role == "set" and job.checkpoint_ids == ("p0-40", "p1-40", "p0-c0-0-40")
    with pytest.raises(SpecError, match="probes.soup.sets: no run 'nope'"):
        soup.plan(_study(), soup.Params(sets=("nope@final p0@final",)))
