"""Checkpoint files: safetensors named by the sha256 of their tensors (never pickle).

The hash covers every tensor's name, dtype, shape and bytes in name order, so the same weights
always get the same name and any change on disk is caught on load.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from lsdb.errors import CheckpointCorrupt


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def atomic_save(state: dict[str, torch.Tensor], path: Path) -> None:
    """Write to a temporary name, fsync, rename: a reader sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_weights(directory: Path, state: dict[str, torch.Tensor]) -> str:
    sha = tensors_sha256(state)
    path = Path(directory) / f"{sha}.safetensors"
    if not path.exists():
        atomic_save(state, path)
    return sha


def load_weights(directory: Path, sha: str, verify: bool = True) -> dict[str, torch.Tensor]:
    path = Path(directory) / f"{sha}.safetensors"
    if not path.exists():
        raise CheckpointCorrupt(f"checkpoint file {path} is missing; rerun `lsdb run` to retrain it")
    try:
        state = load_file(str(path))
    except Exception as e:  # truncated or garbled
        raise CheckpointCorrupt(f"checkpoint file {path} is unreadable ({str(e).splitlines()[0]}); "
                                f"delete it and rerun `lsdb run`") from None
    if verify and tensors_sha256(state) != sha:
        raise CheckpointCorrupt(f"checkpoint file {path} does not match its hash {sha[:12]}…; "
                                f"it was altered on disk: delete it and rerun `lsdb run`")
    return state


def import_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a user's own ``.pt``/``.safetensors`` file without unpickling arbitrary objects."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointCorrupt(f"{path}: expected a state dict of tensors")
    return obj
