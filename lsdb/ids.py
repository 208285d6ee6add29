"""Identity helpers at the bottom of the import layers: canonical JSON hashes, content ids of
runs, checkpoints, probe params and jobs, and the one clock every row uses.

Identity is content: the same configuration always gets the same id, and a default written out
explicitly is the same configuration as a default left out (``non_default``). Literal ids are
pinned in ``tests/test_ids.py`` so that they never drift silently.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timezone
from typing import Any


def utcnow() -> datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP has no zone)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


def non_default(obj) -> dict[str, Any]:
    """A dataclass as plain data with every field at its default left out (recursively)."""
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = non_default(value)
            if value:
                out[f.name] = value
        elif value != f.default:
            out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def sha256_json(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys, no spaces, tuples as lists)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode()).hexdigest()


def _json_default(o):
    if isinstance(o, tuple):
        return list(o)
    if dataclasses.is_dataclass(o):
        return non_default(o)
    raise TypeError(f"not serialisable: {o!r}")


def parent_run_id(variant: str, seed: int, training: dict[str, Any]) -> str:
    """A parent run: its variant, seed and everything that shapes its trajectory (data, model,
    optimiser, training options, each with defaults left out). The checkpoint schedule and spawn
    times are not part of it: saving more often never changes the weights."""
    return sha256_json({"variant": variant, "seed": seed, **training})[:16]


def child_run_id(parent_id: str, spawn_step: int, kind: str, child: int, lr_factor: float) -> str:
    return sha256_json({"parent": parent_id, "spawn_step": spawn_step, "kind": kind, "child": child,
                        "lr_factor": lr_factor})[:16]


def finetune_run_id(parent_id: str, base_step: int, name: str, task: dict[str, Any], optim: dict[str, Any]) -> str:
    """A fine-tune: its parent, the step of the base checkpoint it starts from, and everything that
    shapes its weights from there: the task (classes, fraction and its seed) and the optimiser
    (steps, lr, momentum, batch size, each as used, the parent's filled in). Its name too, as a
    variant's name is part of its parents' ids: the run row records the name."""
    return sha256_json({"parent": parent_id, "base_step": base_step, "kind": "finetune", "name": name,
                        "task": task, "optim": optim})[:16]


def child_data_seed(child_id: str) -> int:
    """A child's data order seed: a function of its id, so siblings differ only in SGD noise."""
    return int(hashlib.sha256(child_id.encode()).hexdigest()[:7], 16)


def checkpoint_id(run_id: str, step: int) -> str:
    return hashlib.sha256(f"{run_id}:{step}".encode()).hexdigest()[:16]


def params_hash(params) -> str:
    """Identity of a probe's params dataclass: sha256 of canonical JSON with defaults left out."""
    return sha256_json(non_default(params))[:16]


def job_id(probe: str, version: int, phash: str, checkpoint_ids: tuple[str, ...], role: str) -> str:
    key = json.dumps([probe, version, phash, list(checkpoint_ids), role])
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def job_checkpoint_ids(first: str, other: str | None, more_json: str | None) -> tuple[str, ...]:
    """A ``probe_job`` row's checkpoints in order (the ones its id hashes): ``checkpoint_id``,
    ``other_checkpoint_id`` and the JSON list ``more_checkpoint_ids``. ValueError when the list is
    malformed or stands without a second checkpoint (rows arrive in untrusted shards)."""
    if more_json is None:
        return (first, other) if other else (first,)
    try:
        more = json.loads(more_json)
    except (TypeError, ValueError):
        raise ValueError("more_checkpoint_ids is not JSON") from None
    if not other or not isinstance(more, list) or not more or not all(isinstance(c, str) and c for c in more):
        raise ValueError("more_checkpoint_ids must be a non-empty JSON list of checkpoint ids after a second one")
    return (first, other, *more)
