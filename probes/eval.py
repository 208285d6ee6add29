"""``eval``: cross-entropy loss and error rate of a checkpoint on the train and test splits.

loss = mean over examples of −log softmax(f(x; w))_y (float64 accumulation);
error = fraction of examples whose arg-max logit differs from the label.
``max_train`` / ``max_test`` (0 = all) evaluate on the first examples of each split.

BatchNorm (``BATCHNORM`` = "running", the ``batchnorm`` column of ``probe_job``): the network in
eval mode, BatchNorm normalising with the checkpoint's running statistics, as it would be deployed
(and as the trainer's own test error measures it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.func import functional_call

from lsdb.probes.base import each_checkpoint
from lsdb.spec import MAX_BATCH, MAX_EXAMPLES, between, positive

VERSION = 1
TABLES = ("eval",)
BATCHNORM = "running"


@dataclass(frozen=True)
class Params:
    max_train: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = all)"))
    max_test: int = field(default=0, metadata=between(0, MAX_EXAMPLES, " (0 = all)"))
    batch_size: int = field(default=2048, metadata=positive(MAX_BATCH))


def plan(study, params: Params):
    return each_checkpoint(study)


@torch.no_grad()
def loss_and_error(model, state, x, y, batch_size: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and error of ``model`` holding ``state``, in eval mode."""
    total, wrong = 0.0, 0
    was_training = model.training
    model.eval()  # train mode would normalise by batch statistics and overwrite the state's own
    try:
        for i in range(0, x.shape[0], batch_size):
            logits = functional_call(model, state, (x[i : i + batch_size],))
            total += F.cross_entropy(logits.double(), y[i : i + batch_size], reduction="sum").item()
            wrong += (logits.argmax(1) != y[i : i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return total / x.shape[0], wrong / x.shape[0]


def compute(ctx, params: Params) -> dict[str, list[dict]]:
    d = ctx.data
    xtr, ytr = _head(d.x_train, params.max_train), _head(d.y_train, params.max_train)
    xte, yte = _head(d.x_test, params.max_test), _head(d.y_test, params.max_test)
    train_loss, train_error = loss_and_error(ctx.model, ctx.states[0], xtr, ytr, params.batch_size)
    test_loss, test_error = loss_and_error(ctx.model, ctx.states[0], xte, yte, params.batch_size)
    return {"eval": [dict(n_train=len(ytr), n_test=len(yte), train_loss=train_loss, train_error=train_error,
                          test_loss=test_loss, test_error=test_error)]}


def _head(t, n):
    return t[:n] if n else t
