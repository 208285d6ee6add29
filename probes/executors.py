"""Executors run plain functions over plain tasks and yield results as they complete.

``inline`` runs in this process (debuggable, and what tests use); ``process`` is a local pool of
``--workers N`` processes; ``ray`` (``lsdb.probes.ray_executor``) runs Ray tasks on a local Ray or
a cluster. Batch jobs over ``lsdb worker`` need no executor. Workers share nothing but the store
directory.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Callable, Iterable, Iterator


THREADS_VAR = "LSDB_THREADS"


def free_cores() -> int:
    """Torch threads for this machine now: ``$LSDB_THREADS`` when set, else the cores this process
    may use less the 1-minute load average (what other processes keep busy), at least 1.

    Oversubscription, not arithmetic, is what made a busy 2-core box slow: torch's threads wait
    for each other at every operation, and a thread the OS gives to another process stalls them
    all (one kernel-accuracy job took 67.5 s inline with 2 threads beside a busy process, 2.2 s
    with one thread per process). Results differ in the last digits between thread counts, so
    every probe job records its own (``probe_job.threads``); set ``$LSDB_THREADS`` to pin it."""
    pinned = os.environ.get(THREADS_VAR)
    if pinned:
        try:
            return max(1, int(pinned))
        except ValueError:
            from lsdb.errors import LsdbError

            raise LsdbError(f"${THREADS_VAR}={pinned!r}: expected a whole number of threads") from None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):  # no load average on this platform
        busy = 0.0
    return max(1, min(cores, cores - int(busy + 0.5)))


class InlineExecutor:
    """Runs each task in this process, with torch threads for the cores free when it starts."""

    name = "inline"

    def __init__(self):
        import torch

        self._threads = torch.get_num_threads()
        torch.set_num_threads(free_cores())

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        for args in tasks:
            yield fn(*args)

    def close(self):
        import torch

        torch.set_num_threads(self._threads)


def _init_worker(threads: int, coordinator: int):
    _die_with(coordinator)  # first: importing torch takes seconds, the coordinator may die meanwhile
    import torch

    torch.set_num_threads(threads)


def _die_with(parent: int) -> None:
    """A worker whose coordinator was killed (SIGKILL, the OOM killer) must not linger: the
    coordinator's ``finally`` never ran to shut the pool down. On Linux the kernel sends SIGKILL
    when the parent dies (PR_SET_PDEATHSIG); elsewhere a thread notices the new parent PID."""
    import signal
    import threading
    import time

    if os.getppid() != parent:  # gone already
        os._exit(1)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0:  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent:  # died before prctl took effect
                os._exit(1)
            return
    except (OSError, AttributeError):
        pass

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lsdb-parent-watch").start()


class ProcessExecutor:
    """A pool of worker processes (spawned, not forked: torch is not fork-safe once threaded)."""

    name = "process"

    def __init__(self, workers: int):
        import multiprocessing as mp

        threads = max(1, free_cores() // workers)
        self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"),
                                        initializer=_init_worker, initargs=(threads, os.getpid()))

    def map(self, fn: Callable, tasks: Iterable[tuple]) -> Iterator:
        from concurrent.futures.process import BrokenProcessPool

        from lsdb.errors import WorkerDied

        futures = []
        try:  # a pool broken by a dead worker fails on submit as well as on result
            futures = [self.pool.submit(fn, *args) for args in tasks]
            for f in as_completed(futures):
                yield f.result()
        except BrokenProcessPool:
            done = sum(f.done() and not f.cancelled() and f.exception() is None for f in futures)
            raise WorkerDied(f"a worker process died (killed, or out of memory) after {done} of {len(futures)} "
                             f"tasks; finished work is kept: rerun the same command to resume "
                             f"(fewer --workers if memory is short)") from None

    def close(self):
        self.pool.shutdown(cancel_futures=True)


EXECUTORS = ("inline", "process", "ray")


def make_executor(workers: int = 1, kind: str | None = None, address: str | None = None,
                  gpus_per_job: float | None = None):
    """The executor named ``kind`` (default: inline for one worker, else a process pool).
    ``address`` and ``gpus_per_job`` are Ray's (see ``lsdb.probes.ray_executor``); Ray is
    imported only here, only when asked for."""
    from lsdb.errors import LsdbError

    kind = kind or ("inline" if workers <= 1 else "process")
    if kind not in EXECUTORS:
        raise LsdbError(f"unknown executor {kind!r}; choose one of {', '.join(EXECUTORS)}")
    if kind != "ray" and (address is not None or gpus_per_job is not None):
        raise LsdbError("--address and --gpus-per-job apply only to --executor ray")
    if kind == "inline":
        if workers > 1:
            raise LsdbError(f"--executor inline runs one job at a time; drop --workers {workers} "
                            f"or use --executor process")
        return InlineExecutor()
    if kind == "process":
        return ProcessExecutor(workers)
    from lsdb.probes.ray_executor import RayExecutor

    return RayExecutor(workers, address, gpus_per_job)
