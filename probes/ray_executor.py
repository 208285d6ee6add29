"""Run tasks as Ray tasks, on a local Ray or an existing cluster (``lsdb run --executor ray``).

Same contract as the other executors: ``map(fn, tasks)`` yields each result as its task completes.
Tasks write their shards to the store's spool (a filesystem every node sees) and return only
small plain metadata; the coordinator, the only process that opens DuckDB, ingests the spool.

- Resources: a function with a ``device`` parameter (``run_probe_job``) can use an accelerator,
  so its tasks ask for ``gpus_per_job`` GPUs (default 1 where the cluster has GPUs, else 0) and
  1 CPU; other tasks (training, which runs on CPUs in lsdb) ask for 1 CPU. A task given no GPU
  sees none, so the worker's default device is ``cuda`` exactly when Ray assigned it a GPU.
- Failures: a task whose process dies (killed, out of memory, node lost) is retried
  ``MAX_RETRIES`` times by Ray. A probe job lost even then is recorded as a failed job with
  Ray's error (a failed shard, as any failed job: it counts towards ``MAX_ATTEMPTS`` and `lsdb
  jobs --failed` shows it); any other lost task (training) lets the others finish, then raises
  ``WorkerDied`` as the process pool does, and a rerun resumes. An exception raised by ``fn``
  itself propagates, as in the other executors.
- Ctrl-C (or any exit from ``map`` before the end) cancels every outstanding task; what finished
  is already in the spool, and the runner ingests it.
"""

from __future__ import annotations

import inspect
import os
import socket
from typing import Callable, Iterable, Iterator

from lsdb.errors import LsdbError, WorkerDied

MAX_RETRIES = 2
INSTALL_HINT = "pip install 'lsdb[ray]'"


def _import_ray():
    try:
        import ray
    except ImportError:
        raise LsdbError(f"--executor ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def _run_task(fn: Callable, args: tuple):
    """The body of every Ray task (module level, so Ray ships it by name, not by value)."""
    import ray

    if not ray.get_gpu_ids():
        # Ray leaves the visible devices alone for a task given no GPU: hide them, or the
        # worker's default device would be a GPU another task holds
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    return fn(*args)


class RayExecutor:
    """Tasks on Ray. ``address``: "auto" or "HOST:PORT" joins an existing cluster; None joins the
    one ``$RAY_ADDRESS`` names (Ray's convention, set inside `ray job submit`), else starts a
    local one with ``workers`` CPUs. A Ray this process has already initialised is used as it is."""

    name = "ray"

    def __init__(self, workers: int = 1, address: str | None = None, gpus_per_job: float | None = None):
        ray = _import_ray()
        self._ray = ray
        self._started = False
        address = address or os.environ.get("RAY_ADDRESS") or None
        self.where = address or "local"
        if not ray.is_initialized():
            self._connect(workers, address)
            self._started = True
        try:
            self.gpus_per_job = self._check_gpus(gpus_per_job)
        except LsdbError:
            self.close()
            raise
        opts = dict(max_retries=MAX_RETRIES, retry_exceptions=False)
        self._cpu_task = ray.remote(num_cpus=1, num_gpus=0, **opts)(_run_task)
        # max_calls=1: a GPU task's process exits after it, freeing that GPU's memory (Ray's own
        # default for GPU tasks); CUDA binds a process to the devices it first saw
        self._device_task = ray.remote(num_cpus=1, num_gpus=self.gpus_per_job, max_calls=1, **opts)(_run_task) \
            if self.gpus_per_job else self._cpu_task

    def _connect(self, workers: int, address: str | None) -> None:
        import logging

        ray = self._ray
        try:
            if address:
                _check_reachable(os.environ.get("RAY_ADDRESS", "") if address == "auto" else address)
                ray.init(address=address, logging_level=logging.ERROR)
            else:
                # "local": a new Ray even where `ray start` runs one (ray.init would join it)
                ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level=logging.ERROR)
        except ConnectionError as e:
            where = f"at {address}" if address else "locally"
            raise LsdbError(f"could not reach a Ray cluster {where}: {str(e).splitlines()[0]}; start one with "
                            f"`ray start --head`, or drop --address to start a local one (a cluster with token "
                            f"authentication also needs RAY_AUTH_MODE=token here)") from None

    def _check_gpus(self, asked: float | None) -> float:
        """GPUs each device task asks for; fails at once when no node has that many (Ray would
        otherwise keep the task pending forever)."""
        nodes = [n["Resources"] for n in self._ray.nodes() if n.get("Alive")]
        total = sum(n.get("GPU", 0) for n in nodes)
        if asked is None:
            return 1.0 if total > 0 else 0.0
        if asked < 0:
            raise LsdbError(f"--gpus-per-job must be 0 or more, not {asked:g}")
        most = max((n.get("GPU", 0) for n in nodes), default=0)
        if asked > most:
            cpus = sum(n.get("CPU", 0) for n in nodes)
            has = f"{total:g} GPUs, at most {most:g} on one node," if total > most else f"{total:g} GPUs"
            fix = f"ask for at most {most:g}" if most else "--gpus-per-job 0 runs on CPUs"
            raise LsdbError(f"--gpus-per-job {asked:g}: each job asks for {asked:g} GPUs, but the Ray cluster "
                            f"({self.where}) has {has} and {cpus:g} CPUs; {fix}")
        return float(asked)

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        ray = self._ray
        task = self._device_task if _uses_device(fn) else self._cpu_task
        args_of: dict = {}
        pending: list = []
        lost: list[str] = []
        try:
            for args in tasks:
                ref = task.remote(fn, args)
                args_of[ref] = args
                pending.append(ref)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                if pending:  # take every other finished task too, in one call
                    more, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
                    ready += more
                for ref in ready:
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as e:  # fn raised: as in the other executors
                        raise (e.cause if isinstance(e.cause, BaseException) else e) from e
                    except ray.exceptions.RayError as e:  # the task's process died MAX_RETRIES + 1 times
                        failed = _record_lost(fn, args_of[ref], e)
                        if failed is None:
                            lost.append(_first_line(e))
                        else:
                            yield failed
        finally:  # Ctrl-C, an error, or the consumer stopped: nothing may keep running
            for ref in pending:
                # force: kill running tasks' processes (a plain cancel leaves a task in sleep or in
                # C code running); a half-written shard is a temporary the next run removes
                ray.cancel(ref, force=True)
        if lost:
            raise WorkerDied(f"{len(lost)} of {len(args_of)} Ray tasks died {MAX_RETRIES + 1} times "
                             f"({lost[0]}); finished work is kept: rerun the same command to resume")

    def close(self):
        if self._started:
            self._ray.shutdown()
            self._started = False


def _check_reachable(address: str) -> None:
    """Fail at once where nothing listens at HOST:PORT: ray.init would retry it for many minutes.
    Other forms ("auto" resolved by Ray itself, ray://) are left to Ray."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as e:
        raise LsdbError(f"no Ray cluster answers at {address} ({e.strerror or e}); start one there with "
                        f"`ray start --head --port {port}`, or drop --address to start a local one") from None


def _uses_device(fn: Callable) -> bool:
    try:
        return "device" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _record_lost(fn: Callable, args: tuple, error: Exception) -> dict | None:
    """For a probe job (a call ``fn(store_root, job, device)``, as ``run_probe_job``): write the
    failed shard its dead worker could not, and return its metadata; None for any other task."""
    from lsdb.probes.worker import JobSpec

    try:
        bound = inspect.signature(fn).bind(*args).arguments
    except (TypeError, ValueError):
        return None
    job, root = bound.get("job"), bound.get("store_root")
    if not isinstance(job, JobSpec) or root is None:
        return None
    return _write_lost_job(root, job, bound.get("device"), f"{type(error).__name__}: {error}")


def _write_lost_job(store_root, job, device: str | None, error: str) -> dict:
    """Record ``job`` as failed with ``error``: the metadata ``run_probe_job`` writes for a job that
    fails before it computes, less what only a live worker measures (ingest stores it as null)."""
    from pathlib import Path

    from lsdb.ids import utcnow
    from lsdb.probes.worker import job_meta
    from lsdb.spool import write_shard

    meta = job_meta(job, f"ray (lost; coordinator {socket.gethostname()}:{os.getpid()})", str(device or "unknown"),
                    utcnow())
    meta.update(error=error, state="failed", seconds=0.0)
    write_shard(Path(store_root) / "spool", f"job-{job.id}", {"kind": "probe", "job": meta}, {})
    return meta


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0] if text else ''}"
