"""task_arithmetic probe: task vectors, their cosines and norms, task arithmetic and TIES-merging
against plain references (float64, a tiny MLP whose "fine-tunes" are seeded perturbations of a
base: the maths does not care how the weights were trained)."""

from __future__ import annotations

import dataclasses
import functools
import math

import pytest
import torch

from lsdb.errors import ProbeError, SpecError
from lsdb.plan import parse_spec
from lsdb.probes import task_arithmetic as ta
from lsdb.probes.base import JobRequest
from tests import tiny_cases as tc

DT = tc.DT
CASE = tc.case("mlp12")  # 4 classes, 60 train / 40 test inputs
TASKS = {"a": (0, 1), "b": (2, 3), "c": ()}  # c: a train_fraction task, measured on the whole test split


def _finetuned(base: dict, seed: int, scale: float = 0.3) -> dict:
    """``base`` plus a seeded perturbation of every floating tensor (a stand-in for a fine-tune)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v
            for k, v in base.items()}


def _runs(names):
    parent = tc.run_ref("p", steps=(0, 10))
    fts = [dataclasses.replace(tc.run_ref(f"ft-{n}", steps=(0, 5), kind="finetune", parent="p",
                                          parent_checkpoint="p-10"),
                               finetune=n, task_classes=TASKS[n], task_fraction=1.0 if TASKS[n] else 0.5)
           for n in names]
    return [parent, *fts]


def _compute(tmp_path, names=("a", "b"), states=None, **params):
    model = CASE.model(0)
    base = tc.clone_state(model)
    if states is None:
        states = [base] + [_finetuned(base, 10 + i) for i in range(len(names))]
    runs = _runs(names)
    ckpts = [tc.checkpoint_ref("base", 10, run_id="p")] + [tc.checkpoint_ref(f"ck-{n}", 5, run_id=f"ft-{n}")
                                                           for n in names]
    ctx = tc.context(model, CASE.data(), tmp_path, states=states, checkpoints=ckpts, runs=runs, role="tasks")
    return ta.compute(ctx, ta.Params(**params)), states


def _rows(out, method, lam, finetune):
    (row,) = [r for r in out["task_arithmetic"] if r["method"] == method and r["lam"] == lam
              and r["finetune"] == finetune]
    return row


def _combine(base, vectors, coeff):
    return {k: v + sum(c * t[k] for c, t in zip(coeff, vectors)) if v.is_floating_point() else v
            for k, v in base.items()}


def _subset(data, classes):
    mask = torch.isin(data.y_test, torch.tensor(classes)) if classes else torch.ones_like(data.y_test, dtype=torch.bool)
    return data.x_test[mask], data.y_test[mask]


# ----------------------------------------------------------------------------------- the maths

def test_norms_and_cosines_match_a_plain_loop(tmp_path):
    out, states = _compute(tmp_path, ("a", "b", "c"), lambdas=(1.0,))
    base = states[0]
    names = [n for n, p in CASE.model(0).named_parameters()]
    taus = [{k: s[k] - base[k] for k in names} for s in states[1:]]
    for row, tau in zip(out["task_vector"], taus):
        assert row["norm"] == pytest.approx(math.sqrt(sum(float((t ** 2).sum()) for t in tau.values())), rel=1e-12)
    pairs = {(r["finetune_a"], r["finetune_b"]): r["cosine"] for r in out["task_vector_cosine"]}
    assert set(pairs) == {("a", "b"), ("a", "c"), ("b", "c")}
    for (i, a), (j, b) in [((0, "a"), (1, "b")), ((0, "a"), (2, "c")), ((1, "b"), (2, "c"))]:
        dot = sum(float((taus[i][k] * taus[j][k]).sum()) for k in names)
        ni = math.sqrt(sum(float((taus[i][k] ** 2).sum()) for k in names))
        nj = math.sqrt(sum(float((taus[j][k] ** 2).sum()) for k in names))
        assert pairs[a, b] == pytest.approx(dot / (ni * nj), abs=1e-12)


def test_a_task_vector_has_cosine_one_with_itself(tmp_path):
    base = tc.clone_state(CASE.model(0))
    ft = _finetuned(base, 3)
    out, _ = _compute(tmp_path, ("a", "b"), states=[base, ft, tc.clone_state(ft)], lambdas=(1.0,))
    (row,) = out["task_vector_cosine"]
    assert row["cosine"] == pytest.approx(1.0, abs=1e-12)
    v = torch.randn(3, 17, dtype=DT, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(torch.diagonal(ta.cosine_matrix(v)), torch.ones(3, dtype=DT), rtol=0, atol=1e-12)


def _ties_reference(vectors: torch.Tensor, keep: float) -> torch.Tensor:
    """Yadav et al.'s three steps, entry by entry in plain Python."""
    n, p = vectors.shape
    m = min(p, max(1, round(keep * p)))
    trimmed = []
    for v in vectors.tolist():
        threshold = sorted((abs(x) for x in v), reverse=True)[m - 1]
        trimmed.append([x if abs(x) >= threshold else 0.0 for x in v])
    out = []
    for q in range(p):
        column = [trimmed[i][q] for i in range(n)]
        total = sum(column)
        sign = (total > 0) - (total < 0)
        agree = [x for x in column if x != 0 and ((x > 0) - (x < 0)) == sign]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out, dtype=DT)


@pytest.mark.parametrize("keep", [0.2, 0.5, 1.0])
def test_ties_merge_matches_the_papers_steps(keep):
    g = torch.Generator().manual_seed(4)
    vectors = torch.randn(3, 40, dtype=DT, generator=g)
    vectors[:, :5] = torch.tensor([1.0, -1.0, 0.5])[:, None]  # ties in magnitude and sign conflicts
    torch.testing.assert_close(ta.ties_merge(vectors, keep), _ties_reference(vectors, keep), rtol=0, atol=1e-15)


def test_trim_keeps_the_largest_entries():
    v = torch.tensor([0.1, -3.0, 2.0, -0.5, 0.0, 1.0], dtype=DT)
    assert ta.trim(v, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0, 0.0, 1.0]
    assert ta.trim(v, 1e-9).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0, 0.0]  # at least one entry
    assert torch.equal(ta.trim(v, 1.0), v)


# ------------------------------------------------------------------------------------- merging

def test_lambda_zero_is_the_base_model(tmp_path):
    out, states = _compute(tmp_path, ("a", "b", "c"), lambdas=(0.0,))
    data, model = CASE.data(), CASE.model(None)
    for name in ("a", "b", "c", None):
        x, y = _subset(data, TASKS[name] if name else ())
        loss, error = tc.loss_and_error(model, x, y, states[0])
        for method in ("sum", "ties"):
            row = _rows(out, method, 0.0, name)
            assert row["loss"] == pytest.approx(loss, abs=1e-12) and row["error"] == pytest.approx(error, abs=1e-12)
            assert row["n"] == len(y) and row["tasks"] == 3
    for row, name in zip(out["task_vector"], ("a", "b", "c")):
        x, y = _subset(data, TASKS[name])
        assert (row["base_task_loss"], row["base_task_error"]) == pytest.approx(tc.loss_and_error(model, x, y, states[0]))
    assert _rows(out, "sum", 0.0, None)["n"] == 40  # the fraction task c: the whole test split


def test_one_task_vector_at_lambda_one_is_the_finetune(tmp_path):
    out, states = _compute(tmp_path, ("a",), lambdas=(0.0, 1.0), ties_keep=1.0)
    data, model = CASE.data(), CASE.model(None)
    (vector,) = out["task_vector"]
    for name in ("a", None):
        x, y = _subset(data, TASKS[name] if name else ())
        loss, error = tc.loss_and_error(model, x, y, states[1])
        exact = _rows(out, "sum", 1.0, name)
        assert exact["loss"] == pytest.approx(loss, abs=1e-12) and exact["error"] == error
        ties = _rows(out, "ties", 1.0, name)  # w_0 + τ: the fine-tune up to rounding
        assert ties["loss"] == pytest.approx(loss, abs=1e-10) and ties["error"] == error
    x, y = _subset(data, TASKS["a"])
    assert (vector["finetune_task_loss"], vector["finetune_task_error"]) == \
        pytest.approx(tc.loss_and_error(model, x, y, states[1]), abs=1e-12)
    assert _rows(out, "sum", 1.0, "a")["normalised_accuracy"] == pytest.approx(1.0)
    assert out["task_vector_cosine"] == []


def test_ties_without_trimming_is_plain_addition_for_one_task(tmp_path):
    lambdas = (-0.5, 0.0, 0.3, 1.0, 1.7)
    out, _ = _compute(tmp_path, ("b",), lambdas=lambdas, ties_keep=1.0)
    for lam in lambdas:
        for name in ("b", None):
            s, t = _rows(out, "sum", lam, name), _rows(out, "ties", lam, name)
            assert t["loss"] == pytest.approx(s["loss"], abs=1e-10) and t["error"] == s["error"]


def test_merged_points_match_a_plain_loop(tmp_path):
    lambdas = (0.4, 0.8)
    out, states = _compute(tmp_path, ("a", "b"), lambdas=lambdas, ties_keep=0.3)
    base = states[0]
    names = [n for n, _ in CASE.model(0).named_parameters()]
    taus = [{k: s[k] - base[k] for k in names} for s in states[1:]]
    flat = torch.stack([torch.cat([t[k].reshape(-1) for k in names]) for t in taus])
    merged = _ties_reference(flat, 0.3)
    ties_tau, start = {}, 0
    for k in names:
        ties_tau[k] = merged[start:start + base[k].numel()].reshape(base[k].shape)
        start += base[k].numel()
    data, model = CASE.data(), CASE.model(None)
    ratios = 0
    for lam in lambdas:
        points = {"sum": _combine(base, taus, [lam, lam]), "ties": _combine(base, [ties_tau], [lam])}
        for method, state in points.items():
            for name in ("a", "b", None):
                x, y = _subset(data, TASKS[name] if name else ())
                loss, error = tc.loss_and_error(model, x, y, state)
                row = _rows(out, method, lam, name)
                assert row["loss"] == pytest.approx(loss, abs=1e-10) and row["error"] == pytest.approx(error)
                own = next((v["finetune_task_error"] for v in out["task_vector"] if v["finetune"] == name), 1.0)
                if own < 1:  # the fine-tune gets some of its task right
                    assert row["normalised_accuracy"] == pytest.approx((1 - error) / (1 - own))
                    ratios += 1
                else:  # the whole split, or a fine-tune with no accuracy to compare with
                    assert row["normalised_accuracy"] is None
                assert row["ties_keep"] == (0.3 if method == "ties" else None)
    assert ratios


def test_batchnorm_is_refused(tmp_path):
    bn = tc.case("bn12")
    model = bn.model(0)
    s = tc.clone_state(model)
    ctx = tc.context(model, bn.data(), tmp_path, states=[s, _finetuned(s, 1)], runs=_runs(("a",)))
    with pytest.raises(ProbeError, match="BatchNorm"):
        ta.compute(ctx, ta.Params())
    assert ta.BATCHNORM == "refused"


# ---------------------------------------------------------------------------- plan and params

def test_plan_groups_finished_finetunes_by_base():
    run = functools.partial(tc.run_ref, steps=(0, 5), kind="finetune")
    study = tc.FakeStudy([
        tc.run_ref("p", steps=(0, 10, 20)), tc.run_ref("q", steps=(0, 20), seed=1),
        dataclasses.replace(run("f2", parent="p", parent_checkpoint="p-20"), finetune="zeta"),
        dataclasses.replace(run("f1", parent="p", parent_checkpoint="p-20"), finetune="alpha"),
        dataclasses.replace(run("f3", parent="p", parent_checkpoint="p-10"), finetune="alpha"),
        dataclasses.replace(run("f4", parent="p", parent_checkpoint="p-10", status="diverged"), finetune="beta"),
        dataclasses.replace(run("f5", parent="q", parent_checkpoint="q-20", status="running"), finetune="alpha"),
        tc.run_ref("c", steps=(20,), kind="child", parent="q", parent_checkpoint="q-20"),
    ])
    jobs = ta.plan(study, ta.Params())
    assert sorted(jobs, key=lambda j: j.anchor_checkpoint_id) == [
        JobRequest(("p-10", "f3-5"), "p-10", "tasks"),
        JobRequest(("p-20", "f1-5", "f2-5"), "p-20", "tasks"),
    ]


@pytest.mark.parametrize("body, fragment", [
    ("lambdas = []", "lambdas"), ("lambdas = [0.5, 0.5]", "distinct"), ("lambdas = [1e9]", "lambdas"),
    ("ties_keep = 0.0", "ties_keep"), ("ties_keep = 1.5", "(0, 1]"), ("batch_size = 0", "batch_size"),
])
def test_params_are_checked_when_the_spec_loads(body, fragment):
    with pytest.raises(SpecError, match="probes.task_arithmetic") as e:
        parse_spec(f"[probes.task_arithmetic]\n{body}\n")
    assert fragment in str(e.value)
