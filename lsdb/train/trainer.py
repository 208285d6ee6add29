"""Deterministic SGD training with checkpoints, resumption and parent–child spawning.

A ``TrainTask`` is plain data, so it runs the same in-process or in a pool worker. The trainer
never opens the database: each checkpoint becomes a safetensors file plus a small spool shard
that the coordinating process ingests. Data order is a pure function of (data_seed, epoch), so a
run resumed from any checkpoint continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from lsdb.ids import utcnow
from lsdb.spec import RunConfig
from lsdb.train.checkpoints import (load_optimizer, load_weights, optimizer_sha256, save_optimizer, save_weights,
                                    tensors_sha256)
from lsdb.train.data import load_data, task_indices
from lsdb.train.models import build_model, check_fits

EVAL_BATCH = 2048


@dataclass(frozen=True)
class TrainTask:
    store_root: str
    run_id: str
    config: RunConfig
    seed: int
    data_seed: int
    steps_per_epoch: int
    total_steps: int
    save_steps: tuple[int, ...]  # steps to save on the way (ascending)
    lr_factor: float = 1.0
    # where to start from: fresh init at step 0, or a stored checkpoint (its step, weights sha, and
    # the id and hash of the checkpoint whose optimiser state to load)
    start_step: int = 0
    start_weights: str | None = None
    start_optimizer: str | None = None
    start_optimizer_sha: str | None = None
    checkpoint_ids: dict[int, str] = field(default_factory=dict)  # step -> checkpoint id
    # where to stop: the end of training (then the run's status is emitted), or the last step a
    # finished run lacks (filling in checkpoints added to the schedule, or replacing damaged files)
    stop_step: int | None = None
    # steps whose rows are stored already (file lost or damaged): step -> (weights sha, optimiser sha)
    expected: dict[int, tuple[str, str]] = field(default_factory=dict)
    # the start weights are another run's (a fine-tune's base): save them as this run's checkpoint
    # at start_step when it is to be saved, instead of taking them for this run's stored one
    save_start: bool = False
    # a fine-tune's task: batches come from these training examples only
    # (lsdb.train.data.task_indices; () and 1.0 = the whole training split)
    task_classes: tuple[int, ...] = ()
    task_fraction: float = 1.0
    task_seed: int = 0

    @property
    def end(self) -> int:
        return self.total_steps if self.stop_step is None else self.stop_step


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    return math.ceil(n_train / batch_size)


def lr_at(step: int, cfg: RunConfig, spe: int, factor: float = 1.0) -> float:
    drops = sum(1 for t in cfg.optim.lr_drops if step >= round(t * spe))
    return cfg.optim.lr * factor * cfg.optim.lr_drop_factor**drops


def batch_indices(step: int, n: int, batch_size: int, spe: int, data_seed: int) -> torch.Tensor:
    """Indices of the minibatch taken at ``step``: a fresh permutation per epoch from (seed, epoch)."""
    epoch, pos = divmod(step, spe)
    return _epoch_permutation(n, data_seed, epoch)[pos * batch_size : (pos + 1) * batch_size]


@functools.lru_cache(maxsize=8)
def _epoch_permutation(n: int, data_seed: int, epoch: int) -> torch.Tensor:
    """The epoch's order, drawn once instead of at every step (2 % of a step on the default CNN).
    Read-only: callers index with slices of it."""
    g = torch.Generator().manual_seed(data_seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g)


@torch.no_grad()
def evaluate(model, x, y) -> tuple[float, float]:
    """Mean cross-entropy and error rate over (x, y), in batches."""
    total_loss, wrong = 0.0, 0
    for i in range(0, x.shape[0], EVAL_BATCH):
        logits = model(x[i : i + EVAL_BATCH])
        total_loss += F.cross_entropy(logits.double(), y[i : i + EVAL_BATCH], reduction="sum").item()
        wrong += (logits.argmax(1) != y[i : i + EVAL_BATCH]).sum().item()
    return total_loss / x.shape[0], wrong / x.shape[0]


def make_optimizer(model, cfg: RunConfig, lr: float):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.optim.momentum,
                           weight_decay=cfg.optim.weight_decay)


def optimizer_tensors(opt, model) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[name] = buf
    return out


def load_optimizer_tensors(opt, model, tensors: dict[str, torch.Tensor]) -> None:
    for name, p in model.named_parameters():
        if name in tensors:
            opt.state[p]["momentum_buffer"] = tensors[name].clone().to(p.dtype)


def save_checkpoint(ckdir, cid: str, run_id: str, step: int, spe: int, total_steps: int, lr: float,
                    model, opt, data) -> dict:
    """Evaluate ``model`` on both splits, write its weights (named by their hash) and the optimiser
    state beside them, and return the checkpoint row."""
    from pathlib import Path

    was_training = model.training
    model.eval()  # BatchNorm: running statistics, and evaluation must not update them
    try:
        train_loss, train_error = evaluate(model, data.x_train, data.y_train)
        test_loss, test_error = evaluate(model, data.x_test, data.y_test)
    finally:
        model.train(was_training)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    sha = save_weights(Path(ckdir), state)
    moments = optimizer_tensors(opt, model) if opt is not None else {}
    optimizer_sha = save_optimizer(Path(ckdir), cid, moments)
    return dict(id=cid, run_id=run_id, step=step, epoch=step / spe, frac=step / total_steps, sha256=sha,
                has_optimizer=bool(moments), optimizer_sha256=optimizer_sha, lr=lr, train_loss=train_loss,
                train_error=train_error, test_loss=test_loss, test_error=test_error, created_at=utcnow())


def _adversary(model, cfg: RunConfig):
    from lsdb.train.adversarial import perturb

    def attack(xb, yb):
        return perturb(model, xb, yb, cfg.train.adversarial, cfg.train.adv_epsilon, cfg.train.adv_steps)

    return attack


def run_training(task: TrainTask, emit) -> dict:
    """Train ``task`` from its start to its end; call ``emit(kind, payload)`` for every checkpoint,
    and at the end of training once with the run's status. Returns the status payload, with
    ``problems``: checkpoints whose retrained weights differ from the stored hash (not saved)."""
    threads = torch.get_num_threads()
    # Small models: a second thread gains little when idle and is 4x slower beside another busy
    # process (benchmarks/training.py); parallelism comes from running runs in separate workers.
    torch.set_num_threads(1)
    try:
        return _train(task, emit)
    finally:
        torch.set_num_threads(threads)


def _train(task: TrainTask, emit) -> dict:
    from pathlib import Path

    cfg = task.config
    root = Path(task.store_root)
    ckdir = root / "checkpoints"
    data = load_data(cfg.data)
    model = build_model(cfg.model, data.input_shape, data.num_classes, seed=task.seed)
    spe = task.steps_per_epoch
    opt = make_optimizer(model, cfg, lr_at(task.start_step, cfg, spe, task.lr_factor))
    if task.start_weights:
        start = load_weights(ckdir, task.start_weights)
        check_fits(model, start, f"checkpoint file {task.start_weights[:16]}")
        model.load_state_dict(start)
        if task.start_optimizer:
            load_optimizer_tensors(opt, model, load_optimizer(ckdir, task.start_optimizer, task.start_optimizer_sha))

    adversarial = _adversary(model, cfg) if cfg.train.adversarial != "none" else None

    n = data.x_train.shape[0]
    pool = None  # a fine-tune's task: step k's batch is pool[batch_indices(k, len(pool), …)]
    if task.task_classes or task.task_fraction < 1:
        pool = task_indices(data.y_train, task.task_classes, task.task_fraction, task.task_seed)
        n = pool.numel()
    chance = 1.0 - 1.0 / data.num_classes
    # trained on some classes only, a network's error on the whole training split sits near
    # 1 − |classes|/C by design, so a collapse to chance is not detected there (non-finite losses are)
    detect_chance = not task.task_classes
    save = [s for s in task.save_steps if s >= task.start_step]

    problems: list[str] = []

    def checkpoint(step):
        if step in task.expected:  # replacing a lost file: training must reproduce it bit for bit
            want, want_opt = task.expected[step]
            got = tensors_sha256(model.state_dict())
            got_opt = optimizer_sha256(optimizer_tensors(opt, model))
            if (got, got_opt) != (want, want_opt):
                problems.append(f"checkpoint {task.checkpoint_ids[step]} (run {task.run_id} step {step}): "
                                f"retraining gave weights {got[:12]}…/optimiser {got_opt[:12]}… but the store "
                                f"recorded {want[:12]}…/{want_opt[:12]}… (training is not reproducible here)")
                return 0.0, 0.0
        row = save_checkpoint(ckdir, task.checkpoint_ids[step], task.run_id, step, spe, task.total_steps,
                              lr_at(step, cfg, spe, task.lr_factor), model, opt, data)
        emit("checkpoint", row)
        return row["train_loss"], row["train_error"]

    status = {"run_id": task.run_id, "status": "finished", "diverged_step": None, "diverged_reason": None}
    step = task.start_step
    pending = set(save)
    if step in pending and (not task.start_weights or task.save_start):
        checkpoint(step)
        pending.discard(step)
    elif step in pending:
        pending.discard(step)  # resuming from this very checkpoint: it is stored already
    model.train()
    while step < task.end:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg, spe, task.lr_factor)
        idx = batch_indices(step, n, cfg.optim.batch_size, spe, task.data_seed)
        if pool is not None:
            idx = pool[idx]
        xb, yb = data.x_train[idx], data.y_train[idx]
        loss = F.cross_entropy(model(xb), yb)
        if adversarial is not None and cfg.train.adv_mix > 0:
            x_adv = adversarial(xb, yb)
            loss = (1 - cfg.train.adv_mix) * loss + cfg.train.adv_mix * F.cross_entropy(model(x_adv), yb)
        if not torch.isfinite(loss):
            status.update(status="diverged", diverged_step=step, diverged_reason=f"non-finite training loss ({loss.item()})")
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        if step in pending:
            pending.discard(step)
            train_loss, train_error = checkpoint(step)
            if not math.isfinite(train_loss):
                status.update(status="diverged", diverged_step=step, diverged_reason="non-finite loss at checkpoint")
                break
            if detect_chance and step / spe >= cfg.train.chance_after_epochs and train_error >= chance - 0.02:
                status.update(status="diverged", diverged_step=step,
                              diverged_reason=f"collapsed to chance accuracy (train error {train_error:.3f})")
                break
    if task.stop_step is None:  # filling in a finished run leaves its status alone
        emit("run_status", status)
    return {**status, "problems": problems}
