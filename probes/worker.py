"""The shared worker: load checkpoints (verifying their hash), build the model and data on the
chosen device, run one probe, write one spool shard. Probes hold only maths.

Workers never open the database, so the same function runs in-process, in a process pool, or
as a batch job over a manifest (``lsdb worker``) on any machine that sees the store directory.
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lsdb import faults
from lsdb.probes.base import CheckpointRef, RunRef


@dataclass(frozen=True)
class JobSpec:
    """Everything one probe job needs, as plain data (picklable, JSON-able)."""

    id: str
    probe: str
    version: int
    params: dict[str, Any]
    params_hash: str
    role: str
    checkpoints: tuple[CheckpointRef, ...]
    runs: tuple[RunRef, ...]
    anchor_checkpoint_id: str
    inputs: dict[str, Any] = field(default_factory=dict)
    model: Any = None  # lsdb.spec.ModelSpec
    data: Any = None  # lsdb.spec.DataSpec
    probe_set_sha256: str = ""
    seed: int = 0


def pick_device(requested: str | None = None):
    import torch

    dev = torch.device(requested) if requested else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        # measurements in true float32: cuDNN would otherwise run convolutions in TF32 (10-bit
        # mantissa), ~1e-3 relative error, the size of the Hessian and NTK tolerances
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    return dev


_CACHE: dict[tuple, Any] = {}


def _cached(key, make):
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def run_probe_job(store_root: str, job: JobSpec, device: str | None = None) -> dict:
    """Run ``job`` and write its shard; returns the job's metadata (state, error, seconds)."""
    import torch

    from lsdb.errors import LsdbError, ProbeError, ProbeSkipped
    from lsdb.ids import utcnow
    from lsdb.probes import probe_module
    from lsdb.probes.base import Artifacts, ProbeContext, dataclass_from_dict
    from lsdb.spool import write_shard
    from lsdb.train.checkpoints import load_weights
    from lsdb.train.data import load_data
    from lsdb.train.models import build_model, check_fits

    root = Path(store_root)
    dev = pick_device(device)
    started, t0 = utcnow(), time.perf_counter()
    meta = dict(id=job.id, probe=job.probe, version=job.version, params_hash=job.params_hash,
                params_json=json.dumps(job.params, sort_keys=True), role=job.role,
                checkpoint_id=job.checkpoints[0].id,
                other_checkpoint_id=job.checkpoints[1].id if len(job.checkpoints) > 1 else None,
                anchor_checkpoint_id=job.anchor_checkpoint_id, inputs_json=json.dumps(job.inputs, sort_keys=True),
                attempts=1, error=None, worker=f"{socket.gethostname()}:{os.getpid()}", device=str(dev),
                started_at=started.isoformat())
    tables: dict[str, list[dict]] = {}
    try:
        module = probe_module(job.probe)
        params = dataclass_from_dict(module.Params, job.params)
        data = _cached(("data", job.data, str(dev)), lambda: load_data(job.data).to(dev, torch.float32))
        model = _cached(("model", job.model, data.input_shape, str(dev)),
                        lambda: build_model(job.model, data.input_shape, data.num_classes).to(dev))
        model.eval()  # probes see the eval-mode network; one that needs train-mode passes undoes them
        meta["batchnorm"] = batchnorm_mode(module, params, model)
        artifacts = Artifacts(root / "artifacts")
        indices = _cached(("probe_set", job.probe_set_sha256, str(dev)),
                          lambda: torch.from_numpy(artifacts.get(job.probe_set_sha256)).to(dev))
        states = [{k: v.to(dev) for k, v in load_weights(root / "checkpoints", c.sha256).items()}
                  for c in job.checkpoints]
        for c, state in zip(job.checkpoints, states):
            check_fits(model, state, f"checkpoint {c.id}")
        ctx = ProbeContext(model=model, states=states, checkpoints=list(job.checkpoints), runs=list(job.runs),
                           data=data, probe_indices=indices, device=dev, dtype=torch.float32,
                           artifacts=artifacts, role=job.role, inputs=dict(job.inputs), seed=job.seed)
        faults.point("probe_compute")
        out = module.compute(ctx, params)
        undeclared = sorted(set(out) - set(module.TABLES))
        if undeclared:  # ingest would refuse the shard; say whose bug it is instead
            raise ProbeError(f"probe {job.probe} returned table {undeclared[0]!r}, which its TABLES "
                             f"{module.TABLES} do not declare")
        keys = dict(job_id=job.id, checkpoint_id=meta["checkpoint_id"],
                    other_checkpoint_id=meta["other_checkpoint_id"], anchor_checkpoint_id=job.anchor_checkpoint_id)
        for table, rows in out.items():
            tables[table] = [{**_plain(r), **keys, "idx": i} for i, r in enumerate(rows)]
        meta["state"] = "done"
    except ProbeSkipped as e:
        meta.update(state="skipped", error=f"skipped: {e}")
        tables = {}
    except LsdbError as e:
        meta.update(state="failed", error=f"{type(e).__name__}: {e}")
        tables = {}
    except Exception as e:  # a bug or a resource error: keep the trace for `lsdb jobs --failed`
        tb = traceback.format_exc(limit=3)
        meta.update(state="failed", error=f"{type(e).__name__}: {e}\n{tb}")
        tables = {}
    meta["seconds"] = time.perf_counter() - t0
    write_shard(root / "spool", f"job-{job.id}", {"kind": "probe", "job": meta}, tables)
    faults.point("probe_shard")
    return meta


def batchnorm_mode(module, params, model) -> str:
    """What ``probe_job.batchnorm`` records for this probe on this model (``BATCHNORM_MODES``)."""
    from torch import nn

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return "none"
    if getattr(params, "bn_recompute", True) is False:
        return "running"
    return module.BATCHNORM


def _plain(row: dict) -> dict:
    """Tensors and numpy scalars to Python scalars, so Parquet types stay exact."""
    out = {}
    for k, v in row.items():
        if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
            v = v.item()
        out[k] = v
    return out
