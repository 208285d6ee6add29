"""The shared worker: load checkpoints (verifying their hash), build the model and data on the
chosen device, run one probe, write one spool shard. Probes hold only maths.

Workers never open the database, so the same function runs in-process, in a process pool, or
as a batch job over a manifest (``lsdb worker``) on any machine that sees the store directory.

Each job's meta records its peak memory (``PeakMemory``) and the torch thread count it ran with:
results depend on the thread count in the last digits (reductions split differently), so a study
resumed with another ``--workers`` holds rows of both, and ``probe_job.threads`` says which is which.
"""

from __future__ import annotations

import json
import os
import socket
import threading
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


def job_meta(job: JobSpec, worker: str, device: str, started, **measured) -> dict:
    """A job's ``probe_job`` row before its outcome (state, error, seconds) is known; ``measured``
    adds what a live worker measures (threads, peak memory)."""
    return dict(id=job.id, probe=job.probe, version=job.version, params_hash=job.params_hash,
                params_json=json.dumps(job.params, sort_keys=True), role=job.role,
                checkpoint_id=job.checkpoints[0].id,
                other_checkpoint_id=job.checkpoints[1].id if len(job.checkpoints) > 1 else None,
                more_checkpoint_ids=json.dumps([c.id for c in job.checkpoints[2:]]) if len(job.checkpoints) > 2 else None,
                anchor_checkpoint_id=job.anchor_checkpoint_id, inputs_json=json.dumps(job.inputs, sort_keys=True),
                attempts=1, error=None, worker=worker, device=device, started_at=started.isoformat(), **measured)


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
    memory = PeakMemory(dev)
    started, t0 = utcnow(), time.perf_counter()
    meta = job_meta(job, f"{socket.gethostname()}:{os.getpid()}", str(dev), started,
                    threads=torch.get_num_threads())
    tables: dict[str, list[dict]] = {}
    with memory:  # stopped however the job ends, so a pool worker keeps no sampling thread
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
    meta["peak_memory_mb"] = memory.peak_mb
    write_shard(root / "spool", f"job-{job.id}", {"kind": "probe", "job": meta}, tables)
    faults.point("probe_shard")
    return meta


class PeakMemory:
    """The most memory a job held, in MiB: ``start()`` before it, ``stop()`` after (returns the peak).

    On CUDA, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the start:
    exact, as the caching allocator counts every tensor. On the CPU, the resident set size
    (``/proc/self/statm``) sampled every ``interval`` seconds from a background thread, and at
    start and stop; the largest sample is the peak (a spike shorter than the interval can be
    missed). Not ``resource.getrusage().ru_maxrss``: that is the process's peak over its whole
    life, so a pool worker would report its largest earlier job for every later one. Both figures
    include what the process held before the job (the interpreter, cached data and models):
    ``baseline_mb`` is the figure at the start. ``None`` where neither source exists (no /proc).
    """

    STATM = "/proc/self/statm"

    def __init__(self, device=None, interval: float = 0.01):
        self.cuda = getattr(device, "type", str(device or "cpu")).startswith("cuda")
        self.device, self.interval = device, interval
        self.baseline_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

    def _rss_mb(self) -> float | None:
        try:
            with open(self.STATM, "rb") as f:
                return int(f.read().split()[1]) * self._page / 2**20
        except (OSError, ValueError, IndexError):
            return None

    def _sample(self) -> None:
        rss = self._rss_mb()
        if rss is not None and (self.peak_mb is None or rss > self.peak_mb):
            self.peak_mb = rss

    def _watch(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def start(self) -> "PeakMemory":
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_mb = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self.baseline_mb = self.peak_mb = self._rss_mb()
        if self.baseline_mb is not None:
            self._thread = threading.Thread(target=self._watch, name="lsdb-peak-memory", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> float | None:
        if self.cuda:
            import torch

            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20
            return self.peak_mb
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        return self.peak_mb

    def __enter__(self) -> "PeakMemory":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


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
