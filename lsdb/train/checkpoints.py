"""Checkpoint files: safetensors named by the sha256 of their tensors (never pickle).

The hash covers every tensor's name, dtype, shape and bytes in name order, so the same weights
always get the same name and any change on disk is caught on load. The optimiser state saved
beside a checkpoint (``<checkpoint id>.optim.safetensors``) is hashed the same way; its hash is
in the checkpoint row and checked before a run resumes or spawns from it.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lsdb.atomic import temp_path
from lsdb.errors import CheckpointCorrupt


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        # reshape: a 0-dim tensor (BatchNorm's num_batches_tracked) cannot be viewed as bytes
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    except Exception as e:  # safetensors reports a failed write (a full disk) as its own error type
        code = re.search(r"os error (\d+)", str(e))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(tmp)) from None
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_weights(directory: Path, state: dict[str, torch.Tensor]) -> str:
    """Write ``state`` as ``<sha256>.safetensors`` unless an intact file of that name exists (a
    damaged one is replaced)."""
    sha = tensors_sha256(state)
    path = Path(directory) / f"{sha}.safetensors"
    try:
        _load_verified(path, sha, "checkpoint file")
    except CheckpointCorrupt:  # missing or damaged
        atomic_save(state, path)
    return sha


def optimizer_path(directory: Path, checkpoint_id: str) -> Path:
    return Path(directory) / f"{checkpoint_id}.optim.safetensors"


def _as_stored(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors files hold at least one tensor: no momentum yet (step 0) is stored as a placeholder
    return tensors or {"_empty": torch.zeros(0)}


def optimizer_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """The hash ``save_optimizer`` records for these optimiser tensors."""
    return tensors_sha256(_as_stored(tensors))


def save_optimizer(directory: Path, checkpoint_id: str, tensors: dict[str, torch.Tensor]) -> str:
    """Write the optimiser state of a checkpoint; returns its hash (stored in the checkpoint row)."""
    atomic_save(_as_stored(tensors), optimizer_path(directory, checkpoint_id))
    return optimizer_sha256(tensors)


def load_optimizer(directory: Path, checkpoint_id: str, sha: str) -> dict[str, torch.Tensor]:
    """The optimiser state saved with checkpoint ``checkpoint_id``, verified against ``sha``."""
    path = optimizer_path(directory, checkpoint_id)
    return _load_verified(path, sha, "optimizer state")


def load_weights(directory: Path, sha: str) -> dict[str, torch.Tensor]:
    """The weights named ``sha``, verified against their hash (``CheckpointCorrupt`` otherwise)."""
    return _load_verified(Path(directory) / f"{sha}.safetensors", sha, "checkpoint file")


def _load_verified(path: Path, sha: str, what: str) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointCorrupt(f"{what} {path} is missing; `lsdb run` retrains it")
    try:
        state = load_file(str(path))
    except Exception as e:  # truncated or garbled
        raise CheckpointCorrupt(f"{what} {path} is unreadable ({str(e).splitlines()[0]}); "
                                f"`lsdb run` retrains it") from None
    if tensors_sha256(state) != sha:
        raise CheckpointCorrupt(f"{what} {path} does not match its hash {sha[:12]}…; it was altered on disk: "
                                f"`lsdb run` retrains it")
    return state


def checkpoint_problem(directory: Path, checkpoint_id: str, sha: str, optimizer_sha: str) -> str | None:
    """What is wrong with a stored checkpoint's files (weights, optimiser state), or None."""
    for load in (lambda: load_weights(directory, sha), lambda: load_optimizer(directory, checkpoint_id, optimizer_sha)):
        try:
            load()
        except CheckpointCorrupt as e:
            return str(e).split(";")[0]
    return None
